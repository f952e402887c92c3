"""``quantize --method auto``: post-training quantization chosen for the model's output, not each tensor's.

From the fp32 ONNX and the calibration images alone (no checkpoint, no training data):

1. max calibration with activation equalization (what the default method writes);
2. the last conv's output, the image before DepthToSpace, on the exact uint8 grid [0, 1] (scale
   1/255, zero point 0): its int8 step is then the final rounding to 8 bits and costs nothing;
3. every other activation range, and the int8 weights, refined together to minimise the error of
   the model's output: the ranges and weights are the parameters of ``qat.QuantSimDIPNet`` (the
   fake-quantized twin of the int8 graph: per-channel int8 weights with straight-through rounding,
   LSQ range gradients), learned by Adam on random crops of the calibration inputs against the fp32
   model's output (mean squared error). The weights are then pinned: each conv is written with the
   int8 values it was refined to (``weight_lr`` 0 keeps the plainly rounded weights: ranges only).
   This is end-to-end AdaQuant/QAT on the calibration images, with the fp32 model as the only
   teacher.
4. range coverage (``AutoOptions.floor``, ``clip``): no range is learned so narrow that it clips more
   than ``clip`` (a fraction) of a tensor's values on any one calibration or coverage image, and each
   is widened at the end until that holds for the model as written (adapted weights). Narrowing
   ranges to what a few photos show is what made int8 fail on saturated colours and line art; a
   bound per image keeps whole regions unclipped while the rare outliers of photos may still be.

Everything is recorded in the ranges document (``parameters`` and ``adapted_weights``), so
``--ranges`` reuses it as is. The model must be a DIPNet exported by ``export`` (its
initializers keep the module names).
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from dipnet_deploy.errors import OutOfMemoryError
from dipnet_deploy.observers import DEFAULT_CLIP
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.qat import (
    FIXED_POINTS,
    WEIGHT_QMAX,
    QuantSimDIPNet,
    covering,
    fake_quant_weight,
    model_from_onnx,
    onnx_point_names,
    range_floor,
    range_owner,
    tensor_ranges,
)
from dipnet_deploy.runtime import UNNAMED_MODEL, allocation_failures_named

STEPS_PER_WEIGHTS = (1000, 100_000)  # default refinement: 1,000 steps per started 100,000 conv weights


@dataclass(frozen=True)
class AutoOptions:
    """iters: Adam steps (None: ``default_steps`` of the model: 1,000 for the x2 default, 3,000 for
    the official x4); batch crops of crop x crop input pixels each; lr: peak learning rate of the
    range bounds; weight_lr: of the weights (0: weights rounded to nearest, not refined); both decay
    by cosine to 1%; seed: the crops drawn; floor: no range narrower than what clips ``clip`` (a
    fraction) of a tensor's values on one calibration or coverage image (``qat.clipped_bounds``;
    clip 0: the max range, nothing clipped), enforced by ``qat.QuantSimDIPNet``'s floor."""

    iters: int | None = None
    batch: int = 8
    crop: int = 64
    lr: float = 1e-3
    weight_lr: float = 1e-4
    seed: int = 0
    floor: bool = True
    clip: float = DEFAULT_CLIP


@dataclass
class Refinement:
    """What ``refine`` chose: the range of every quantized tensor, the weights to write the int8
    model from (initializer name -> float32 array; conv weights on their int8 grid, level x scale;
    empty when the weights were not refined), and the options it ran with (steps resolved)."""

    ranges: dict[str, tuple[float, float]]
    weights: dict[str, np.ndarray]
    options: AutoOptions


def default_steps(fp32: onnx.ModelProto) -> int:
    """Refinement steps for ``fp32``: ``STEPS_PER_WEIGHTS``, so that a model with more weights (and
    quantization points) to fit gets more steps (x2 default, 93,664 conv weights: 1,000; the official
    x4 with ESA, 242,820: 3,000; 2,000 steps left it at 0.223 / 0.156 / 0.099 dB, Set14 short of half
    of max)."""
    steps, per = STEPS_PER_WEIGHTS
    weights = sum(math.prod(init.dims) for init in fp32.graph.initializer if len(init.dims) == 4)
    return steps * max(1, math.ceil(weights / per))


def resolved(options: AutoOptions, fp32: onnx.ModelProto) -> AutoOptions:
    """``options`` with its step count fixed for ``fp32`` (what the ranges document records)."""
    return options if options.iters is not None else replace(options, iters=default_steps(fp32))


