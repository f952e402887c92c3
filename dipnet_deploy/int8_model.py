"""The int8 ONNX from a ranges document: onnxruntime's QDQ quantizer, then the graph form the runtimes run
fastest.

The model is written by onnxruntime's own quantizer (``quantize_static``, QDQ format) from the document's
ranges, handed over through its calibration cache (it does not calibrate again), from the fp32 model with
the document's equalization and adapted weights applied; the activations its ``mixed_precision`` names
are taken out of int8 (``qdq_pairs.float_fallback``); ``qdq_graph`` then rewrites the graph, exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dipnet_deploy import __version__
from dipnet_deploy.equalize import equalize_with
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import scratch_dir
from dipnet_deploy.ptq import weights_from_entry
from dipnet_deploy.qdq_graph import depth_to_space_on_uint8, pad_for_fast_path
from dipnet_deploy.qdq_pairs import float_fallback, pairs_of


def model_to_quantize(model_path: Path, document: dict) -> onnx.ModelProto:
    """The fp32 model the ranges describe: ``model_path`` with the document's equalization applied, then
    the weights ``--method auto`` adapted (``adapted_weights``), the values the int8 model is written from.
    ``document`` has passed ``ranges_schema.check_ranges_document`` for this model."""
    model = onnx.load(str(model_path))
    equalization = document.get("equalization")
    if equalization:
        model = equalize_with(model, {key: np.asarray(scales, np.float32) for key, scales in equalization["scales"].items()})
    if document.get("adapted_weights") is not None:
        model = _with_adapted_weights(model, document["adapted_weights"])
    return model


def _with_adapted_weights(model: onnx.ModelProto, entry: dict) -> onnx.ModelProto:
    initializers = {init.name: init for init in model.graph.initializer}
    for name, array in weights_from_entry(entry).items():
        initializers[name].CopyFrom(numpy_helper.from_array(array, name))
    return model


def qdq_model(model_path: Path, document: dict, per_channel: bool, symmetric_activations: bool,
              uint16: Iterable[str] = ()) -> onnx.ModelProto:
    """onnxruntime's QDQ quantizer's model (``quantize_static``) from the document's ranges: every activation a
    QuantizeLinear -> DequantizeLinear pair, every weight int8 behind a DequantizeLinear. The activations
    ``uint16`` names are 16-bit (its per-tensor overrides; the quantizer then writes opset 21)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    tensors = {name: (np.float32(r["min"]), np.float32(r["max"])) for name, r in document["tensors"].items()}
    ranges = TensorsData(CalibrationMethod.MinMax, tensors)
    with scratch_dir("dipnet-quant-") as scratch:
        cache, fp32, qdq = Path(scratch) / "ranges.json", Path(scratch) / "fp32.onnx", Path(scratch) / "qdq.onnx"
        save_tensors_data(ranges, cache)
        onnx.save(model_to_quantize(model_path, document), str(fp32))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # silence the "consider pre-processing" advice, for this call only
        try:
            quantize_static(
                str(fp32), str(qdq), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                per_channel=per_channel, reduce_range=False,
                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True,
                               **({"TensorQuantOverrides": {name: [{"quant_type": QuantType.QUInt16}] for name in uint16}}
                                  if uint16 else {})},
            )
        finally:
            root.setLevel(level)
        return onnx.load(str(qdq))


def write_runtime_form(qdq: onnx.ModelProto, output: Path) -> list[dict]:
    """Write ``qdq`` (a copy) to ``output`` in the graph form the runtimes run fastest (``qdq_graph``); returns
    the convs padded for the fast kernel."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    model = depth_to_space_on_uint8(model)
    padded = pad_for_fast_path(model)
    model.producer_name, model.producer_version = "dipnet-deploy", __version__
    output.write_bytes(model.SerializeToString())
    return padded


def write_int8(model_path: Path, document: dict, output: Path, per_channel: bool = True,
               symmetric_activations: bool = False) -> list[dict]:
    """Quantize with onnxruntime's QDQ quantizer from the given ranges into ``output`` (a temporary name), the
    tensors of the document's ``mixed_precision`` out of int8, in the runtime form; returns the padded convs.
    A budget that needed the fp32 model writes the fp32 model."""
    mixed = document.get("mixed_precision") or {}
    if mixed.get("fp32"):
        output.write_bytes(model_path.read_bytes())
        return []
    tensors = mixed.get("tensors", [])
    try:
        qdq = promoted_model(model_path, document, per_channel, symmetric_activations, mixed.get("fallback"), tensors)
    except ValueError as problem:
        raise InputError("the ranges file", f"mixed_precision: {problem}") from None
    return write_runtime_form(qdq, output)


def promoted_model(model_path: Path, document: dict, per_channel: bool, symmetric_activations: bool,
                   fallback: str | None, tensors: list[str], qdq: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The QDQ model (``qdq_model``; ``qdq`` when already made without overrides) with the activations
    ``tensors`` out of int8, as ``fallback`` says (``qdq_pairs.FALLBACKS``); ValueError names a tensor that
    has no pair."""
    qdq = qdq or qdq_model(model_path, document, per_channel, symmetric_activations)
    if not tensors:
        return qdq
    pairs = pairs_of(qdq, tensors)
    if fallback == "uint16":
        return qdq_model(model_path, document, per_channel, symmetric_activations, uint16=tensors)
    return float_fallback(qdq, pairs)


def quantized_conv_report(model: onnx.ModelProto) -> dict:
    """How many Convs read an int8 weight and a dequantized activation."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name: init for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]

    def dequantized_from(name: str, elem_type: int | None) -> bool:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        source = node.input[0]
        return elem_type is None or (source in initializers and initializers[source].data_type == elem_type)

    return {
        "convs": len(convs),
        "int8_weights": sum(dequantized_from(n.input[1], onnx.TensorProto.INT8) for n in convs),
        "quantized_inputs": sum(dequantized_from(n.input[0], None) for n in convs),
    }
