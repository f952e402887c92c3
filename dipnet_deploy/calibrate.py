"""Stage 3: fp32 ONNX + calibration images -> activation ranges (streaming, bounded memory).

Why not onnxruntime's own calibrator: it makes every intermediate tensor a graph output and
keeps them for every image (8.6 GB for one 1080p frame of the x2 model). Here:

- Pass 1 (every method) adds per-channel min/max reductions of each float tensor and makes only
  those small vectors graph outputs; each activation is freed after its last consumer as usual,
  so peak memory is one forward's and the statistics are exact whole-image values. To cost
  little more than a plain forward, the reductions read the tensors where onnxruntime's
  optimized graph keeps them (see ``native_range_model``): fused Conv+LeakyRelu outputs, in the
  blocked NCHWc layout, with no reorder to NCHW and no fusion broken.
- Per-channel ranges let ``equalize`` rescale channels before quantization; the ranges of the
  rescaled model follow from them exactly, so this costs no pass.
- Pass 2 (histogram methods only) needs the values themselves: the tensors are split into
  groups whose outputs fit a memory budget, and each group is one extra forward per image.
  Histograms have a fixed range (pass 1's min/max) and a fixed bin count, so each image is
  reduced into fixed-size statistics and dropped.

One observer class per method behind one interface, as in onnxruntime's ``calibrate.py``.
"""

from __future__ import annotations

import math
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from dipnet_deploy.equalize import apply_equalization, channel_spaces, equalization_scales, equalized_channel_ranges

HISTOGRAM_BINS = 2048
PASS2_BUDGET_BYTES = 768 << 20  # outputs of one pass-2 forward


# --------------------------------------------------------------------------- observers