def point_ranges(graph: onnx.GraphProto, tensors: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per learnable quantization point (``qat`` names), its range read from per-tensor ``tensors``."""
    return {point: tensors[tensor] for tensor, point in onnx_point_names(graph).items()
            if range_owner(point) == point and point not in FIXED_POINTS}


def refine(fp32: onnx.ModelProto, tensors: dict[str, tuple[float, float]], inputs: np.ndarray,
           options: AutoOptions = AutoOptions(), progress: Progress = no_progress,
           name: str | Path = UNNAMED_MODEL) -> Refinement:
    """Output-aware ranges (and, with ``options.weight_lr``, int8 weights) for ``fp32``, the model the
    int8 graph is made from.

    ``tensors``: the starting range of each tensor (max calibration); ``inputs``: [N, 3, H, W]
    float32 model inputs the crops are drawn from. The target is ``fp32``'s own output. Memory PyTorch
    (or numpy) cannot allocate: one ``OutOfMemoryError`` naming ``name`` (the model's file; unnamed,
    ``runtime.model_named`` names it) and the input size, whose whole-image forwards take the most.
    """
    try:
        with allocation_failures_named(name, "PyTorch"):
            return _refine(fp32, tensors, inputs, resolved(options, fp32), progress)
    except OutOfMemoryError as error:
        height, width = inputs.shape[2:]
        raise OutOfMemoryError(error.where, f"{error.problem}, refining the ranges of --method auto on its "
                                            f"{height}x{width} input (a model exported at a smaller --height/--width "
                                            "needs less)") from None


def _refine(fp32: onnx.ModelProto, tensors: dict[str, tuple[float, float]], inputs: np.ndarray,
            options: AutoOptions, progress: Progress) -> Refinement:
    """``refine``, with the step count resolved."""
    teacher = model_from_onnx(fp32)
    student = model_from_onnx(fp32)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    for parameter in student.parameters():
        parameter.requires_grad_(options.weight_lr > 0)
    start = point_ranges(fp32.graph, tensors)
    images = [inputs[i:i + 1] for i in range(len(inputs))]
    floor = range_floor(teacher, start, [torch.from_numpy(x) for x in images], options.clip) if options.floor else None
    sim = QuantSimDIPNet(student, start, floor=floor)
    groups = [{"params": [sim.low, sim.high], "peak": options.lr}]
    if options.weight_lr > 0:
        groups.append({"params": list(student.parameters()), "peak": options.weight_lr})
    optimizer = torch.optim.Adam([group | {"lr": group["peak"]} for group in groups], betas=(0.9, 0.99))
    rng = np.random.default_rng(options.seed)
    _, _, height, width = inputs.shape
    crop = min(options.crop, height, width)
    for step in progress(range(options.iters), "auto (output-aware ranges and weights)", options.iters):
        picks = rng.integers(0, len(inputs), options.batch)
        tops, lefts = rng.integers(0, height - crop + 1, options.batch), rng.integers(0, width - crop + 1, options.batch)
        batch = torch.from_numpy(np.stack([inputs[i, :, t:t + crop, s:s + crop] for i, t, s in zip(picks, tops, lefts)]))
        with torch.no_grad():
            target = teacher(batch)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / options.iters)))
        loss = F.mse_loss(sim(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    weights = {}
    if options.weight_lr > 0:
        with torch.no_grad():
            for name, module in student.named_modules():
                if isinstance(module, torch.nn.Conv2d):
                    weights[f"{name}.weight"] = fake_quant_weight(module.weight).numpy().astype(np.float32)
                    if module.bias is not None:
                        weights[f"{name}.bias"] = module.bias.numpy().astype(np.float32)
    ranges = sim.ranges()
    if options.floor:
        ranges = covering(ranges, sim.written(), images, options.clip)
    return Refinement(tensor_ranges(fp32.graph, ranges), weights, options)


def auto_parameters(options: AutoOptions) -> dict:
    return {"start": "max with activation equalization", "output_grid": "last conv output on [0, 1] in 1/255 steps",
            "refinement": "output MSE through the fake-quantized twin (qat): ranges" +
                          (" and int8 weights (pinned)" if options.weight_lr > 0 else ", weights rounded to nearest"),
            **asdict(options)}


def weights_entry(weights: dict[str, np.ndarray]) -> dict | None:
    """The ranges document's ``adapted_weights``: each conv weight as its int8 levels (base64 of int8
    bytes, C order) and per-output-channel scales, each bias as its float values; None when empty."""
    if not weights:
        return None
    entry = {}
    for name, array in sorted(weights.items()):
        if array.ndim == 4:
            scales = np.abs(array).reshape(len(array), -1).max(axis=1) / WEIGHT_QMAX
            safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
            levels = np.rint(array / safe.reshape(-1, 1, 1, 1)).astype(np.int8)
            entry[name] = {"shape": list(array.shape), "scales": safe.tolist(),
                           "levels_int8_base64": base64.b64encode(levels.tobytes()).decode("ascii")}
        else:
            entry[name] = {"shape": list(array.shape), "values": array.astype(np.float32).tolist()}
    return entry


def weights_from_entry(entry: dict) -> dict[str, np.ndarray]:
    """The arrays ``weights_entry`` wrote (conv weights as level x scale, float32), from an entry that
    ``ranges_schema`` checked against the model (shapes, sizes, levels, finite bounded scales)."""
    weights = {}
    for name, item in entry.items():
        shape = tuple(item["shape"])
        if "levels_int8_base64" in item:
            levels = np.frombuffer(base64.b64decode(item["levels_int8_base64"]), np.int8).reshape(shape)
            scales = np.asarray(item["scales"], np.float32).reshape(-1, 1, 1, 1)
            weights[name] = (levels.astype(np.float32) * scales).astype(np.float32)
        else:
            weights[name] = np.asarray(item["values"], np.float32)
    return weights
