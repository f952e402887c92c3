"""The int8 QDQ graph in the form the runtimes run fastest, each rewrite exact (bit-identical output).

onnxruntime's quantizer writes every activation as QuantizeLinear -> DequantizeLinear (Q/DQ) and every
weight as an int8 initializer behind a DequantizeLinear; the runtimes fuse DQ -> Conv -> Q into one
integer convolution. Two rewrites on top of that:

- ``depth_to_space_on_uint8``: the DequantizeLinear in front of DepthToSpace moves behind it, so the
  pixel shuffle moves uint8 levels (a quarter of the bytes).
- ``pad_for_fast_path``: onnxruntime's CPU integer convolution has a fast "symmetric" kernel (MLAS
  ``convsym``: int8 weights with zero point 0, uint8 activations) only for convolutions whose input
  channels are a multiple of ``FAST_PATH.input_multiple`` and whose output channels are at least
  ``FAST_PATH.min_outputs`` and a multiple of ``FAST_PATH.output_multiple`` (x86-64: AVX2 and AVX-VNNI
  need 4 / 16 / 8, AVX-512 4 / 16 / 4; the values here serve all of them). A conv outside that runs the
  generic path, several times slower per multiply-accumulate. Padding it with zero weights puts it on
  the fast path: zero input channels (a uint8 Pad of the activation with its zero point) add exact
  zeros to the integer sums, and zero output channels are dropped by a uint8 Slice right after their
  QuantizeLinear, before anything reads them.

``dequantize_early`` undoes the moves (each DQ right behind its Q again), the form in which an
activation's Q/DQ pair can be read or taken out (``diagnose``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper


class FastPath(NamedTuple):
    """Channel counts a conv needs for the fast integer kernel (see the module docstring)."""

    input_multiple: int = 4
    min_outputs: int = 16
    output_multiple: int = 8


FAST_PATH = FastPath()


def _swap_with_reader(model: onnx.ModelProto, first_op: str, second_op: str) -> None:
    """Swap each ``first_op`` node with the ``second_op`` node that is its only reader, in place: the
    second then reads the first's input and the first writes the second's output. Both must commute
    (a per-tensor DequantizeLinear and DepthToSpace, which only moves values). The tensor between
    them is named ``{input}_{second_op}`` (with a number where that name is taken); the value_info of the
    one it replaces is dropped."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {out.name for out in graph.output}
    names = {*producers, *(init.name for init in graph.initializer), *(vi.name for vi in graph.input), *outputs}
    sizes = {init.name: math.prod(init.dims) for init in graph.initializer}
    types = {init.name: init.data_type for init in graph.initializer}
    order = list(graph.node)
    for second in [node for node in graph.node if node.op_type == second_op]:
        first = producers.get(second.input[0])
        if first is None or first.op_type != first_op or readers[first.output[0]] != [second] or first.output[0] in outputs:
            continue
        dequantize = first if first.op_type == "DequantizeLinear" else second
        if sizes.get(dequantize.input[1]) != 1:  # per-channel scales do not survive a move of the channels
            continue
        zero_point = types.get(dequantize.input[2]) if len(dequantize.input) > 2 else onnx.TensorProto.UINT8
        if zero_point not in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8):  # no 16-bit DepthToSpace kernel
            continue
        replaced, between, index = first.output[0], f"{first.input[0]}_{second_op}", 1
        while between in names:  # never reuse a name the graph already has
            between, index = f"{first.input[0]}_{second_op}_{index}", index + 1
        names.add(between)
        second.input[0], first.input[0], first.output[0], second.output[0] = (
            first.input[0], between, second.output[0], between)
        order.remove(first)
        order.insert(order.index(second) + 1, first)
        stale = [info for info in graph.value_info if info.name == replaced]
        for info in stale:
            graph.value_info.remove(info)
    del graph.node[:]
    graph.node.extend(order)


def depth_to_space_on_uint8(int8: onnx.ModelProto) -> onnx.ModelProto:
    """Move the DequantizeLinear in front of DepthToSpace behind it, in place: DepthToSpace then
    moves the uint8 levels of the last conv instead of their float values (a quarter of the bytes;
    the output is bit-identical), which both runtimes run faster (BENCHMARKS.md)."""
    _swap_with_reader(int8, "DequantizeLinear", "DepthToSpace")
    return int8


def dequantize_early(int8: onnx.ModelProto) -> onnx.ModelProto:
    """Undo ``pad_for_fast_path`` and ``depth_to_space_on_uint8`` in place: the QDQ graph as onnxruntime's
    quantizer wrote it, every DequantizeLinear right behind its QuantizeLinear (bit-identical output: the
    padding is exact). The form in which an activation's Q/DQ pair can be read or taken out (``diagnose``)."""
    unpad(int8)
    _swap_with_reader(int8, "DepthToSpace", "DequantizeLinear")
    return int8


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def _padded(array: np.ndarray, axis: int, size: int, value: float = 0) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return np.pad(array, widths, constant_values=np.asarray(value, array.dtype))


