"""Activation equalization: rescale channels so each one fills its tensor's int8 range.

An activation tensor gets one uint8 scale, set by its widest channel; a channel that spans a
tenth of the range is quantized with a tenth of the levels. Multiply channel c of an
activation by s_c > 0 and divide the input-channel-c weights of every Conv that reads it, and
the network computes the same function, yet channel c now uses s_c times more of the grid and
its rounding noise reaches the next layer divided by s_c. (The activation-side twin of the
cross-layer equalization of Nagel et al., "Data-Free Quantization", 2019.)

A *channel space* is a set of tensors whose channel c must carry the same scale: Conv outputs
are scaled through their weights (and bias); LeakyRelu, Relu, MaxPool, linear Resize, Add (all
inputs) and a Mul by an unscaled Sigmoid gate commute with a positive per-channel scale and
join their inputs' space; Convs reading the space divide their input-channel weights. A space
touched by anything else (the graph input and output, DepthToSpace, Sigmoid, grouped or shared
weights) keeps scale 1.

s_c is the largest scale that grows no range: over every tensor of the space, channel c times
s_c stays inside the tensor's observed [min, max] (its [-m, m] for symmetric activations). So
each tensor keeps its `max` range, and the equalized model's ranges follow from the original's
per-channel ranges: no second pass. With per-tensor weight scales, s_c is also capped so that the
producing Conv's weight range does not grow (per-channel weight scales absorb s_c exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

MAX_SCALE = 64.0  # a channel that is (nearly) always 0 would otherwise get an unbounded scale
HOMOGENEOUS = {"LeakyRelu", "Relu", "MaxPool", "Add"}  # f(s x) = s f(x) for s > 0, per channel


@dataclass
class ChannelSpace:
    """Tensors sharing one per-channel scale, and the Conv weights that carry it."""

    key: str  # the first tensor in graph order: names the space in the ranges JSON
    channels: int = 0
    tensors: list[str] = field(default_factory=list)
    producers: list[tuple[str, str | None]] = field(default_factory=list)  # (weight, bias) scaled by s
    consumers: list[str] = field(default_factory=list)  # weights divided by s on their input channels


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def channel_spaces(model: onnx.ModelProto) -> list[ChannelSpace]:
    """The scalable channel spaces of an NCHW model, in graph order of their first tensor."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    weight_readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input[1:]:
            weight_readers[name] = weight_readers.get(name, 0) + 1
    spaces, frozen = _UnionFind(), set()
    order: list[str] = [vi.name for vi in graph.input if vi.name not in initializers]
    for node in graph.node:
        data = [name for name in node.input if name and name not in initializers]
        order += [out for out in node.output if out]
        if node.op_type in HOMOGENEOUS or (node.op_type == "Resize" and _attribute(node, "mode", b"nearest") == b"linear"):
            for name in data if node.op_type == "Add" else data[:1]:
                spaces.union(name, node.output[0])
            if node.op_type == "Add" and len(data) != 2:  # a constant addend does not scale
                frozen.add(node.output[0])
        elif node.op_type == "Mul" and len(data) == 2 and sum(_is_gate(producer.get(n)) for n in data) == 1:
            scaled = next(name for name in data if not _is_gate(producer.get(name)))
            spaces.union(scaled, node.output[0])
        elif node.op_type == "Conv" and node.input[1] in initializers and _attribute(node, "group", 1) == 1 \
                and all(weight_readers[name] == 1 for name in node.input[1:] if name):
            pass  # a Conv starts a new space at its output and reads its input's space through weights
        else:
            frozen.update(data)
            frozen.update(node.output)
    frozen.update(vi.name for vi in graph.input)
    frozen.update(vi.name for vi in graph.output)
    frozen_roots = {spaces.find(name) for name in frozen}

    by_root: dict[str, ChannelSpace] = {}
    for name in order:
        root = spaces.find(name)
        if root not in frozen_roots:
            by_root.setdefault(root, ChannelSpace(key=name)).tensors.append(name)
    weight_shapes = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        out_space, in_space = by_root.get(spaces.find(node.output[0])), by_root.get(spaces.find(node.input[0]))
        if out_space is not None:
            out_space.channels = weight_shapes[node.input[1]][0]
            out_space.producers.append((node.input[1], node.input[2] if len(node.input) > 2 and node.input[2] else None))
        if in_space is not None:
            in_space.consumers.append(node.input[1])
    return [space for space in by_root.values() if space.producers]


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _is_gate(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Sigmoid"


def equalization_scales(model: onnx.ModelProto, spaces: list[ChannelSpace], low: dict[str, np.ndarray],
                        high: dict[str, np.ndarray], per_channel_weights: bool = True,
                        symmetric_activations: bool = False, max_scale: float = MAX_SCALE) -> dict[str, np.ndarray]:
    """Per-channel equalization scale of each space from per-channel ranges ``low``/``high`` (float32 arrays).

    Scale of channel c: the largest s in [1, max_scale] keeping s * channel range inside every
    tensor's quantization range of the space, [min, max] (or [-m, m], m = max |x|, for symmetric
    activations), and, for per-tensor weights, inside the producing Conv's weight range.
    """
    weights = {init.name: init for init in model.graph.initializer}
    scales = {}
    for space in spaces:
        limit = np.full(space.channels, max_scale, np.float64)
        for name in space.tensors:
            channel_low, channel_high = low[name].astype(np.float64), high[name].astype(np.float64)
            floor, ceiling = channel_low.min(), channel_high.max()
            if symmetric_activations:
                ceiling = max(ceiling, -floor)
                floor = -ceiling
            with np.errstate(divide="ignore", invalid="ignore"):  # np.where evaluates both branches
                limit = np.minimum(limit, np.where(channel_high > 0, ceiling / channel_high, np.inf))
                limit = np.minimum(limit, np.where(channel_low < 0, floor / channel_low, np.inf))
        if not per_channel_weights:
            for weight, _ in space.producers:
                magnitude = np.abs(numpy_helper.to_array(weights[weight])).reshape(len(limit), -1).max(axis=1)
                with np.errstate(divide="ignore"):
                    limit = np.minimum(limit, np.where(magnitude > 0, magnitude.max() / magnitude, np.inf))
        scales[space.key] = np.maximum(limit, 1.0).astype(np.float32)
    return scales


def equalize_with(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` rescaled by ``scales`` (channel space key -> per-channel scales): the one place a model is equalized,
    whether the scales were just computed (``calibrate``) or read back from a ranges file (``quantize``)."""
    return apply_equalization(model, channel_spaces(model), scales)


def apply_equalization(model: onnx.ModelProto, spaces: list[ChannelSpace], scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with each space's channels multiplied by its scales (same function)."""
    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    initializers = {init.name: init for init in equalized.graph.initializer}
    arrays = {name: numpy_helper.to_array(init).astype(np.float32) for name, init in initializers.items()}
    touched: set[str] = set()
    for space in spaces:
        scale = scales[space.key]
        for weight, bias in space.producers:
            arrays[weight] = arrays[weight] * scale.reshape(-1, 1, 1, 1)
            touched.add(weight)
            if bias is not None:
                arrays[bias] = arrays[bias] * scale
                touched.add(bias)
        for weight in space.consumers:
            arrays[weight] = arrays[weight] / scale.reshape(1, -1, 1, 1)
            touched.add(weight)
    for name in sorted(touched):
        initializers[name].CopyFrom(numpy_helper.from_array(arrays[name].astype(np.float32), name))
    return equalized


def equalized_channel_ranges(spaces: list[ChannelSpace], scales: dict[str, np.ndarray], low: dict[str, np.ndarray],
                             high: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel ranges of the equalized model: those of the original times the scales."""
    low, high = dict(low), dict(high)
    for space in spaces:
        scale = scales[space.key]
        for name in space.tensors:
            low[name], high[name] = low[name] * scale, high[name] * scale
    return low, high
