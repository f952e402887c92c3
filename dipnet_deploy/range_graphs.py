"""ONNX graphs rewritten to measure tensors, and the sessions that run them (calibration and diagnosis).

- ``float_tensors``: what the QDQ quantizer may quantize; ``derived_ranges``: tensors whose exact
  per-channel range follows from another's (no reduction needed).
- ``range_model`` (portable NCHW) and ``native_range_model`` (onnxruntime's own optimized graph:
  fused Conv+LeakyRelu outputs in the blocked NCHWc layout) add per-channel ReduceMin/ReduceMax of
  each tensor and make only those small vectors graph outputs, so one forward costs little more
  than a plain one and its peak memory is one forward's.
- ``values_model`` exposes whole tensors, in groups that fit a memory budget (``group_by_budget``).
- ``session`` makes the sessions and ``run`` runs them; a runtime that cannot allocate what either needs is
  one ``OutOfMemoryError`` naming the model (``runtime.allocation_failures_named``): ``name``, its file where
  the caller knows it, else ``runtime.UNNAMED_MODEL``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from dipnet_deploy.errors import OutOfMemoryError
from dipnet_deploy.fileio import refuse_without_room, scratch_dir
from dipnet_deploy.runtime import ORT_LOG_FATAL_ONLY, UNNAMED_MODEL, allocation_failures_named, ort_options


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Graph input and every float node output but the graph output and constants, in graph order.

    These are what the QDQ quantizer may quantize. The model output is left in float, as
    onnxruntime's own calibrator does: quantizing it would only add error to the result.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    initializers = {init.name for init in model.graph.initializer}
    outputs = {vi.name for vi in model.graph.output}
    names = [vi.name for vi in model.graph.input if vi.name not in initializers]
    names += [out for node in model.graph.node if node.op_type != "Constant"  # (opset 11 Resize scales): no activation
              for out in node.output if out and out not in outputs]
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
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 17)
    if opset >= 18:  # opset 18 moved the reduced axes from an attribute to a second input
        graph.initializer.append(helper.make_tensor(REDUCED_AXES, TensorProto.INT64, [3], [0, 2, 3]))
        axes = {"inputs": [REDUCED_AXES], "attributes": {}}
    else:
        axes = {"inputs": [], "attributes": {"axes": [0, 2, 3]}}
    reductions = [helper.make_node(op, [name, *axes["inputs"]], [f"__calib_{op}_{index}"], keepdims=0,
                                   name=f"__calib_{op}_{index}", **axes["attributes"])
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
REDUCED_AXES = "__calib_axes"  # N, H and W: what is left is one value per channel


def native_range_model(model: onnx.ModelProto, tensors: list[str], name: str | Path = UNNAMED_MODEL) -> onnx.ModelProto:
    """``range_model`` rewritten onto onnxruntime's optimized graph for this CPU.

    onnxruntime runs convolutions in a blocked NCHWc layout (N, C/b, H, W, b in memory, C
    padded with zeros to whole blocks) and reorders a tensor to NCHW only for a reader that
    needs it; a reduction would be such a reader (a full copy per tensor), and a per-channel
    ReduceMax over the blocked buffer is 9x slower than a plain one. So the optimized graph is
    saved and each blocked tensor is reduced in place by the NCHWc GlobalMaxPool (max; min as
    -max(-x)), whose (1, C, 1, 1) result is in channel order with the padding last. Returns the
    model to run without further optimization.
    """
    with scratch_dir("dipnet-calib-") as work:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        options.log_severity_level = 3  # the "hardware specific" warning: intended, this model is used here only
        graph = range_model(model, tensors).SerializeToString()
        try:
            with allocation_failures_named(name, "onnxruntime"):
                ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except OutOfMemoryError:  # named: not a matter of room on disk
            raise
        except Exception:  # onnxruntime's own error types; the usual cause here is no room to save the model
            refuse_without_room(work, len(graph))
            raise
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
            arena: bool = False, name: str | Path = UNNAMED_MODEL) -> ort.InferenceSession:
    """A CPU session that keeps peak memory at what the live activations need.

    ``arena=False`` returns every freed activation to the OS (bounded RSS even when big outputs
    are handed to numpy); ``arena=True`` reuses freed blocks instead of page-faulting fresh ones
    (0.9 s of a 7 s 1080p forward), for graphs whose outputs are small. onnxruntime's memory
    pattern is off either way: its one planned block is twice the live peak (2.2 vs 1.15 GB).
    """
    options = ort_options()
    options.log_severity_level = ORT_LOG_FATAL_ONLY  # a failed forward is said in one line (``run``), not logged too
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = False
    # The default order runs the appended reductions last and keeps every activation alive
    # (8.5 GB at 1080p); priority-based order consumes each tensor as soon as it exists (1.2 GB).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not optimize:  # already optimized by onnxruntime for this CPU (native_range_model)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    with allocation_failures_named(name, "onnxruntime"):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(runner: ort.InferenceSession, outputs: list[str] | None, feeds: dict[str, np.ndarray],
        name: str | Path = UNNAMED_MODEL) -> list[np.ndarray]:
    """``runner.run(outputs, feeds)``; a runtime that cannot allocate what the forward needs: one
    ``OutOfMemoryError`` naming ``name``."""
    options = ort.RunOptions()
    options.log_severity_level = ORT_LOG_FATAL_ONLY
    with allocation_failures_named(name, "onnxruntime"):
        return runner.run(outputs, feeds, options)
