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
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

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
    session,
    tensor_shapes,
    values_model,
)

PASS2_BUDGET_BYTES = 768 << 20  # outputs of one pass-2 forward


# --------------------------------------------------------------------------- the calibration run

ChannelRanges = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def observe_ranges(model: onnx.ModelProto, tensors: list[str], channels: dict[str, int], inputs: Collection[np.ndarray],
                   progress: Progress) -> ChannelRanges:
    """Exact per-channel min and max of each tensor over all inputs, one forward per input.

    The tensors are read in onnxruntime's own optimized layout (``native_range_model``).
    ``channels``: channel count per tensor (drops blocked padding).
    """
    input_name = model.graph.input[0].name
    graph = native_range_model(model, tensors)
    runner = session(graph, optimize=False, arena=True)
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for batch in progress(inputs, "calibrate (min/max)", len(inputs)):
        values = dict(zip([vi.name for vi in graph.graph.output], runner.run(None, {input_name: batch})))
        for index, name in enumerate(tensors):
            seen_low = values[f"__calib_ReduceMin_{index}"].reshape(-1)[: channels[name]]
            seen_high = values[f"__calib_ReduceMax_{index}"].reshape(-1)[: channels[name]]
            low[name] = np.minimum(low[name], seen_low) if name in low else seen_low
            high[name] = np.maximum(high[name], seen_high) if name in high else seen_high
    return low, high


def channel_ranges(model: onnx.ModelProto, inputs: Collection[np.ndarray], progress: Progress = no_progress,
                   shapes: dict[str, list[int]] | None = None) -> ChannelRanges:
    """Per-channel min/max of every tensor of ``float_tensors`` over all inputs (pass 1)."""
    tensors = float_tensors(model)
    shapes = shapes if shapes is not None else tensor_shapes(model)
    derived = derived_ranges(model)
    channels = {name: shapes[name][1] for name in tensors}
    low, high = observe_ranges(model, [name for name in tensors if name not in derived], channels, inputs, progress)
    pending = {name: rule for name, rule in derived.items() if name in tensors}
    while pending:  # a source may itself be derived (DepthToSpace after an activation)
        ready = {name: rule for name, rule in pending.items() if rule[0] in low}
        if not ready:
            raise RuntimeError(f"no range source for {sorted(pending)}")
        for name, (source, mapping) in ready.items():
            low[name], high[name] = mapping(low[source], high[source])
            del pending[name]
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
) -> Calibration:
    """Run the calibration passes; iterating ``inputs`` yields one [1, 3, H, W] float32 array per image
    (it is iterated once per pass, so images are read again rather than kept).

    With ``equalize``, the ranges are those of ``equalize_with(model, scales)`` with the
    returned scales (the returned ``model``): pass 1 measures the original, and histogram methods
    run pass 2 on the equalized model.
    """
    input_name = model.graph.input[0].name
    shapes = tensor_shapes(model)
    tensors = float_tensors(model)  # equalization changes weights only: the same tensors after it
    low, high = channel_ranges(model, inputs, progress, shapes)
    scales = {}
    if equalize:
        spaces = channel_spaces(model)
        scales = equalization_scales(model, spaces, low, high, per_channel_weights, symmetric_activations)
        model = equalize_with(model, scales)
        low, high = equalized_channel_ranges(spaces, scales, low, high)
    for name in tensors:
        observer.update_range(name, float(low[name].min()), float(high[name].max()))
    if observer.needs_histograms:
        sizes = {name: 4 * int(np.prod(shape)) for name, shape in shapes.items()}
        groups = group_by_budget(tensors, sizes, budget_bytes)
        sessions = [(group, session(values_model(model, group))) for group in groups]
        for batch in progress(inputs, f"calibrate (histograms, {len(groups)} passes)", len(inputs)):
            for group, runner in sessions:
                for name, values in zip(group, runner.run(group, {input_name: batch})):
                    observer.update_values(name, values)
                del values
    return Calibration(observer.compute(), model, scales)
