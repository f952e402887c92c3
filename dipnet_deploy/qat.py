"""Fake quantization of a deploy-form DIPNet that mirrors the int8 QDQ graph ``quantize`` writes.

onnxruntime's QDQ quantizer (``quantize_static``, as ``int8_model.qdq_model`` calls it) quantizes
the image input and the output of every Conv, LeakyRelu, Add, Mul, Sigmoid, MaxPool and Resize;
the DepthToSpace output (the model output) stays float. Weights are int8 symmetric per output
channel (scale = max|w| / 127), biases float. Activations are uint8 asymmetric: the range is
widened to contain 0, scale = (max - min) / 255, zero point = round(-min / scale). MaxPool and
Resize outputs reuse their input's scale and zero point (onnxruntime ties them), so MaxPool is
exact and Resize rounds onto its input's grid. Each tensor is quantized once; every consumer
reads the same dequantized values.

A *quantization point* is named by the model's structure, not by an exporter's tensor names:
a Conv output by its module path (``block_1.c1_r``), a one-input op by ``{input}>{Op}``
(``block_1.c1_r>LeakyRelu``), a two-input op by ``{Op}[{a}|{b}]`` with the operand names
sorted (``Add[block_1.c3_r>LeakyRelu|conv_1]``), the image by ``input``. ``onnx_point_names``
derives the same names from an ONNX graph, so ranges learned here map onto any export of the
model. Rounding uses a straight-through estimator; ranges are learnable (LSQ-style).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from dipnet_deploy.archs.dipnet_arch import LEAKY_SLOPE, DIPNet
from dipnet_deploy.runtime import open_session

ACTIVATION_LEVELS = 255  # uint8
WEIGHT_QMAX = 127  # int8 symmetric: [-127, 127]
IMAGE_RANGE = (0.0, 1.0)
# Points whose range is fixed, not learned: the image is uint8/255, and the last conv's output is
# the image before the final clip-and-round to uint8, so [0, 1] in 1/255 steps costs nothing.
FIXED_POINTS = {"input": IMAGE_RANGE, "upsampler.0": IMAGE_RANGE}
TIED_OPS = ("MaxPool", "Resize")  # quantized with their input's scale and zero point
QUANTIZED_OPS = {"Conv", "LeakyRelu", "Add", "Mul", "Sigmoid", *TIED_OPS}
QAT_FORMAT = "dipnet-deploy-qat/1"
LEARNED_RANGES_KEY = "dipnet_deploy.learned_ranges"  # ONNX metadata_props key


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as QuantizeLinear does) with an identity gradient."""
    return x + (torch.round(x) - x).detach()


class _FakeQuantActivation(torch.autograd.Function):
    """uint8 quantize-dequantize with LSQ gradients, fused: one saved mask and one saved residual.

    Gradients: x passes inside the range (straight-through), is cut outside; the scale gets
    round(x/s) - x/s inside and the clamped level outside (LSQ); the zero point gets -scale
    from each clamped element.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        scaled = x / scale
        levels = torch.round(scaled)
        residual = levels - scaled
        levels += zero_point
        inside = (levels >= 0) & (levels <= ACTIVATION_LEVELS)
        levels.clamp_(0, ACTIVATION_LEVELS).sub_(zero_point)
        ctx.save_for_backward(inside, torch.where(inside, residual, levels), scale)
        return levels.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, scale_term, scale = ctx.saved_tensors
        grad_x = grad * inside
        grad_scale = (grad * scale_term).sum()
        grad_zero_point = (grad_x.sum() - grad.sum()) * scale
        return grad_x, grad_scale, grad_zero_point


def fake_quant_activation(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """uint8 asymmetric quantize-dequantize of ``x`` for the range [low, high], onnxruntime's way.

    The range is widened to contain 0; scale = (high - low) / 255; zero point = round(-low / scale)
    (straight-through). Gradients reach ``x`` inside the range and ``low``/``high`` through the
    scale and zero point.
    """
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = torch.clamp((high - low) / ACTIVATION_LEVELS, min=1e-8)
    zero_point = torch.clamp(round_ste(-low / scale), 0, ACTIVATION_LEVELS)
    return _FakeQuantActivation.apply(x, scale, zero_point)


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """int8 symmetric per-output-channel quantize-dequantize (scale max|w|/127, not learned)."""
    absmax = weight.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
    scale = (absmax / WEIGHT_QMAX).view(-1, *([1] * (weight.dim() - 1)))
    return torch.clamp(round_ste(weight / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale


def unary_name(source: str, op: str) -> str:
    return f"{source}>{op}"


def binary_name(op: str, a: str, b: str) -> str:
    return f"{op}[{'|'.join(sorted((a, b)))}]"


def range_owner(name: str) -> str:
    """The point whose range ``name`` uses: a tied op's input, recursively; else itself."""
    while name.rsplit(">", 1)[-1] in TIED_OPS and ">" in name:
        name = name.rsplit(">", 1)[0]
    return name


