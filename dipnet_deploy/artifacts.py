"""The names of the pipeline's files: defaults, and the files each stage writes beside another.

Light on purpose (no torch, no onnxruntime): the CLI reads its defaults from here at start-up.
"""

from __future__ import annotations

from pathlib import Path

from dipnet_deploy import __version__

TOOL = f"dipnet-deploy {__version__}"  # the "tool" of every JSON we write: how a file of ours is recognized
PACKAGED_WEIGHTS = Path(__file__).parent / "weights" / "dipnet_x2.pth"  # the default checkpoint (x2, 93,664 params)
BUILD_DIR = Path("build")


def default_fp32_path(scale: int, height: int, width: int) -> Path:
    """Where ``export`` writes by default: ``build/dipnet_x{scale}_{height}x{width}.onnx``."""
    return BUILD_DIR / f"dipnet_x{scale}_{height}x{width}.onnx"


DEFAULT_FP32 = default_fp32_path(2, 1080, 1920)  # the seed's deployment shape


def card_path_for(onnx_path: str | Path) -> Path:
    """The model card beside an ONNX file: the same name with ``.json``."""
    return Path(onnx_path).with_suffix(".json")


def default_int8_path(fp32_path: str | Path) -> Path:
    """Where ``quantize`` writes by default: ``NAME.int8.onnx`` beside ``NAME.onnx``."""
    fp32_path = Path(fp32_path)
    return fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")


def default_ranges_path(int8_path: str | Path) -> Path:
    """The ranges JSON ``quantize`` writes beside its int8 model: ``NAME.ranges.json``."""
    int8_path = Path(int8_path)
    return int8_path.with_name(f"{int8_path.stem.removesuffix('.int8')}.ranges.json")


DEFAULT_INT8 = default_int8_path(DEFAULT_FP32)


def default_checkpoint(checkpoint: str | Path | None) -> Path:
    """``checkpoint``, else the packaged weights; None when neither exists (the caller refuses)."""
    if checkpoint is not None:
        return Path(checkpoint)
    return PACKAGED_WEIGHTS if PACKAGED_WEIGHTS.is_file() else None


def card_header(stage: str, onnx_path: str | Path) -> dict:
    """The first keys of a model card (``export``'s "fp32-onnx", ``quantize``'s "int8-onnx"): what
    wrote it, which stage, and the ONNX file it describes."""
    return {"tool": TOOL, "stage": stage, "onnx": str(onnx_path)}
