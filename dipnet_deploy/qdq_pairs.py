"""An int8 QDQ model's activation pairs (QuantizeLinear -> DequantizeLinear), and the model with some
of them taken out of int8.

A pair is read in the form ``qdq_graph.dequantize_early`` leaves a model (each DQ right behind its Q).
Taking a pair out (``float_fallback``) makes what read its DQ read the float tensor: the runtimes then run
the convolutions on both sides of it in float (they fuse DQ -> Conv -> Q into an integer convolution only
where a Q follows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class QdqPair:
    """One quantized activation: its float tensor, the Q node's output and the DQ outputs read."""

    tensor: str
    quantized: str
    dequantized: tuple[str, ...]
    producer: str  # op type of the node making ``tensor`` ("graph input" for the image)
    scale: float
    zero_point: int
    levels: tuple[int, int]  # the integer type's range: (0, 255) for uint8

    def float_range(self) -> list[float]:
        return [self.scale * (self.levels[0] - self.zero_point), self.scale * (self.levels[1] - self.zero_point)]


def activation_pairs(model: onnx.ModelProto) -> list[QdqPair]:
    """Every QuantizeLinear of a non-constant tensor with the DequantizeLinear nodes reading it, in graph order
    (``model`` as ``qdq_graph.dequantize_early`` leaves it: each DQ reading its Q). A Q whose output anything
    else reads (a crafted model's Slice or Pad of integers) forms no pair: taking it out would leave that
    reader on float values."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node.op_type for node in graph.node for output in node.output}
    readers: dict[str, list[str]] = {}
    others = set()  # tensors read by anything but a DequantizeLinear: no pair to take out
    for node in graph.node:
        for name in node.input:
            if node.op_type == "DequantizeLinear" and name == node.input[0]:
                readers.setdefault(name, []).append(node.output[0])
            else:
                others.add(name)
    pairs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers or node.output[0] in others:
            continue
        scale = numpy_helper.to_array(initializers[node.input[1]])
        zero_point = (numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2
                      else np.zeros(1, np.uint8))
        pairs.append(QdqPair(node.input[0], node.output[0], tuple(readers.get(node.output[0], ())),
                             producers.get(node.input[0], "graph input"), float(scale.reshape(-1)[0]),
                             int(zero_point.reshape(-1)[0]),
                             (int(np.iinfo(zero_point.dtype).min), int(np.iinfo(zero_point.dtype).max))))
    return pairs


def float_fallback(model: onnx.ModelProto, pairs: Iterable[QdqPair]) -> onnx.ModelProto:
    """A copy of ``model`` without the Q and DQ nodes of ``pairs``: what read a DQ output reads its float tensor;
    a conv left in float reads its weights dequantized (the same values, as float initializers)."""
    fallback = onnx.ModelProto()
    fallback.CopyFrom(model)
    graph = fallback.graph
    source = {name: pair.tensor for pair in pairs for name in (pair.quantized, *pair.dequantized)}
    kept = [node for node in graph.node if not set(node.output) & source.keys()]
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = source.get(name, name)
    # a DQ output that is a graph output keeps its name through an Identity
    kept += [helper.make_node("Identity", [source[out.name]], [out.name]) for out in graph.output if out.name in source]
    del graph.node[:]
    graph.node.extend(kept)
    _float_weights_of_float_convs(graph)
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]  # scales, zero points, int8 weights
    for init in unused:
        graph.initializer.remove(init)
    return fallback


def _dequantized(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    """What DequantizeLinear ``node`` of a constant computes: (int32(q) - zero point) x scale in float32, the scale
    and zero point along its axis when they are vectors."""
    values = numpy_helper.to_array(initializers[node.input[0]])
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
    zero_point = (numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2]
                  else np.zeros_like(scale, np.int32))
    if scale.ndim == 1 and values.ndim > 1:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((values.astype(np.int32) - zero_point.astype(np.int32)).astype(np.float32) * scale).astype(np.float32)


def _float_weights_of_float_convs(graph: onnx.GraphProto) -> None:
    """Give every Conv that no longer reads a dequantized activation and writes a quantized one (the runtimes
    run it in float) its weights and bias as float initializers, the values its DequantizeLinear nodes made:
    onnxruntime keeps the DQ of a weight for fusion and would otherwise run such a conv apart from the
    fp32 model's fast float layout."""
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folded = set()
    for conv in [node for node in graph.node if node.op_type == "Conv"]:
        source, after = producers.get(conv.input[0]), readers.get(conv.output[0], [])
        if (source is not None and source.op_type == "DequantizeLinear" and len(after) == 1
                and after[0].op_type == "QuantizeLinear"):
            continue  # an integer conv
        for index in range(1, len(conv.input)):
            dequantize = producers.get(conv.input[index])
            if (dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in initializers
                    or readers[dequantize.output[0]] != [conv]):
                continue
            name = f"{dequantize.input[0]}_float"
            graph.initializer.append(numpy_helper.from_array(_dequantized(dequantize, initializers), name))
            conv.input[index] = name
            folded.add(id(dequantize))
    kept = [node for node in graph.node if id(node) not in folded]
    del graph.node[:]
    graph.node.extend(kept)


def pairs_of(model: onnx.ModelProto, tensors: Iterable[str]) -> list[QdqPair]:
    """The activation pairs of ``model`` that quantize ``tensors`` (float tensor names); ValueError names
    one that has none."""
    by_tensor = {pair.tensor: pair for pair in activation_pairs(model)}
    missing = next((name for name in tensors if name not in by_tensor), None)
    if missing is not None:
        raise ValueError(f"tensor {missing!r} has no int8 Q/DQ pair in this model")
    return [by_tensor[name] for name in tensors]