class Point(NamedTuple):
    """A dequantized tensor and the name of its quantization point."""

    value: torch.Tensor
    name: str


class QuantSimDIPNet(nn.Module):
    """A deploy-form DIPNet run through fake quantization at the QDQ graph's points.

    ``ranges`` maps each learned point to its initial (low, high); the ``fixed`` points (by
    default ``FIXED_POINTS``) keep theirs. ``floor`` (range coverage) maps points to a range their
    learned range always contains: the range used is [min(low, floor low), max(high, floor high)], so
    learning may widen a range but never clip what the floor's images showed. ``forward`` records the
    names it visits in ``visited``.
    """

    def __init__(self, model: DIPNet, ranges: dict[str, tuple[float, float]],
                 fixed: dict[str, tuple[float, float]] = FIXED_POINTS,
                 floor: dict[str, tuple[float, float]] | None = None):
        super().__init__()
        self.model, self.fixed = model, dict(fixed)
        self.names = sorted(ranges)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.low = nn.Parameter(torch.tensor([ranges[n][0] for n in self.names], dtype=torch.float32))
        self.high = nn.Parameter(torch.tensor([ranges[n][1] for n in self.names], dtype=torch.float32))
        self.register_buffer("floor_low", torch.empty(len(self.names)))
        self.register_buffer("floor_high", torch.empty(len(self.names)))
        self.set_floor(floor or {})
        self.visited: list[str] = []
        self.observed: dict[str, tuple[float, float]] | None = None  # set: record float ranges, quantize nothing
        self.clip = 0.0  # while observing: the fraction of each call's elements a recorded range may leave out

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranges in use: the learned ones widened to the floor."""
        return torch.minimum(self.low, self.floor_low), torch.maximum(self.high, self.floor_high)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The ranges in use (``bounds``) as plain floats, by point name."""
        low, high = (bound.detach().tolist() for bound in self.bounds())
        return {name: (low[i], high[i]) for name, i in self.index.items()}

    def floor(self) -> dict[str, tuple[float, float]]:
        """The floor (points that have one), as plain floats: what a resumed run must restore."""
        low, high = self.floor_low.tolist(), self.floor_high.tolist()
        return {name: (low[i], high[i]) for name, i in self.index.items() if low[i] <= high[i]}

    def set_floor(self, floor: dict[str, tuple[float, float]]) -> None:
        no_floor = (math.inf, -math.inf)
        with torch.no_grad():
            self.floor_low.copy_(torch.tensor([floor.get(n, no_floor)[0] for n in self.names]))
            self.floor_high.copy_(torch.tensor([floor.get(n, no_floor)[1] for n in self.names]))

    def learned(self) -> dict[str, tuple[float, float]]:
        """The range parameters themselves (before the floor widens them): what a resumed run restores."""
        low, high = self.low.detach().tolist(), self.high.detach().tolist()
        return {name: (low[i], high[i]) for name, i in self.index.items()}

    def written(self) -> DIPNet:
        """A copy of the model with every conv weight on its int8 grid: the values the int8 model holds."""
        written = copy.deepcopy(self.model).eval()
        with torch.no_grad():
            for module in written.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.copy_(fake_quant_weight(module.weight))
        return written

    def quant(self, name: str, value: torch.Tensor) -> Point:
        self.visited.append(name)
        owner = range_owner(name)
        if self.observed is not None:
            if owner == name and name not in self.fixed:
                low, high = self.observed.get(name, (float("inf"), float("-inf")))
                seen_low, seen_high = clipped_bounds(value.detach(), self.clip)
                self.observed[name] = (min(low, seen_low), max(high, seen_high))
            return Point(value, name)
        if owner in self.fixed:
            low, high = (torch.tensor(v, device=value.device) for v in self.fixed[owner])
        else:
            i = self.index[owner]
            low, high = torch.minimum(self.low[i], self.floor_low[i]), torch.maximum(self.high[i], self.floor_high[i])
        return Point(fake_quant_activation(value, low, high), name)

    def conv(self, name: str, module: nn.Conv2d, x: Point) -> Point:
        weight = module.weight if self.observed is not None else fake_quant_weight(module.weight)
        return self.quant(name, F.conv2d(x.value, weight, module.bias, module.stride, module.padding))

    def unary(self, op: str, function: Callable[[torch.Tensor], torch.Tensor], x: Point) -> Point:
        return self.quant(unary_name(x.name, op), function(x.value))

    def binary(self, op: str, a: Point, b: Point) -> Point:
        value = a.value + b.value if op == "Add" else a.value * b.value
        return self.quant(binary_name(op, a.name, b.name), value)

    def leaky(self, x: Point) -> Point:
        return self.unary("LeakyRelu", lambda t: F.leaky_relu(t, LEAKY_SLOPE), x)

    def esa(self, prefix: str, esa: nn.Module, x: Point) -> Point:
        reduced = self.conv(f"{prefix}.conv1", esa.conv1, x)
        pooled = self.unary("MaxPool", lambda t: F.max_pool2d(t, kernel_size=7, stride=3),
                            self.conv(f"{prefix}.conv2", esa.conv2, reduced))
        size = x.value.shape[2:]
        context = self.unary("Resize", lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False),
                             self.conv(f"{prefix}.conv3", esa.conv3, pooled))
        summed = self.binary("Add", context, self.conv(f"{prefix}.conv_f", esa.conv_f, reduced))
        gate = self.unary("Sigmoid", torch.sigmoid, self.conv(f"{prefix}.conv4", esa.conv4, summed))
        return self.binary("Mul", x, gate)

    def block(self, prefix: str, block: nn.Module, x: Point) -> Point:
        out = self.leaky(self.conv(f"{prefix}.c1_r", block.c1_r, x))
        out = self.leaky(self.conv(f"{prefix}.c2_r", block.c2_r, out))
        out = self.leaky(self.conv(f"{prefix}.c3_r", block.c3_r, out))
        out = self.conv(f"{prefix}.c5", block.c5, self.binary("Add", out, x))
        return self.esa(f"{prefix}.esa", block.esa, out) if block.esa is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.visited = []
        model = self.model
        features = self.conv("conv_1", model.conv_1, self.quant("input", x))
        out = features
        for index, block in enumerate(model.blocks(), start=1):
            out = self.block(f"block_{index}", block, out)
        body = self.binary("Add", self.conv("conv_2", model.conv_2, out), features)
        return F.pixel_shuffle(self.conv("upsampler.0", model.upsampler[0], body).value, model.config.upscale)


