"""Stage 3: fp32 ONNX + calibration images -> activation ranges (streaming, bounded memory).

Why not onnxruntime's own calibrator: it makes every intermediate tensor a graph output and
keeps them for every image (8.6 GB for one 1080p frame of the x2 model). Here:

- Pass 1 (every method) adds a ReduceMin and a ReduceMax node per float tensor and makes only
  those scalars graph outputs; each activation is freed after its last consumer as usual, so
  peak memory is one forward's and the statistics are exact whole-image min/max. To cost little
  more than a plain forward, the reductions read the tensors where onnxruntime's optimized
  graph keeps them (see ``native_range_model``): fused Conv+LeakyRelu outputs, in the blocked
  NCHWc layout, with no reorder to NCHW and no fusion broken.
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
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

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
        counts, _ = np.histogram(values, bins=edges)
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


def derived_ranges(model: onnx.ModelProto) -> dict[str, tuple[str, Callable[[float], float]]]:
    """Tensors whose exact min/max follow from another tensor's: tensor -> (source, monotone map).

    DepthToSpace only moves values. LeakyRelu is strictly increasing, so min/max commute with
    it both ways. Where the LeakyRelu is its input's only reader, onnxruntime fuses it into the
    producing Conv and only the activated tensor exists: that one is reduced and the
    pre-activation range is mapped back (dividing by alpha: exact up to one float rounding).
    Otherwise the input is reduced and mapped forward (the kernel's own float32 product).
    """
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_inputs = {vi.name for vi in model.graph.input}
    derived: dict[str, tuple[str, Callable[[float], float]]] = {}
    for node in model.graph.node:
        if node.op_type == "DepthToSpace":
            derived[node.output[0]] = (node.input[0], lambda v: v)
        elif node.op_type == "LeakyRelu":
            alpha = np.float32(next((a.f for a in node.attribute if a.name == "alpha"), 0.01))
            source, activated = node.input[0], node.output[0]
            if readers.get(source) == 1 and source not in graph_inputs and alpha > 0:  # alpha 0 is not invertible
                derived[source] = (activated, lambda v, a=alpha: v if v >= 0 else float(np.float32(v) / a))
            else:
                derived[activated] = (source, lambda v, a=alpha: v if v >= 0 else float(np.float32(v) * a))
    return derived


def range_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose only outputs are per-tensor ReduceMin/ReduceMax scalars."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    reductions = [helper.make_node(op, [name], [f"__calib_{op}_{index}"], keepdims=0, name=f"__calib_{op}_{index}")
                  for index, name in enumerate(tensors) for op in ("ReduceMin", "ReduceMax")]
    place_after_producers(graph, reductions)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, []) for node in reductions)
    return augmented


def place_after_producers(graph: onnx.GraphProto, extra: list[onnx.NodeProto]) -> None:
    """Put each extra node right after the node that makes its input (graph inputs first).

    onnxruntime's priority-based order breaks ties by position, so each reduction runs as soon
    as its tensor exists and the tensor is freed as early as in the plain graph.
    """
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in extra:
        by_input.setdefault(node.input[0], []).append(node)
    produced = {out for node in graph.node for out in node.output}
    nodes = [node for name, readers in by_input.items() if name not in produced for node in readers]
    for node in graph.node:
        nodes.append(node)
        nodes.extend(reader for out in node.output for reader in by_input.get(out, []))
    del graph.node[:]
    graph.node.extend(nodes)


NCHWC_DOMAIN = "com.microsoft.nchwc"


def native_range_model(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """``range_model`` rewritten onto onnxruntime's optimized graph for this CPU.

    onnxruntime runs convolutions in a blocked NCHWc layout and reorders a tensor to NCHW only
    for a reader that needs it; a reduction would be such a reader (a full copy per tensor).
    Min and max do not depend on the layout, so here the optimized graph is saved and each
    reduction is pointed at the blocked tensor itself. Blocking pads channels with zeros (24
    channels are 32 with 16-lane blocks), so a padded tensor's range also covers 0: the Size
    output ``__calib_Size_<i>`` of the i-th blocked tensor tells whether it is padded. Returns
    the model (to run without further optimization) and the names of the blocked tensors.
    """
    with tempfile.TemporaryDirectory(prefix="dipnet-calib-") as work:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        options.log_severity_level = 3  # the "hardware specific" warning: intended, this model is used here only
        ort.InferenceSession(range_model(model, tensors).SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    graph = optimized.graph
    producer = {out: node for node in graph.node for out in node.output}
    reductions = [node for node in graph.node if node.name.startswith("__calib_")]
    blocked: dict[str, str] = {}  # original tensor -> its blocked twin
    for node in reductions:
        source = producer.get(node.input[0])
        if source is not None and source.domain == NCHWC_DOMAIN and source.op_type == "ReorderOutput":
            blocked[node.input[0]] = source.input[0]
            node.input[0] = source.input[0]
    sizes = [helper.make_node("Size", [twin], [f"__calib_Size_{index}"], name=f"__calib_Size_{index}")
             for index, twin in enumerate(blocked.values())]
    still_read = {name for node in graph.node for name in node.input} | {vi.name for vi in graph.output}
    kept = [node for node in graph.node if not node.name.startswith("__calib_")
            and not (node.op_type == "ReorderOutput" and node.output[0] not in still_read)]
    del graph.node[:]
    graph.node.extend(kept)
    place_after_producers(graph, reductions + sizes)
    graph.output.extend(helper.make_tensor_value_info(node.output[0], TensorProto.INT64, []) for node in sizes)
    return optimized, list(blocked)


def values_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose outputs are the given tensors."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    for name in tensors:
        augmented.graph.output.append(helper.make_empty_tensor_value_info(name))
    return augmented


def tensor_bytes(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(dims):
            sizes[vi.name] = 4 * int(np.prod(dims))
    return sizes


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


def observe_ranges(model: onnx.ModelProto, tensors: list[str], sizes: dict[str, int], inputs: Collection[np.ndarray],
                   progress: Progress, native: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """Exact min and max of each tensor over all inputs, one forward per input.

    ``native`` reads the tensors in onnxruntime's own optimized layout (fast); the portable
    graph reads them in NCHW. Padded blocked tensors whose range came out touching 0 might owe
    that 0 to the padding: only those are measured again with the portable graph. ``sizes``:
    bytes per tensor (``tensor_bytes``).
    """
    input_name = model.graph.input[0].name
    if native:
        graph, blocked = native_range_model(model, tensors)
        runner = session(graph, optimize=False, arena=True)
    else:
        graph, blocked = range_model(model, tensors), []
        runner = session(graph, arena=True)
    names = [vi.name for vi in graph.graph.output]
    elements = {name: size // 4 for name, size in sizes.items()}
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    padded: set[str] = set()
    for batch in progress(inputs, "calibrate (min/max)"):
        values = dict(zip(names, runner.run(None, {input_name: batch})))
        padded |= {name for index, name in enumerate(blocked) if int(values[f"__calib_Size_{index}"]) != elements[name]}
        for index, name in enumerate(tensors):
            low[name] = min(low.get(name, math.inf), float(values[f"__calib_ReduceMin_{index}"]))
            high[name] = max(high.get(name, -math.inf), float(values[f"__calib_ReduceMax_{index}"]))
    del runner
    unsure = [name for name in tensors if name in padded and (low[name] == 0.0 or high[name] == 0.0)]
    if unsure:
        again = observe_ranges(model, unsure, sizes, inputs, progress, native=False)
        for name in unsure:
            low[name], high[name] = again[0][name], again[1][name]
    return low, high


def calibrate(
    model: onnx.ModelProto,
    inputs: Collection[np.ndarray],
    observer: Observer,
    progress: Progress = lambda it, _desc: it,
    budget_bytes: int = PASS2_BUDGET_BYTES,
) -> dict[str, tuple[float, float]]:
    """Run the calibration passes; iterating ``inputs`` yields one [1, 3, H, W] float32 array per image
    (it is iterated once per pass, so images are read again rather than kept)."""
    input_name = model.graph.input[0].name
    tensors = float_tensors(model)
    derived = derived_ranges(model)
    sizes = tensor_bytes(model)
    low, high = observe_ranges(model, [name for name in tensors if name not in derived], sizes, inputs, progress)
    pending = {name: rule for name, rule in derived.items() if name in tensors}
    while pending:  # a source may itself be derived (DepthToSpace after an activation)
        ready = {name: rule for name, rule in pending.items() if rule[0] in low}
        if not ready:
            raise RuntimeError(f"no range source for {sorted(pending)}")
        for name, (source, monotone) in ready.items():
            low[name], high[name] = monotone(low[source]), monotone(high[source])
            del pending[name]
    for name in tensors:
        observer.update_range(name, low[name], high[name])
    if observer.needs_histograms:
        groups = group_by_budget(tensors, sizes, budget_bytes)
        sessions = [(group, session(values_model(model, group))) for group in groups]
        for batch in progress(inputs, f"calibrate (histograms, {len(groups)} passes)"):
            for group, runner in sessions:
                for name, values in zip(group, runner.run(group, {input_name: batch})):
                    observer.update_values(name, values)
                del values
    return observer.compute()
