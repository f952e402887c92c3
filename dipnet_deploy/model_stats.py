"""Parameter and MAC counts, from a PyTorch model or from an ONNX graph.

MACs count the multiply-accumulates of convolutions only (as thop and the vendor table do):
``output elements x (in_channels / groups) x kh x kw`` per Conv. FLOPs = 2 x MACs.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import torch
from torch import nn


def torch_conv_macs(model: nn.Module, height: int, width: int) -> int:
    """Conv MACs of one forward at 1x3xHxW, computed on the meta device (no real compute)."""
    total = 0

    def hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    meta = copy.deepcopy(model).to_empty(device="meta")
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        meta(torch.empty(1, 3, height, width, device="meta"))
    for handle in handles:
        handle.remove()
    return int(total)


def _static_shape(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def onnx_summary(model: onnx.ModelProto) -> dict:
    """Inputs/outputs with shapes, op histogram, params (initializer elements) and conv MACs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {vi.name: _static_shape(vi) for vi in [*graph.input, *graph.output, *graph.value_info]}
    initializers = {init.name: init for init in graph.initializer}
    macs = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvInteger", "QLinearConv"):
            continue
        weight_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
        weight = _resolve_weight_shape(weight_name, initializers, graph)
        out_shape = shapes.get(node.output[0])
        if weight is None or not out_shape or not all(isinstance(d, int) for d in out_shape):
            continue
        # weight is [out, in / groups, kh, kw], so groups need no separate term
        macs += int(np.prod(out_shape)) * int(np.prod(weight[1:]))
    quant_ops = {"QuantizeLinear", "DequantizeLinear"}
    params = sum(int(np.prod(init.dims)) for init in graph.initializer if _is_weight_tensor(init, graph, quant_ops))
    return {
        "inputs": {vi.name: _static_shape(vi) for vi in graph.input if vi.name not in initializers},
        "outputs": {vi.name: _static_shape(vi) for vi in graph.output},
        "ops": dict(sorted(Counter(n.op_type for n in graph.node).items())),
        "params": params,
        "macs": macs,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }


def _resolve_weight_shape(name: str, initializers: dict, graph: onnx.GraphProto) -> list[int] | None:
    """Shape of a conv weight, looking through a DequantizeLinear in QDQ graphs."""
    if name in initializers:
        return list(initializers[name].dims)
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in initializers:
        return list(initializers[producer.input[0]].dims)
    return None


def _is_weight_tensor(init: onnx.TensorProto, graph: onnx.GraphProto, quant_ops: set[str]) -> bool:
    """Count weights and biases, not scales/zero points or shape constants."""
    for node in graph.node:
        if init.name not in node.input:
            continue
        if node.op_type in quant_ops:
            return node.input[0] == init.name
        if node.op_type == "Conv":
            return list(node.input).index(init.name) in (1, 2)
    return False
