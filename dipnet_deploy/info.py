"""``info``: what a checkpoint or an ONNX model is (params, MACs, shapes, ops)."""

from __future__ import annotations

from pathlib import Path

from dipnet_deploy.archs.dipnet_arch import count_params
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.config import refuse_beyond_memory
from dipnet_deploy.errors import InputError
from dipnet_deploy.model_stats import onnx_summary, torch_conv_macs
from dipnet_deploy.onnx_model import load_onnx


def looks_like_onnx(path: Path) -> bool:
    """An ``.onnx`` suffix, or an ONNX protobuf's first byte (field 1, ``ir_version``; checkpoints are zips or pickles)."""
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x08"
    except OSError:
        return False  # the checkpoint loader says what is wrong with the file


def describe(path: str | Path, height: int = 1080, width: int = 1920) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a FIFO (reading it would wait forever), a device
        raise InputError(path, "not a regular file")
    if looks_like_onnx(path):
        summary = onnx_summary(load_onnx(path))
        return {"path": str(path), "kind": "onnx", **summary, "gflops": round(2 * summary["macs"] / 1e9, 1)}
    loaded = load_checkpoint(path)
    # the same bound as export's, so that info describes only what could be exported (and no count overflows)
    refuse_beyond_memory(loaded.config, "--height/--width", height, width, images=1)
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