class CompiledOrEager:
    """``module`` called through ``torch.compile`` (TorchInductor), or plainly where that fails.

    The fake quantization is a dozen elementwise passes per quantization point; compiled, they fuse
    with their neighbours and a training step of the x2 (batch 32, LR 32x32) runs about twice as
    fast on 2 CPU cores, after a one-off compilation of about a minute. Compiled kernels may round
    float sums in another order than eager PyTorch (a few flips of a level in the fake-quantized
    tensors), so a run is reproducible with the same setting, not across settings. When
    compilation fails (no C++ compiler, an unsupported device), ``warn`` is told once and every
    call from then on runs ``module`` as is.
    """

    def __init__(self, module: nn.Module, warn: Callable[[str], None]):
        self.module, self.warn = module, warn
        self.compiled: Callable | None = torch.compile(module)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - whatever the compiler raises, eager still works
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
                self.warn(f"torch.compile is not usable here ({reason}); running without it (about half the speed)")
                self.compiled = None
        return self.module(*args)


def clipped_bounds(value: torch.Tensor, clip: float) -> tuple[float, float]:
    """The narrowest (low, high) that leaves out at most ``clip`` (a fraction, 0 <= clip < 1) of
    ``value``'s elements, half of it on each side: at most clip / 2 below low and clip / 2 above high;
    clip 0: (min, max)."""
    flat = value.reshape(-1)
    allowed = int(clip / 2 * flat.numel())
    if allowed == 0:
        return float(flat.min()), float(flat.max())
    return _extreme(flat, allowed + 1, largest=False), _extreme(flat, allowed + 1, largest=True)


