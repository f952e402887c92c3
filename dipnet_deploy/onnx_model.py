"""Loading and recognizing ONNX models, shared by every stage that reads one: one-line errors for bad
files, whether a graph is quantized, and the fixed input shape and scale of a super-resolution model.

What is loaded at all is what this tool's own models are made of (``load_onnx``): the ops of
``ALLOWED_OPS`` (none with a subgraph), at most ``MAX_NODES`` nodes, numeric tensors of at most
``MAX_TENSOR_BYTES`` together. Every size is checked from the declarations (the protobuf, the tensor
shapes, the external data's offset and length) before any tensor data is read.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import onnx
from onnx import AttributeProto, TensorProto, helper

from dipnet_deploy.errors import InputError

# What `export` (both presets, opsets 11-21) and `quantize` (every method) write: Conv, LeakyRelu, Add,
# DepthToSpace; ESA adds MaxPool, Resize, Sigmoid, Mul; opset 11 a Constant; QDQ models the Q/DQ pairs.
# Relu, Clip, Slice and Concat are what other SR exporters and the 16-bit QDQ models need (a Slice after
# DepthToSpace); int8 models a uint8 Pad and Slice around convs padded for the fast kernel (``qdq_graph``).
# None of these ops holds a subgraph, so nothing loaded can loop; every tensor's shape is inferred and bounded.
ALLOWED_OPS = frozenset({"Add", "Clip", "Concat", "Constant", "Conv", "DepthToSpace", "DequantizeLinear", "LeakyRelu",
                         "MaxPool", "Mul", "Pad", "QuantizeLinear", "Relu", "Resize", "Sigmoid", "Slice"})
# onnxruntime writes 16-bit QuantizeLinear/DequantizeLinear in its own domain before opset 21
OPS_OF_DOMAIN = {"": ALLOWED_OPS, "ai.onnx": ALLOWED_OPS,
                 "com.microsoft": frozenset({"QuantizeLinear", "DequantizeLinear"})}
# the largest graph written (the x4-ntire int8 QDQ model) has 290 nodes and 316 initializers
MAX_NODES = 10_000
# the largest model's weights take 1 MB (x4-ntire: 243,252 float32); 64 MiB is 64 times that, and a model
# of that size still loads, is checked and runs within 1.5 GB
MAX_TENSOR_BYTES = 64 << 20
GRAPH_BYTES = 16 << 20  # what a file may hold besides tensor data: nodes, names, metadata
# plain values and tensors; no subgraphs (GRAPH, GRAPHS), sparse tensors or type protos
ATTRIBUTE_TYPES = frozenset({AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING, AttributeProto.TENSOR,
                             AttributeProto.FLOATS, AttributeProto.INTS, AttributeProto.STRINGS})
ITEM_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8,
              TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
              TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
              TensorProto.BOOL: 1}
# every tensor of the graphs written is at most 2.7 times the output (x2: 32 trunk channels vs 12 = 3 x 2 x 2)
MAX_TENSOR_TO_OUTPUT = 64
# multiply-accumulates (Conv) and compared elements (MaxPool windows) per output value: x2 DIPNet needs
# 7,800, x4-ntire 4,700; 16 times the larger bounds the compute a small crafted file can ask for
MAX_WORK_PER_OUTPUT = 128_000


def _one_line(error: Exception, limit: int = 200) -> str:
    """An exception's message on one line (onnx and protobuf messages span several), shortened."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _enum_name(enum, value: int) -> str:
    """The name of a protobuf enum value, or the number where the value is none of its names."""
    return enum.Name(value) if value in enum.values() else str(value)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file of the kind this tool makes; every failure is one line.

    Order: the file size, the graph without tensor data (ops, subgraphs, node count, tensor types and
    sizes, ``check_graph``), then the external data, then ``onnx.checker``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such ONNX file")
    size = path.stat().st_size
    if size > MAX_TENSOR_BYTES + GRAPH_BYTES:
        raise InputError(path, f"{size / 2**20:,.0f} MiB is more than a super-resolution model of this kind holds "
                               f"(at most {(MAX_TENSOR_BYTES + GRAPH_BYTES) >> 20} MiB)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    except Exception as error:  # protobuf raises its own DecodeError type, onnx a ValidationError
        raise InputError(path, f"not an ONNX model ({_one_line(error)})") from None
    if not model.graph.node:
        raise InputError(path, "not an ONNX model (empty graph)")
    check_graph(model, path)
    try:
        with warnings.catch_warnings():  # onnx warns (several lines) about unknown external-data keys
            warnings.simplefilter("ignore")
            onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as error:  # OSError, or onnx's ValueError on a location outside the model's folder
        raise InputError(path, f"its external data is missing or unreadable ({_one_line(error)})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # onnx.checker.ValidationError, or protobuf errors on odd fields
        raise InputError(path, f"not a valid ONNX model ({_one_line(error)})") from None
    _check_loads_in_onnxruntime(model, path)
    return model


def _check_loads_in_onnxruntime(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a graph onnxruntime will not load (an opset it does not know, a Conv group its input cannot
    have: what onnx's checker lets through), in one line here rather than a traceback in a stage. The
    session is built without optimizations and never run: it allocates no activations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # its own error is reported below, once
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types (Fail, InvalidGraph, NotImplemented)
        raise InputError(path, f"onnxruntime cannot load it ({_one_line(error)})") from None


def check_graph(model: onnx.ModelProto, path: Path) -> None:
    """Refuse, from the declarations alone, a graph that is not made like this tool's models.

    Allowed: nodes of ``OPS_OF_DOMAIN`` (at most ``MAX_NODES``), attributes of ``ATTRIBUTE_TYPES``, no
    model-local functions or sparse initializers, and numeric tensors (``ITEM_BYTES``) of at most
    ``MAX_TENSOR_BYTES`` together, whose external data, if any, is exactly their size.
    """
    kind = "not a super-resolution model of the kind this tool runs"
    graph = model.graph
    if model.functions or graph.sparse_initializer:
        raise InputError(path, f"{kind} (it defines {'functions' if model.functions else 'sparse initializers'})")
    for what, count in (("nodes", len(graph.node)), ("initializers", len(graph.initializer))):
        if count > MAX_NODES:
            raise InputError(path, f"{kind} ({count:,} {what}; at most {MAX_NODES:,})")
    tensors = list(graph.initializer)
    for node in graph.node:
        if node.op_type not in OPS_OF_DOMAIN.get(node.domain, ()):
            op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            raise InputError(path, f"{kind} (op {op}; allowed: {', '.join(sorted(ALLOWED_OPS))})")
        for attribute in node.attribute:
            if attribute.type not in ATTRIBUTE_TYPES:
                type_name = _enum_name(AttributeProto.AttributeType, attribute.type).lower()
                raise InputError(path, f"{kind} ({node.op_type} has a {type_name} attribute {attribute.name!r})")
            if attribute.type == AttributeProto.TENSOR:
                tensors.append(attribute.t)
    total = sum(_tensor_bytes(tensor, path) for tensor in tensors)
    if total > MAX_TENSOR_BYTES:
        raise InputError(path, f"its tensors declare {total / 2**20:,.0f} MiB, more than a super-resolution model of "
                               f"this kind holds (at most {MAX_TENSOR_BYTES >> 20} MiB)")


def _tensor_bytes(tensor: TensorProto, path: Path) -> int:
    """The bytes ``tensor`` declares (its shape times its item size); refuses other types, and external data
    that is not exactly those bytes of a regular file beside the model."""
    name = tensor.name or "a constant"
    if tensor.data_type not in ITEM_BYTES:
        type_name = _enum_name(TensorProto.DataType, tensor.data_type)
        raise InputError(path, f"tensor {name} is of type {type_name}, not a number type these models use")
    if any(dim < 0 for dim in tensor.dims):
        raise InputError(path, f"tensor {name} has a negative dimension {list(tensor.dims)}")
    size = math.prod(tensor.dims) * ITEM_BYTES[tensor.data_type]
    if tensor.data_location == TensorProto.EXTERNAL:
        _check_external(tensor, name, size, path)
    return size


def _check_external(tensor: TensorProto, name: str, size: int, path: Path) -> None:
    """Refuse external data that is not ``size`` bytes within a regular file (a FIFO would block the read)."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    problem = f"its external data for tensor {name}"
    try:
        offset, length = int(entries.get("offset") or 0), entries.get("length")
        location = path.parent / entries["location"]
        if not location.is_file():
            raise InputError(path, f"{problem} is missing or unreadable ({entries['location']} is no regular file)")
        available = location.stat().st_size - offset
        length = available if length is None else int(length)
    except (KeyError, ValueError, OSError) as error:  # no location, a number that is none, a name the OS refuses
        raise InputError(path, f"{problem} is missing or unreadable ({_one_line(error)})") from None
    if offset < 0 or length != size or length > available:
        raise InputError(path, f"{problem} does not fit its shape {list(tensor.dims)}: {length:,} bytes at offset "
                               f"{offset:,} of a {available + offset:,}-byte file, the shape needs {size:,}")


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph computes in integers anywhere (QDQ pairs, QLinear* or *Integer ops)."""
    return any(node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear") or node.op_type.endswith("Integer")
               for node in model.graph.node)


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """Fixed dimensions of a graph input/output; 0 marks a symbolic or unknown one."""
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def _inferable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for shape inference: onnx has no schema for onnxruntime's own QuantizeLinear/DequantizeLinear
    (16-bit before opset 21), so a copy gets, in their place, what they are shape- and type-wise: the
    elementwise Identity of the float input and Cast of the integer one to float."""
    if not any(node.domain == "com.microsoft" for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]  # the integer types recorded for the replaced outputs
    for node in copy.graph.node:
        if node.domain == "com.microsoft":
            node.CopyFrom(helper.make_node("Identity", node.input[:1], node.output) if node.op_type == "QuantizeLinear"
                          else helper.make_node("Cast", node.input[:1], node.output, to=TensorProto.FLOAT))
    return copy


def _check_work(inferred: onnx.GraphProto, shapes: dict, model: onnx.ModelProto, path: Path, role: str,
                outputs: int) -> None:
    """Refuse a Conv whose input cannot have its group, and a graph whose Conv and MaxPool work exceeds
    ``MAX_WORK_PER_OUTPUT`` per output value, from the inferred shapes, before anything runs."""
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    work = 0
    for node in inferred.node:
        if node.op_type not in ("Conv", "MaxPool") or node.output[0] not in shapes or node.input[0] not in shapes:
            continue
        produced, read = _fixed_dims(shapes[node.output[0]]), _fixed_dims(shapes[node.input[0]])
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            kernel = weights.get(node.input[1]) or _fixed_dims(shapes.get(node.input[1], onnx.ValueInfoProto()))
            if not kernel or not read or not produced or read[1] != kernel[1] * attributes.get("group", 1):
                raise InputError(path, f"{role}: a Conv's input channels do not fit its weights and group "
                                       "(not a model onnxruntime can run)")
            work += math.prod(produced) * math.prod(kernel[1:])
        elif produced:
            work += math.prod(produced) * math.prod(attributes.get("kernel_shape", [1]))
    if work > MAX_WORK_PER_OUTPUT * outputs:
        raise InputError(path, f"{role}: its Conv and MaxPool work, {work / outputs:,.0f} operations per output value, "
                               f"is over {MAX_WORK_PER_OUTPUT:,} (a super-resolution model of this kind needs "
                               "under 10,000)")


def _fixed_dims(value: onnx.ValueInfoProto) -> list[int] | None:
    """The shape of a tensor when every dimension is a number >= 0 (a scalar's is []), else None."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape") or not all(d.HasField("dim_value") and d.dim_value >= 0
                                                    for d in tensor_type.shape.dim):
        return None
    return [d.dim_value for d in tensor_type.shape.dim]


def sr_model_shape(model: onnx.ModelProto, path: Path, role: str) -> tuple[list[int], int]:
    """Input shape [1, 3, H, W] and integer scale r >= 2 of a fixed-shape super-resolution ONNX.

    Conventions: one float32 input 1x3xHxW with fixed H, W; one float32 output 1x3x(rH)x(rW); every
    tensor between them of a fixed shape that onnx infers, none over ``MAX_TENSOR_TO_OUTPUT`` times the
    output's size (what the runtime will allocate is bounded by the declared output). ``role`` (e.g.
    "--fp32") names the model in the refusal; anything else is refused in one line.
    """
    initializers = {init.name for init in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise InputError(path, f"{role}: not a super-resolution ONNX (expected one input and one output, found "
                               f"{len(inputs)} and {len(model.graph.output)})")
    for value, what in ((inputs[0], "input"), (model.graph.output[0], "output")):
        elem = value.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            name = _enum_name(TensorProto.DataType, elem).lower() if elem else "untyped"
            raise InputError(path, f"{role}: {what} is {name}, expected float32")
    shape, out = _dims(inputs[0]), _dims(model.graph.output[0])
    if len(shape) != 4 or shape[:2] != [1, 3] or not all(shape):
        raise InputError(path, f"{role}: input must be 1x3xHxW with fixed H and W (got {shape})")
    scale = out[2] // shape[2] if len(out) == 4 else 0
    if len(out) != 4 or out[:2] != [1, 3] or out[2:] != [shape[2] * scale, shape[3] * scale]:
        raise InputError(path, f"{role}: output {out} is not 1x3x(rH)x(rW) for input {shape} (not a super-resolution model)")
    if scale < 2:
        raise InputError(path, f"{role}: output is the input's size (scale {scale}); expected an upscale of 2 or more")
    try:  # types and shapes, as onnxruntime will infer them (the rest of the checker ran in load_onnx)
        inferred = onnx.shape_inference.infer_shapes(_inferable(model), check_type=True, strict_mode=True).graph
    except Exception as error:
        raise InputError(path, f"{role}: not a valid ONNX model ({_one_line(error)})") from None
    from dipnet_deploy.imageio import DEFAULT_MAX_MEGAPIXELS, max_pixels

    # one forward's output is held whole: bounded like an image (a lowered image limit leaves models alone)
    output_limit = max(max_pixels(), DEFAULT_MAX_MEGAPIXELS * 1e6)
    if out[2] * out[3] > output_limit:
        raise InputError(path, f"{role}: its output, {out[3]}x{out[2]}, is larger than the image size limit "
                               f"({output_limit / 1e6:g} megapixels; --max-megapixels raises it)")
    shapes = {value.name: value for value in (*inferred.input, *inferred.value_info, *inferred.output)}
    limit = MAX_TENSOR_TO_OUTPUT * math.prod(out)
    for name in (name for node in inferred.node for name in node.output if name):  # "": an omitted output
        dims = _fixed_dims(shapes[name]) if name in shapes else None
        if dims is None:
            raise InputError(path, f"{role}: the shape of tensor {name} is not a fixed one (a super-resolution model "
                                   "of this kind has fixed shapes throughout)")
        if math.prod(dims) > limit:
            raise InputError(path, f"{role}: tensor {name} is {'x'.join(map(str, dims))}, over "
                                   f"{MAX_TENSOR_TO_OUTPUT} times the output's size (not a super-resolution model "
                                   "of this kind)")
    _check_work(inferred, shapes, model, path, role, math.prod(out))
    return shape, scale
