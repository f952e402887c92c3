"""``info``: what a checkpoint or an ONNX model is (params, MACs, shapes, ops)."""

from __future__ import annotations

from pathlib import Path

import onnx

from dipnet_deploy.archs.dipnet_arch import count_params
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.errors import InputError
from dipnet_deploy.model_stats import onnx_summary, torch_conv_macs


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf raises its own DecodeError type
        raise InputError(path, f"not an ONNX model ({type(error).__name__})") from None
    if not model.graph.node:
        raise InputError(path, "not an ONNX model (empty graph)")
    return model


def describe(path: str | Path, height: int = 1080, width: int = 1920) -> dict:
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        summary = onnx_summary(load_onnx(path))
        return {"path": str(path), "kind": "onnx", **summary, "gflops": round(2 * summary["macs"] / 1e9, 1)}
    loaded = load_checkpoint(path)
    macs = torch_conv_macs(loaded.model, height, width)
    scale = loaded.config.upscale
    return {
        "path": str(path),
        "kind": "checkpoint",
        "entry": loaded.source,
        "training_form": loaded.training_form,
        "config": loaded.config.to_dict(),
        "params": count_params(loaded.model),
        "macs": macs,
        "gflops": round(2 * macs / 1e9, 1),
        "input_shape": [1, 3, height, width],
        "output_shape": [1, 3, height * scale, width * scale],
    }