def _extreme(flat: torch.Tensor, rank: int, largest: bool) -> float:
    """The ``rank``-th largest (or smallest) element of ``flat``, exactly. topk over a whole activation
    (16M elements at 540x960) takes seconds on a CPU; the candidates beyond a threshold read from a
    strided sample are few, and when they number at least ``rank`` they hold the answer."""
    stride = max(1, flat.numel() // 100_000)
    sample = flat[::stride]
    threshold = torch.topk(sample, min(sample.numel(), 4 * rank // stride + 16), largest=largest).values[-1]
    candidates = flat[flat >= threshold] if largest else flat[flat <= threshold]
    if candidates.numel() < rank:
        candidates = flat
    return float(torch.topk(candidates, rank, largest=largest).values[-1])


@torch.no_grad()
def observe_ranges(model: DIPNet, batches: list[torch.Tensor], clip: float = 0.0) -> dict[str, tuple[float, float]]:
    """The range of every learnable point over ``batches``: the narrowest that clips at most ``clip``
    (a fraction) of its float values in every batch (``clipped_bounds``), widened over all batches.

    Pass one image per batch to bound the clipping of each image. The walk runs the float model
    (nothing quantized); with clip 0 these are the ranges `--method max` would see on the same data.
    """
    walker = QuantSimDIPNet(model, {})
    walker.observed, walker.clip = {}, clip
    device = next(model.parameters()).device
    for batch in batches:
        walker(batch.to(device))
    return dict(walker.observed)


def range_floor(model: DIPNet, start: dict[str, tuple[float, float]], images: list[torch.Tensor],
                clip: float) -> dict[str, tuple[float, float]]:
    """The floor of range coverage for ``model`` on ``images`` (one image per tensor): ``start`` (their max
    ranges, what a learning starts from) for clip 0, else ``observe_ranges`` with the clipping bound."""
    return start if clip == 0 else observe_ranges(model, images, clip)


def covering(ranges: dict[str, tuple[float, float]], model: DIPNet,
             inputs: list[np.ndarray], clip: float = 0.0) -> dict[str, tuple[float, float]]:
    """``ranges`` (by point) widened until they clip at most ``clip`` of what ``model`` computes at
    each point on each of ``inputs`` ([1, 3, H, W] float32 arrays): weights that moved during a
    refinement or fine-tune move the activations too, and the floor must hold for the model as written."""
    with torch.no_grad():
        seen = observe_ranges(model, [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs], clip)
    return {name: (min(low, seen.get(name, (low, high))[0]), max(high, seen.get(name, (low, high))[1]))
            for name, (low, high) in ranges.items()}


def onnx_point_names(graph: onnx.GraphProto) -> dict[str, str]:
    """ONNX tensor name -> quantization point name, for every tensor the QDQ quantizer quantizes.

    Conv outputs are named after their weight initializer (``conv_1.weight`` -> ``conv_1``), so
    the names follow the module structure whatever the exporter called the tensors.
    """
    initializers = {init.name for init in graph.initializer}
    names: dict[str, str] = {vi.name: "input" for vi in graph.input if vi.name not in initializers}
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if node.op_type == "Conv":
            if not node.input[1].endswith(".weight") or node.input[1] not in initializers:
                continue
            names[node.output[0]] = node.input[1][: -len(".weight")]
        elif node.op_type in ("Add", "Mul"):
            if node.input[0] in names and node.input[1] in names:
                names[node.output[0]] = binary_name(node.op_type, names[node.input[0]], names[node.input[1]])
        elif node.input[0] in names:
            names[node.output[0]] = unary_name(names[node.input[0]], node.op_type)
    return names


def image_grid_ranges(graph: onnx.GraphProto) -> dict[str, tuple[float, float]]:
    """The tensors of ``graph`` at ``FIXED_POINTS`` (the image input, the last conv's output before
    DepthToSpace) with their range [0, 1]: as uint8 their step is 1/255, the grid the image is read
    from and rounded to, so quantizing them loses nothing and clips only what the image clips."""
    return {tensor: FIXED_POINTS[name] for tensor, name in onnx_point_names(graph).items() if name in FIXED_POINTS}


def tensor_ranges(graph: onnx.GraphProto, learned: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The range of every quantized tensor of ``graph`` from learned point ranges.

    Raises KeyError naming a point the graph has but ``learned`` lacks (or the reverse).
    """
    names = onnx_point_names(graph)
    known = dict(learned) | FIXED_POINTS
    missing = sorted({range_owner(n) for n in names.values()} - set(known))
    unused = sorted(set(learned) - {range_owner(n) for n in names.values()})
    if missing or unused:
        raise KeyError(f"points {'missing: ' + ', '.join(missing[:3]) if missing else ''}"
                       f"{' unused: ' + ', '.join(unused[:3]) if unused else ''}")
    return {tensor: known[range_owner(name)] for tensor, name in names.items()}


def attach_learned_ranges(model: onnx.ModelProto, learned: dict[str, tuple[float, float]]) -> int:
    """Store ``learned`` point ranges in the ONNX metadata; returns how many tensors they cover.

    Raises KeyError when the graph's quantization points and ``learned`` differ.
    """
    covered = len(tensor_ranges(model.graph, learned))
    document = {"format": QAT_FORMAT, "points": {name: list(bounds) for name, bounds in sorted(learned.items())}}
    entry = model.metadata_props.add()
    entry.key, entry.value = LEARNED_RANGES_KEY, json.dumps(document, sort_keys=True)
    return covered


def model_from_onnx(fp32: onnx.ModelProto) -> DIPNet:
    """The deploy-form DIPNet whose weights an ``export``ed ONNX holds (initializers keep the keys)."""
    from dipnet_deploy.checkpoint import infer_config

    weights = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in fp32.graph.initializer}
    model = DIPNet(infer_config(weights))
    model.load_state_dict({key: weights[key] for key in model.state_dict()}, strict=True)
    return model.eval()


def simulation_agreement(fp32: onnx.ModelProto, int8_path: Path, learned: dict[str, tuple[float, float]],
                         image: np.ndarray) -> dict:
    """onnxruntime's int8 output against this module's simulation of it, on one input ``image``.

    ``image``: [1, 3, H, W] float32 in [0, 1] at the model's input shape. Both outputs are taken
    to 8-bit levels (clip, round) as every user of the model does. Returns the largest difference
    in levels, the share of differing values and the PSNR between the two (None when equal).
    """
    session = open_session(int8_path)
    int8 = session.run(image)
    del session
    with torch.no_grad():
        simulated = QuantSimDIPNet(model_from_onnx(fp32), learned)(torch.from_numpy(image)).numpy()
    levels = lambda output: np.round(np.clip(output.astype(np.float64) * 255.0, 0, 255))  # noqa: E731
    diff = levels(int8) - levels(simulated)
    mse = float(np.mean(diff**2))
    return {"max_abs_diff_levels": int(np.abs(diff).max()), "differing_values": round(float(np.mean(diff != 0)), 6),
            "psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse else None}
