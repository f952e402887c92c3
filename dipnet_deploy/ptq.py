"""``quantize --method auto``: post-training ranges chosen for the model's output, not each tensor's.

From the fp32 ONNX and the calibration images alone (no checkpoint, no training data):

1. max calibration with activation equalization (what the default method writes);
2. the last conv's output, the image before DepthToSpace, on the exact uint8 grid [0, 1] (scale
   1/255, zero point 0): its int8 step is then the final rounding to 8 bits and costs nothing;
3. every other activation range refined to minimise the error of the model's output: the ranges
   are the parameters of ``qat.QuantSimDIPNet`` (the fake-quantized twin of the int8 graph, weights
   int8 as onnxruntime writes them and kept fixed), learned by Adam with LSQ gradients on random
   crops of the calibration inputs, against the fp32 model's output (mean squared error).

Everything is recorded in the ranges document (``parameters``), so ``--ranges`` reuses it as is.
The model must be a DIPNet exported by ``export`` (its initializers keep the module names).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.qat import FIXED_POINTS, QuantSimDIPNet, model_from_onnx, onnx_point_names, range_owner, tensor_ranges


@dataclass(frozen=True)
class AutoOptions:
    """iters: Adam steps; batch crops of crop x crop input pixels each; lr: peak learning rate of the
    range bounds (cosine decay to 1%); seed: the crops drawn."""

    iters: int = 1000
    batch: int = 8
    crop: int = 64
    lr: float = 1e-3
    seed: int = 0


def point_ranges(graph: onnx.GraphProto, tensors: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per learnable quantization point (``qat`` names), its range read from per-tensor ``tensors``."""
    return {point: tensors[tensor] for tensor, point in onnx_point_names(graph).items()
            if range_owner(point) == point and point not in FIXED_POINTS}


def refine_ranges(fp32: onnx.ModelProto, tensors: dict[str, tuple[float, float]], inputs: np.ndarray,
                  options: AutoOptions = AutoOptions(),
                  progress: Progress = no_progress) -> dict[str, tuple[float, float]]:
    """Output-aware ranges for every quantized tensor of ``fp32`` (the model the int8 graph is made from).

    ``tensors``: the starting range of each tensor (max calibration); ``inputs``: [N, 3, H, W]
    float32 model inputs the crops are drawn from. Returns the range of every tensor the QDQ
    quantizer quantizes (``qat.tensor_ranges``), the fixed input and output grids included.
    """
    model = model_from_onnx(fp32)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    sim = QuantSimDIPNet(model, point_ranges(fp32.graph, tensors))
    optimizer = torch.optim.Adam([sim.low, sim.high], lr=options.lr, betas=(0.9, 0.99))
    rng = np.random.default_rng(options.seed)
    _, _, height, width = inputs.shape
    crop = min(options.crop, height, width)
    for step in progress(range(options.iters), "auto (output-aware ranges)", options.iters):
        picks = rng.integers(0, len(inputs), options.batch)
        tops, lefts = rng.integers(0, height - crop + 1, options.batch), rng.integers(0, width - crop + 1, options.batch)
        batch = torch.from_numpy(np.stack([inputs[i, :, t:t + crop, s:s + crop] for i, t, s in zip(picks, tops, lefts)]))
        with torch.no_grad():
            target = model(batch)
        for group in optimizer.param_groups:
            group["lr"] = options.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / options.iters)))
        loss = F.mse_loss(sim(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return tensor_ranges(fp32.graph, sim.ranges())


def auto_parameters(options: AutoOptions) -> dict:
    return {"start": "max with activation equalization", "output_grid": "last conv output on [0, 1] in 1/255 steps",
            "refinement": "output MSE through the fake-quantized twin (qat), weights fixed", **asdict(options)}