class Observer(ABC):
    """Reduces the activations seen over many images to one (min, max) per tensor."""

    method: str = ""
    needs_histograms = False

    def __init__(self) -> None:
        self.minimum: dict[str, float] = {}
        self.maximum: dict[str, float] = {}

    def update_range(self, name: str, low: float, high: float) -> None:
        self.minimum[name] = min(low, self.minimum.get(name, math.inf))
        self.maximum[name] = max(high, self.maximum.get(name, -math.inf))

    def update_values(self, name: str, values: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Histogram observers accumulate values here (pass 2)."""

    def parameters(self) -> dict:
        return {}

    @abstractmethod
    def compute(self) -> dict[str, tuple[float, float]]:
        """Final range per tensor."""


class MaxObserver(Observer):
    """``max``: the observed min/max over all images (the seed's "max" calibration)."""

    method = "max"

    def compute(self) -> dict[str, tuple[float, float]]:
        return {name: (self.minimum[name], self.maximum[name]) for name in self.minimum}


class HistogramObserver(Observer):
    """Base of the histogram methods: a fixed-range, fixed-bin histogram per tensor."""

    needs_histograms = True

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__()
        self.bins = bins
        self.histograms: dict[str, np.ndarray] = {}

    def edges(self, name: str) -> np.ndarray:
        low, high = self.minimum[name], self.maximum[name]
        return np.linspace(low, high if high > low else low + 1e-6, self.bins + 1)

    def update_values(self, name: str, values: np.ndarray) -> None:
        edges = self.edges(name)
        # Pass 2 runs another graph than pass 1's range reductions (unfused kernels): a value can land an
        # ulp outside [min, max], and np.histogram would silently drop it. Count it in the end bin.
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        self.histograms[name] = self.histograms.get(name, 0) + counts.astype(np.int64)

    def compute(self) -> dict[str, tuple[float, float]]:
        ranges = {}
        for name in self.minimum:
            histogram = self.histograms.get(name)
            if histogram is None or histogram.sum() == 0 or self.maximum[name] <= self.minimum[name]:
                ranges[name] = (self.minimum[name], self.maximum[name])
            else:
                ranges[name] = self.choose(histogram, self.edges(name))
        return ranges

    @abstractmethod
    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        """Range for one tensor from its histogram."""


class PercentileObserver(HistogramObserver):
    """``percentile``: clip each tail at (100 - p)% / p% of the observed values."""

    method = "percentile"

    def __init__(self, percentile: float = 99.999, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def parameters(self) -> dict:
        return {"percentile": self.percentile, "bins": self.bins}

    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        cdf = np.cumsum(histogram) / histogram.sum()
        tail = 1.0 - self.percentile / 100.0
        low_index = int(np.searchsorted(cdf, tail, side="left"))
        high_index = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        return float(edges[low_index]), float(edges[min(high_index + 1, len(edges) - 1)])


class EntropyObserver(HistogramObserver):
    """``entropy``: TensorRT-style KL-divergence threshold on 128 quantization levels per side.

    The positive and the negative side are thresholded separately (the histogram spans
    [min, max]), so asymmetric activations keep an asymmetric range.
    """

    method = "entropy"
    levels = 128

    def parameters(self) -> dict:
        return {"bins": self.bins, "levels": self.levels}

    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        zero = int(np.clip(np.searchsorted(edges, 0.0) - 1, 0, len(histogram)))
        high_side = histogram[zero:]
        low_side = histogram[:zero][::-1]
        width = edges[1] - edges[0]
        high = edges[zero] + width * self._kl_threshold_bins(high_side) if high_side.sum() else edges[-1]
        low = edges[zero] - width * self._kl_threshold_bins(low_side) if low_side.sum() else edges[0]
        return float(max(low, edges[0])), float(min(high, edges[-1]))

    def _kl_threshold_bins(self, histogram: np.ndarray) -> int:
        """Number of bins (from zero outwards) whose quantization minimizes KL(P || Q)."""
        histogram = histogram.astype(np.float64)
        size = len(histogram)
        if size <= self.levels:
            return size
        best, best_bins = math.inf, size
        for bins in range(self.levels, size + 1, max(1, (size - self.levels) // 256)):
            reference = histogram[:bins].copy()
            reference[-1] += histogram[bins:].sum()  # outliers clipped into the last bin
            candidate = self._quantize_histogram(histogram[:bins])
            divergence = self._kl(reference, candidate)
            if divergence < best:
                best, best_bins = divergence, bins
        return best_bins

    def _quantize_histogram(self, histogram: np.ndarray) -> np.ndarray:
        chunks = np.array_split(np.arange(len(histogram)), self.levels)
        expanded = np.zeros_like(histogram)
        for chunk in chunks:
            values = histogram[chunk]
            nonzero = values > 0
            if nonzero.any():
                expanded[chunk[nonzero]] = values.sum() / nonzero.sum()
        return expanded

    @staticmethod
    def _kl(p: np.ndarray, q: np.ndarray) -> float:
        p = p / p.sum()
        q_sum = q.sum()
        if q_sum == 0:
            return math.inf
        q = q / q_sum
        mask = p > 0
        if np.any(q[mask] == 0):
            return math.inf
        return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class MseObserver(HistogramObserver):
    """``mse``: the range minimizing the expected uint8 quantization MSE of the histogram."""

    method = "mse"
    steps = 200

    def parameters(self) -> dict:
        return {"bins": self.bins, "steps": self.steps, "levels": 256}

    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        centres = (edges[:-1] + edges[1:]) / 2
        counts = histogram.astype(np.float64)
        low0, high0 = min(edges[0], 0.0), max(edges[-1], 0.0)
        best, best_range = math.inf, (float(edges[0]), float(edges[-1]))
        # Shrink both ends towards zero in the same proportion, as a quantizer keeps 0 exact.
        for fraction in np.linspace(1.0, 0.05, self.steps):
            low, high = low0 * fraction, high0 * fraction
            scale = (high - low) / 255.0
            if scale <= 0:
                continue
            zero_point = np.round(-low / scale)
            quantized = (np.clip(np.round(centres / scale) + zero_point, 0, 255) - zero_point) * scale
            error = float(np.sum(counts * (centres - quantized) ** 2))
            if error < best:
                best, best_range = error, (float(low), float(high))
        return best_range


OBSERVERS: dict[str, type[Observer]] = {
    cls.method: cls for cls in (MaxObserver, PercentileObserver, EntropyObserver, MseObserver)
}


def make_observer(method: str, percentile: float = 99.999) -> Observer:
    if method == "percentile":
        return PercentileObserver(percentile)
    return OBSERVERS[method]()


# --------------------------------------------------------------------------- graph plumbing


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Graph input and every float node output but the graph output, in graph order.

    These are what the QDQ quantizer may quantize. The model output is left in float, as
    onnxruntime's own calibrator does: quantizing it would only add error to the result.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    initializers = {init.name for init in model.graph.initializer}
    outputs = {vi.name for vi in model.graph.output}
    names = [vi.name for vi in model.graph.input if vi.name not in initializers]
    names += [out for node in model.graph.node for out in node.output if out and out not in outputs]
    return [name for name in names if types.get(name) == TensorProto.FLOAT]


RangeMap = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def derived_ranges(model: onnx.ModelProto) -> dict[str, tuple[str, RangeMap]]:
    """Tensors whose exact per-channel min/max follow from another tensor's: tensor -> (source, map).

    DepthToSpace only moves values (each output channel gathers blocksize^2 input channels).
    LeakyRelu is strictly increasing, so min/max commute with it both ways. Where the LeakyRelu
    is its input's only reader, onnxruntime fuses it into the producing Conv and only the
    activated tensor exists: that one is reduced and the pre-activation range is mapped back
    (dividing by alpha: exact up to one float rounding). Otherwise the input is reduced and
    mapped forward (the kernel's own float32 product).
    """
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_inputs = {vi.name for vi in model.graph.input}
    derived: dict[str, tuple[str, RangeMap]] = {}
    for node in model.graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DepthToSpace":
            derived[node.output[0]] = (node.input[0], partial(_depth_to_space_range, attributes["blocksize"] ** 2,
                                                              attributes.get("mode", b"DCR") == b"CRD"))
        elif node.op_type == "LeakyRelu":
            alpha = np.float32(attributes.get("alpha", 0.01))
            source, activated = node.input[0], node.output[0]
            if readers.get(source) == 1 and source not in graph_inputs and alpha > 0:  # alpha 0 is not invertible
                derived[source] = (activated, partial(_leaky_relu_range, np.divide, alpha))
            else:
                derived[activated] = (source, partial(_leaky_relu_range, np.multiply, alpha))
    return derived


def _leaky_relu_range(operation: np.ufunc, alpha: np.float32, low: np.ndarray, high: np.ndarray):
    """LeakyRelu (``np.multiply``) or its inverse (``np.divide``) applied to range bounds."""
    return tuple(np.where(bound >= 0, bound, operation(bound, alpha)) for bound in (low, high))


def _depth_to_space_range(block: int, channel_major: bool, low: np.ndarray, high: np.ndarray):
    """Per-output-channel range of DepthToSpace: DCR reads channel (i, c), CRD channel (c, i)."""
    shape, axis = ((-1, block), 1) if channel_major else ((block, -1), 0)
    return low.reshape(shape).min(axis=axis), high.reshape(shape).max(axis=axis)


def range_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose only outputs are per-channel ReduceMin/ReduceMax of the tensors.

    Every tensor here is NCHW (or onnxruntime's blocked N, C/b, H, W, b): reducing axes 0, 2, 3
    leaves the channels either way.
    """
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    reductions = [helper.make_node(op, [name], [f"__calib_{op}_{index}"], axes=[0, 2, 3], keepdims=0,
                                   name=f"__calib_{op}_{index}")
                  for index, name in enumerate(tensors) for op in ("ReduceMin", "ReduceMax")]
    place_after_producers(graph, reductions)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None) for node in reductions)
    return augmented


def place_after_producers(graph: onnx.GraphProto, extra: list[onnx.NodeProto]) -> None:
    """Put each extra node right after the node that makes its first input (graph inputs first).

    onnxruntime's priority-based order breaks ties by position, so each reduction runs as soon
    as its tensor exists and the tensor is freed as early as in the plain graph. Extra nodes may
    read each other's outputs.
    """
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in extra:
        by_input.setdefault(node.input[0], []).append(node)
    produced = {out for node in [*graph.node, *extra] for out in node.output}
    nodes: list[onnx.NodeProto] = []

    def emit(node: onnx.NodeProto) -> None:
        nodes.append(node)
        for out in node.output:
            for reader in by_input.get(out, []):
                emit(reader)

    for name, readers in by_input.items():
        if name not in produced:
            for reader in readers:
                emit(reader)
    for node in list(graph.node):
        emit(node)
    del graph.node[:]
    graph.node.extend(nodes)


NCHWC_DOMAIN = "com.microsoft.nchwc"


def native_range_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """``range_model`` rewritten onto onnxruntime's optimized graph for this CPU.

    onnxruntime runs convolutions in a blocked NCHWc layout (N, C/b, H, W, b in memory, C
    padded with zeros to whole blocks) and reorders a tensor to NCHW only for a reader that
    needs it; a reduction would be such a reader (a full copy per tensor), and a per-channel
    ReduceMax over the blocked buffer is 9x slower than a plain one. So the optimized graph is
    saved and each blocked tensor is reduced in place by the NCHWc GlobalMaxPool (max; min as
    -max(-x)), whose (1, C, 1, 1) result is in channel order with the padding last. Returns the
    model to run without further optimization.
    """
    with tempfile.TemporaryDirectory(prefix="dipnet-calib-") as work:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        options.log_severity_level = 3  # the "hardware specific" warning: intended, this model is used here only
        ort.InferenceSession(range_model(model, tensors).SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    graph = optimized.graph
    producer = {out: node for node in graph.node for out in node.output}
    extra = []
    for node in graph.node:
        if not node.name.startswith("__calib_"):
            continue
        source = producer.get(node.input[0])
        if source is None or source.domain != NCHWC_DOMAIN or source.op_type != "ReorderOutput":
            extra.append(node)
            continue
        blocked, result = source.input[0], node.output[0]
        if node.op_type == "ReduceMax":
            extra.append(helper.make_node("GlobalMaxPool", [blocked], [result], name=node.name, domain=NCHWC_DOMAIN))
        else:
            extra += [helper.make_node("Neg", [blocked], [f"{result}_neg"], name=f"{node.name}_neg"),
                      helper.make_node("GlobalMaxPool", [f"{result}_neg"], [f"{result}_negmax"], name=node.name,
                                       domain=NCHWC_DOMAIN),
                      helper.make_node("Neg", [f"{result}_negmax"], [result], name=f"{node.name}_min")]
    for output in graph.output:  # a blocked result is (1, C padded, 1, 1), not the (C,) inferred before
        output.type.tensor_type.ClearField("shape")
    readers = [node for node in graph.node if not node.name.startswith("__calib_")] + extra
    still_read = {name for node in readers for name in node.input} | {vi.name for vi in graph.output}
    kept = [node for node in graph.node if not node.name.startswith("__calib_")
            and not (node.op_type == "ReorderOutput" and node.output[0] not in still_read)]
    del graph.node[:]
    graph.node.extend(kept)
    place_after_producers(graph, extra)
    return optimized


def values_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose outputs are the given tensors."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    for name in tensors:
        augmented.graph.output.append(helper.make_empty_tensor_value_info(name))
    return augmented


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shape of every tensor shape inference can fix."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(dims):
            shapes[vi.name] = dims
    return shapes


def group_by_budget(tensors: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    groups, current, used = [], [], 0
    for name in tensors:
        size = sizes.get(name, budget)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return groups + ([current] if current else [])


def session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True,
            arena: bool = False) -> ort.InferenceSession:
    """A CPU session that keeps peak memory at what the live activations need.

    ``arena=False`` returns every freed activation to the OS (bounded RSS even when big outputs
    are handed to numpy); ``arena=True`` reuses freed blocks instead of page-faulting fresh ones
    (0.9 s of a 7 s 1080p forward), for graphs whose outputs are small. onnxruntime's memory
    pattern is off either way: its one planned block is twice the live peak (2.2 vs 1.15 GB).
    """
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = False
    # The default order runs the appended reductions last and keeps every activation alive
    # (8.5 GB at 1080p); priority-based order consumes each tensor as soon as it exists (1.2 GB).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not optimize:  # already optimized by onnxruntime for this CPU (native_range_model)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- the calibration run

Progress = Callable[[Collection, str], Iterable]


ChannelRanges = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def observe_ranges(model: onnx.ModelProto, tensors: list[str], channels: dict[str, int], inputs: Collection[np.ndarray],
                   progress: Progress, native: bool = True) -> ChannelRanges:
    """Exact per-channel min and max of each tensor over all inputs, one forward per input.

    ``native`` reads the tensors in onnxruntime's own optimized layout (fast); the portable
    graph reads them in NCHW. ``channels``: channel count per tensor (drops blocked padding).
    """
    input_name = model.graph.input[0].name
    graph = native_range_model(model, tensors) if native else range_model(model, tensors)
    runner = session(graph, optimize=not native, arena=True)
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for batch in progress(inputs, "calibrate (min/max)"):
        values = dict(zip([vi.name for vi in graph.graph.output], runner.run(None, {input_name: batch})))
        for index, name in enumerate(tensors):
            seen_low = values[f"__calib_ReduceMin_{index}"].reshape(-1)[: channels[name]]
            seen_high = values[f"__calib_ReduceMax_{index}"].reshape(-1)[: channels[name]]
            low[name] = np.minimum(low[name], seen_low) if name in low else seen_low
            high[name] = np.maximum(high[name], seen_high) if name in high else seen_high
    return low, high


def channel_ranges(model: onnx.ModelProto, inputs: Collection[np.ndarray], progress: Progress = lambda it, _d: it,
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
    """Per-tensor ranges of the model to quantize, and the equalization factors it was made with."""

    ranges: dict[str, tuple[float, float]]
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # channel space key -> factors


def calibrate(
    model: onnx.ModelProto,
    inputs: Collection[np.ndarray],
    observer: Observer,
    progress: Progress = lambda it, _desc: it,
    equalize: bool = False,
    per_channel_weights: bool = True,
    symmetric_activations: bool = False,
    budget_bytes: int = PASS2_BUDGET_BYTES,
) -> Calibration:
    """Run the calibration passes; iterating ``inputs`` yields one [1, 3, H, W] float32 array per image
    (it is iterated once per pass, so images are read again rather than kept).

    With ``equalize``, the ranges are those of ``apply_equalization(model, ...)`` with the
    returned factors: pass 1 measures the original, and histogram methods run pass 2 on the
    equalized model.
    """
    input_name = model.graph.input[0].name
    shapes = tensor_shapes(model)
    tensors = float_tensors(model)  # equalization changes weights only: the same tensors after it
    low, high = channel_ranges(model, inputs, progress, shapes)
    scales = {}
    if equalize:
        spaces = channel_spaces(model)
        scales = equalization_scales(model, spaces, low, high, per_channel_weights, symmetric_activations)
        model = apply_equalization(model, spaces, scales)
        low, high = equalized_channel_ranges(spaces, scales, low, high)
    for name in tensors:
        observer.update_range(name, float(low[name].min()), float(high[name].max()))
    if observer.needs_histograms:
        sizes = {name: 4 * int(np.prod(shape)) for name, shape in shapes.items()}
        groups = group_by_budget(tensors, sizes, budget_bytes)
        sessions = [(group, session(values_model(model, group))) for group in groups]
        for batch in progress(inputs, f"calibrate (histograms, {len(groups)} passes)"):
            for group, runner in sessions:
                for name, values in zip(group, runner.run(group, {input_name: batch})):
                    observer.update_values(name, values)
                del values
    return Calibration(observer.compute(), scales)