class _Graph:
    """Name lookups over a graph being rewritten, and fresh names."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.names = {*self.producers, *self.initializers, *(vi.name for vi in graph.input),
                      *(vi.name for vi in graph.output)}
        self.reshaped: set[str] = set()  # tensors whose recorded shapes (value_info) no longer hold
        self.before: dict[int, list[onnx.NodeProto]] = {}  # new nodes, by id of the node they precede
        self.after: dict[int, list[onnx.NodeProto]] = {}
        self.removed: set[int] = set()  # ids of nodes to leave out

    def insert(self, nodes: list[onnx.NodeProto], before: onnx.NodeProto | None = None,
               after: onnx.NodeProto | None = None) -> None:
        """Place ``nodes`` next to an existing node when ``commit`` rebuilds the node list (protobuf copies
        what a list rebuild adds, so the graph's own nodes are edited in place until then)."""
        anchor, where = (before, self.before) if before is not None else (after, self.after)
        where.setdefault(id(anchor), []).extend(nodes)

    def commit(self) -> None:
        order = [new for node in self.graph.node if id(node) not in self.removed
                 for new in (*self.before.get(id(node), ()), node, *self.after.get(id(node), ()))]
        used = {name for node in order for name in node.input}
        dropped = {name for node in self.graph.node if id(node) in self.removed for name in node.input} - used
        for init in [init for init in self.graph.initializer if init.name in dropped]:  # a Slice's or Pad's constants
            self.graph.initializer.remove(init)
        del self.graph.node[:]
        self.graph.node.extend(order)
        for info in [info for info in self.graph.value_info if info.name in self.reshaped]:
            self.graph.value_info.remove(info)

    def array(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def replace(self, name: str, array: np.ndarray) -> None:
        self.initializers[name].CopyFrom(numpy_helper.from_array(array, name))

    def fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self.names:
            name, index = f"{base}_{index}", index + 1
        self.names.add(name)
        return name

    def constant(self, base: str, values: list[int]) -> str:
        name = self.fresh(base)
        init = numpy_helper.from_array(np.asarray(values, np.int64), name)
        self.graph.initializer.append(init)
        self.initializers[name] = init
        return name

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return [node for node in self.graph.node if name in node.input]


class _QuantizedConv(NamedTuple):
    conv: onnx.NodeProto
    input_dq: onnx.NodeProto  # DQ of the uint8 activation
    weight: str  # int8 initializer, [out, in, kh, kw]
    constants: list[tuple[onnx.NodeProto | None, str]]  # (DQ or None, initializer) of the weight and bias
    output_q: onnx.NodeProto  # the only reader of the conv's output


def _quantized_conv(g: _Graph, conv: onnx.NodeProto) -> _QuantizedConv | None:
    """The parts of an integer conv the runtime fuses, or None where ``conv`` is not one (or not plainly)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    input_dq, weight_dq = (g.producers.get(name) for name in conv.input[:2])
    readers = g.readers(conv.output[0])
    if (attributes.get("group", 1) != 1 or input_dq is None or weight_dq is None
            or input_dq.op_type != "DequantizeLinear" or weight_dq.op_type != "DequantizeLinear"
            or len(readers) != 1 or readers[0].op_type != "QuantizeLinear"):
        return None
    weight = g.array(weight_dq.input[0])
    if weight is None or weight.dtype != np.int8 or weight.ndim != 4:
        return None
    if not (_eight_bit(g, input_dq) and _eight_bit(g, readers[0])):  # a 16-bit activation: no integer kernel
        return None
    constants = [(weight_dq, weight_dq.input[0])]
    if len(conv.input) > 2 and conv.input[2]:
        bias_dq = g.producers.get(conv.input[2])
        if bias_dq is not None and bias_dq.op_type == "DequantizeLinear" and bias_dq.input[0] in g.initializers:
            constants.append((bias_dq, bias_dq.input[0]))
        elif conv.input[2] in g.initializers:
            constants.append((None, conv.input[2]))
        else:
            return None
    return _QuantizedConv(conv, input_dq, weight_dq.input[0], constants, readers[0])


def _eight_bit(g: _Graph, node: onnx.NodeProto) -> bool:
    """Whether a Q or DQ node works on 8-bit integers (its zero point's type; none: uint8)."""
    zero_point = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.uint8)
    return zero_point is not None and zero_point.dtype in (np.uint8, np.int8)


def _per_channel(g: _Graph, name: str, channels: int) -> bool:
    """Whether initializer ``name`` holds one value per output channel (a 0-d scale holds one for all)."""
    array = g.array(name)
    return array is not None and array.ndim == 1 and array.size == channels


def _pad_outputs(g: _Graph, part: _QuantizedConv, outputs: int, padded: int) -> None:
    """Zero filters up to ``padded`` output channels; a uint8 Slice right after the Q drops them again."""
    # the filters' scale may be any positive one (1); the bias's must be the input's times the filters', else
    # onnxruntime does not fuse the conv into an integer one
    input_scale = float(np.asarray(g.array(part.input_dq.input[1])).reshape(-1)[0])
    for (dequantize, values), scale in zip(part.constants, (1.0, input_scale)):
        g.replace(values, _padded(g.array(values), 0, padded))
        for index, name in enumerate(dequantize.input[1:] if dequantize is not None else ()):
            if name and _per_channel(g, name, outputs):
                g.replace(name, _padded(g.array(name), 0, padded, 0 if index else scale))
    quantized = part.output_q.output[0]
    g.reshaped |= {part.conv.output[0], quantized}
    kept = g.fresh(f"{quantized}_Slice")
    slice_node = helper.make_node(
        "Slice", [quantized, g.constant(f"{kept}_starts", [0]), g.constant(f"{kept}_ends", [outputs]),
                  g.constant(f"{kept}_axes", [1])], [kept], name=g.fresh(f"{part.conv.name}_fast_path_Slice"))
    for reader in g.readers(quantized):
        for index, name in enumerate(reader.input):
            if name == quantized:
                reader.input[index] = kept
    g.insert([slice_node], after=part.output_q)


def _input_paddable(g: _Graph, part: _QuantizedConv) -> bool:
    """Whether zero input channels can be added exactly: the DQ reads a Q of zero point 0 (a Pad with 0 is
    then a Pad with the zero point, and ``unpad`` can take it out again)."""
    quantize = g.producers.get(part.input_dq.input[0])
    zero_point = g.array(part.input_dq.input[2]) if len(part.input_dq.input) > 2 else np.zeros(1)
    return (quantize is not None and quantize.op_type == "QuantizeLinear" and zero_point is not None
            and not np.any(zero_point != 0))


def _pad_inputs(g: _Graph, part: _QuantizedConv, padded: int) -> None:
    """Zero weights for the extra input channels, and the uint8 activation padded with 0, its zero point (it
    then dequantizes to exact zeros), between its Q and this conv's DQ (a DQ of its own where others read
    the DQ too). Only where ``_input_paddable``."""
    quantize = g.producers[part.input_dq.input[0]]
    channels = g.array(part.weight).shape[1]
    g.replace(part.weight, _padded(g.array(part.weight), 1, padded))
    grown = g.fresh(f"{quantize.output[0]}_Pad")
    pads = [0, 0, 0, 0, 0, padded - channels, 0, 0]  # begin of N, C, H, W, then their ends
    new = [helper.make_node("Pad", [quantize.output[0], g.constant(f"{grown}_pads", pads)], [grown],
                            name=g.fresh(f"{part.conv.name}_fast_path_Pad"), mode="constant")]
    if len(g.readers(part.input_dq.output[0])) == 1:
        part.input_dq.input[0] = grown
        g.reshaped.add(part.input_dq.output[0])
        g.insert(new, before=part.input_dq)
    else:
        dequantized = g.fresh(f"{grown}_DequantizeLinear_Output")
        new.append(helper.make_node("DequantizeLinear", [grown, *part.input_dq.input[1:]], [dequantized],
                                    name=g.fresh(f"{part.conv.name}_fast_path_DequantizeLinear")))
        part.conv.input[0] = dequantized
        g.insert(new, before=part.conv)


def unpad(int8: onnx.ModelProto) -> int:
    """Take out, in place, the zero channels ``pad_for_fast_path`` added: each uint8 Slice of a conv's output
    channels and each Pad of a conv's input channels goes, with the weights (and scales, zero points and
    bias) they made room for. Only what is exactly zero is taken out; returns the convs changed."""
    g = _Graph(int8.graph)
    changed, unpadded = 0, []
    for conv in [node for node in int8.graph.node if node.op_type == "Conv"]:
        part = _quantized_conv(g, conv)
        if part is None:
            continue
        outputs, inputs = g.array(part.weight).shape[:2]
        kept_outputs = _sliced_channels(g, part.output_q.output[0])
        if kept_outputs is not None and kept_outputs < outputs and _zero(g, part, slice(kept_outputs, None), 0):
            for reader in g.readers(part.output_q.output[0]):  # the Slice: its readers read the Q again
                for other in g.readers(reader.output[0]):
                    other.input[:] = [part.output_q.output[0] if n == reader.output[0] else n for n in other.input]
                g.removed.add(id(reader))
            for dequantize, values in part.constants:
                g.replace(values, g.array(values)[:kept_outputs])
                for name in dequantize.input[1:] if dequantize is not None else ():
                    if name and _per_channel(g, name, outputs):
                        g.replace(name, g.array(name)[:kept_outputs])
            g.reshaped |= {conv.output[0], part.output_q.output[0]}
            changed += 1
        pad = g.producers.get(part.input_dq.input[0])
        added = _padded_channels(g, pad) if pad is not None and len(g.readers(pad.output[0])) == 1 else 0
        if added:
            kept_inputs = inputs - added
            if 0 < kept_inputs < inputs and _zero(g, part, slice(kept_inputs, None), 1):
                part.input_dq.input[0] = pad.input[0]
                g.removed.add(id(pad))
                g.replace(part.weight, g.array(part.weight)[:, :kept_inputs])
                g.reshaped.add(part.input_dq.output[0])
                unpadded.append(part)
                changed += 1
    for part in unpadded:  # a DQ of its own for one conv (the activation was read by others too) merges back
        twin = next(node for node in int8.graph.node if node.op_type == "DequantizeLinear" and id(node) not in g.removed
                    and list(node.input) == list(part.input_dq.input))
        if twin is not part.input_dq:
            part.conv.input[0] = twin.output[0]
            g.removed.add(id(part.input_dq))
    g.commit()
    return changed


def _sliced_channels(g: _Graph, quantized: str) -> int | None:
    """Channels kept by a Slice of ``quantized`` that is its only reader and keeps channels [0, n), n > 0, as
    ``_pad_outputs`` writes it (starts, ends, axes initializers; no steps): n, else None."""
    readers = g.readers(quantized)
    if len(readers) != 1 or readers[0].op_type != "Slice" or len(readers[0].input) != 4:
        return None
    starts, ends, axes = (g.array(name) for name in readers[0].input[1:])
    if any(array is None or array.shape != (1,) for array in (starts, ends, axes)):
        return None
    if int(starts[0]) != 0 or int(axes[0]) != 1 or int(ends[0]) <= 0:
        return None
    return int(ends[0])


def _padded_channels(g: _Graph, pad: onnx.NodeProto) -> int:
    """Channels a Pad adds at the end of axis 1 and nothing else, as ``_pad_inputs`` writes it (constant mode,
    zeros, the 8 pads as an initializer, no axes): their count, else 0."""
    attributes = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
    if pad.op_type != "Pad" or len(pad.input) != 2 or attributes.get("mode", b"constant") not in (b"constant", "constant"):
        return 0
    pads = g.array(pad.input[1])
    if pads is None or pads.shape != (8,) or pads[5] <= 0 or np.any(np.delete(pads, 5) != 0):
        return 0
    return int(pads[5])


def _zero(g: _Graph, part: _QuantizedConv, channels: slice, axis: int) -> bool:
    """Whether the conv's weights (and, for output channels, its bias) are zero at ``channels`` of ``axis``."""
    arrays = [g.array(values) for _, values in (part.constants if axis == 0 else part.constants[:1])]
    return all(not np.any(np.take(array, range(array.shape[axis])[channels], axis=axis)) for array in arrays)


def pad_for_fast_path(int8: onnx.ModelProto, rule: FastPath = FAST_PATH) -> list[dict]:
    """Pad, in place, every integer conv of ``int8`` that misses the fast kernel's channel counts (``rule``)
    with zero input channels and zero filters (see the module docstring); the output is bit-identical.
    Returns what was padded: per conv its name and (input, output) channels before and after."""
    g = _Graph(int8.graph)
    changes = []
    for conv in [node for node in int8.graph.node if node.op_type == "Conv"]:
        part = _quantized_conv(g, conv)
        if part is None:
            continue
        outputs, inputs = g.array(part.weight).shape[:2]
        wanted_outputs = outputs
        if outputs < rule.min_outputs or outputs % rule.output_multiple:
            wanted_outputs = max(rule.min_outputs, _round_up(outputs, rule.output_multiple))
        wanted_inputs = _round_up(inputs, rule.input_multiple)
        if (wanted_inputs, wanted_outputs) == (inputs, outputs):
            continue
        if wanted_inputs != inputs and not _input_paddable(g, part):
            continue  # padded outputs alone would not reach the fast kernel: only cost a Slice
        if wanted_inputs != inputs:
            _pad_inputs(g, part, wanted_inputs)
        if wanted_outputs != outputs:
            _pad_outputs(g, part, outputs, wanted_outputs)
        changes.append({"conv": conv.name, "channels": [inputs, outputs], "padded": [wanted_inputs, wanted_outputs]})
    g.commit()
    return changes
