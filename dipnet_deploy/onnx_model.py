"""Loading and recognizing ONNX models, shared by every stage that reads one: one-line errors for bad
files, whether a graph is quantized, and the fixed input shape and scale of a super-resolution model."""

from __future__ import annotations

from pathlib import Path

import onnx

from dipnet_deploy.errors import InputError


def _one_line(error: Exception, limit: int = 200) -> str:
    """An exception's message on one line (onnx and protobuf messages span several), shortened."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and structurally check an ONNX file (``onnx.checker``); every failure is one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such ONNX file")
    try:
        model = onnx.load(str(path))
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    except Exception as error:  # protobuf raises its own DecodeError type, onnx a ValidationError
        if "should be stored in" in str(error):
            raise InputError(path, f"its external data is missing or unreadable ({_one_line(error)})") from None
        raise InputError(path, f"not an ONNX model ({_one_line(error)})") from None
    if not model.graph.node:
        raise InputError(path, "not an ONNX model (empty graph)")
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # onnx.checker.ValidationError, or protobuf errors on odd fields
        raise InputError(path, f"not a valid ONNX model ({_one_line(error)})") from None
    return model


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph computes in integers anywhere (QDQ pairs, QLinear* or *Integer ops)."""
    return any(node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear") or node.op_type.endswith("Integer")
               for node in model.graph.node)


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """Fixed dimensions of a graph input/output; 0 marks a symbolic or unknown one."""
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def sr_model_shape(model: onnx.ModelProto, path: Path, role: str) -> tuple[list[int], int]:
    """Input shape [1, 3, H, W] and integer scale r >= 2 of a fixed-shape super-resolution ONNX.

    Conventions: one float32 input 1x3xHxW with fixed H, W; one float32 output 1x3x(rH)x(rW).
    ``role`` (e.g. "--fp32") names the model in the refusal; anything else is refused in one line.
    """
    initializers = {init.name for init in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise InputError(path, f"{role}: not a super-resolution ONNX (expected one input and one output, found "
                               f"{len(inputs)} and {len(model.graph.output)})")
    for value, what in ((inputs[0], "input"), (model.graph.output[0], "output")):
        elem = value.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            name = onnx.TensorProto.DataType.Name(elem).lower() if elem else "untyped"
            raise InputError(path, f"{role}: {what} is {name}, expected float32")
    shape, out = _dims(inputs[0]), _dims(model.graph.output[0])
    if len(shape) != 4 or shape[:2] != [1, 3] or not all(shape):
        raise InputError(path, f"{role}: input must be 1x3xHxW with fixed H and W (got {shape})")
    scale = out[2] // shape[2] if len(out) == 4 else 0
    if len(out) != 4 or out[:2] != [1, 3] or out[2:] != [shape[2] * scale, shape[3] * scale]:
        raise InputError(path, f"{role}: output {out} is not 1x3x(rH)x(rW) for input {shape} (not a super-resolution model)")
    if scale < 2:
        raise InputError(path, f"{role}: output is the input's size (scale {scale}); expected an upscale of 2 or more")
    try:
        onnx.checker.check_model(model, full_check=True)  # types and shapes, as onnxruntime will infer them
    except Exception as error:
        raise InputError(path, f"{role}: not a valid ONNX model ({_one_line(error)})") from None
    return shape, scale
