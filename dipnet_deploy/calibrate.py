"""Stage 3: fp32 ONNX + calibration images -> activation ranges (streaming, bounded memory).

Why not onnxruntime's own calibrator: its MinMax calibrater adds a ReduceMin/ReduceMax of every
tensor as graph outputs, and its default execution order keeps every activation alive until
those reductions run at the end (8.5 GB for one 1080p frame of the x2 model; see ``session``).
Here:

- Pass 1 (every method) adds per-channel min/max reductions of each float tensor
  (``range_graphs``) and runs them in priority order, so each activation is freed after its last
  consumer: peak memory is one forward's and the statistics are exact whole-image values. The
  reductions read the tensors where onnxruntime's optimized graph keeps them (fused, NCHWc), so
  a pass costs little more than a plain forward.
- Per-channel ranges let ``equalize`` rescale channels before quantization; the ranges of the
  rescaled model follow from them exactly, so this costs no pass.
- Pass 2 (histogram methods only, ``observers``) needs the values themselves: the tensors are
  split into groups whose outputs fit a memory budget, and each group is one extra forward per
  image. Histograms have a fixed range (pass 1's min/max) and a fixed bin count, so each image is
  reduced into fixed-size statistics and dropped.

A session that cannot be made, or a forward that cannot run, for want of memory is one ``OutOfMemoryError``
naming the model (``name``: its file, given by the caller; ``runtime.model_named`` names it otherwise).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from dipnet_deploy.equalize import channel_spaces, equalization_scales, equalize_with, equalized_channel_ranges
from dipnet_deploy.observers import Observer
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.range_graphs import (
    derived_ranges,
    float_tensors,
    group_by_budget,
    native_range_model,
    run,
    session,
    tensor_shapes,
    values_model,
)
from dipnet_deploy.runtime import UNNAMED_MODEL

PASS2_BUDGET_BYTES = 768 << 20  # outputs of one pass-2 forward


# --------------------------------------------------------------------------- the calibration run

ChannelRanges = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def observe_ranges(model: onnx.ModelProto, tensors: list[str], channels: dict[str, int], inputs: Collection[np.ndarray],
                   progress: Progress, name: str | Path = UNNAMED_MODEL) -> ChannelRanges:
    """Exact per-channel min and max of each tensor over all inputs, one forward per input.

    The tensors are read in onnxruntime's own optimized layout (``native_range_model``).
    ``channels``: channel count per tensor (drops blocked padding).
    """
    input_name = model.graph.input[0].name
    graph = native_range_model(model, tensors, name)
    runner = session(graph, optimize=False, arena=True, name=name)
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for batch in progress(inputs, "calibrate (min/max)", len(inputs)):
        values = dict(zip([vi.name for vi in graph.graph.output], run(runner, None, {input_name: batch}, name)))
        for index, tensor in enumerate(tensors):
            seen_low = values[f"__calib_ReduceMin_{index}"].reshape(-1)[: channels[tensor]]
            seen_high = values[f"__calib_ReduceMax_{index}"].reshape(-1)[: channels[tensor]]
            low[tensor] = np.minimum(low[tensor], seen_low) if tensor in low else seen_low
            high[tensor] = np.maximum(high[tensor], seen_high) if tensor in high else seen_high
    return low, high


def channel_ranges(model: onnx.ModelProto, inputs: Collection[np.ndarray], progress: Progress = no_progress,
                   shapes: dict[str, list[int]] | None = None, name: str | Path = UNNAMED_MODEL) -> ChannelRanges:
    """Per-channel min/max of every tensor of ``float_tensors`` over all inputs (pass 1)."""
    tensors = float_tensors(model)
    shapes = shapes if shapes is not None else tensor_shapes(model)
    derived = derived_ranges(model)
    channels = {tensor: shapes[tensor][1] for tensor in tensors}
    low, high = observe_ranges(model, [tensor for tensor in tensors if tensor not in derived], channels, inputs,
                               progress, name)
    pending = {tensor: rule for tensor, rule in derived.items() if tensor in tensors}
    while pending:  # a source may itself be derived (DepthToSpace after an activation)
        ready = {tensor: rule for tensor, rule in pending.items() if rule[0] in low}
        if not ready:
            raise RuntimeError(f"no range source for {sorted(pending)}")
        for tensor, (source, mapping) in ready.items():
            low[tensor], high[tensor] = mapping(low[source], high[source])
            del pending[tensor]
    return low, high


@dataclass
class Calibration:
    """Per-tensor ranges of ``model`` (the model to quantize: the input model, equalized when asked) and
    the equalization scales it was made with."""

    ranges: dict[str, tuple[float, float]]
    model: onnx.ModelProto
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # channel space key -> per-channel equalization scales


def calibrate(
    model: onnx.ModelProto,
    inputs: Collection[np.ndarray],
    observer: Observer,
    progress: Progress = no_progress,
    equalize: bool = False,
    per_channel_weights: bool = True,
    symmetric_activations: bool = False,
    budget_bytes: int = PASS2_BUDGET_BYTES,
    name: str | Path = UNNAMED_MODEL,
) -> Calibration:
    """Run the calibration passes; iterating ``inputs`` yields one [1, 3, H, W] float32 array per image
    (it is iterated once per pass, so images are read again rather than kept).

    With ``equalize``, the ranges are those of ``equalize_with(model, scales)`` with the
    returned scales (the returned ``model``): pass 1 measures the original, and histogram methods
    run pass 2 on the equalized model. ``name``: the model's file, named should memory run out.
    """
    input_name = model.graph.input[0].name
    shapes = tensor_shapes(model)
    tensors = float_tensors(model)  # equalization changes weights only: the same tensors after it
    low, high = channel_ranges(model, inputs, progress, shapes, name)
    scales = {}
    if equalize:
        spaces = channel_spaces(model)
        scales = equalization_scales(model, spaces, low, high, per_channel_weights, symmetric_activations)
        model = equalize_with(model, scales)
        low, high = equalized_channel_ranges(spaces, scales, low, high)
    for tensor in tensors:
        observer.update_range(tensor, float(low[tensor].min()), float(high[tensor].max()))
    if observer.needs_histograms:
        sizes = {tensor: 4 * int(np.prod(shape)) for tensor, shape in shapes.items()}
        groups = group_by_budget(tensors, sizes, budget_bytes)
        sessions = [(group, session(values_model(model, group), name=name)) for group in groups]
        for batch in progress(inputs, f"calibrate (histograms, {len(groups)} passes)", len(inputs)):
            for group, runner in sessions:
                for tensor, values in zip(group, run(runner, group, {input_name: batch}, name)):
                    observer.update_values(tensor, values)
                del values
    return Calibration(observer.compute(), model, scales)
