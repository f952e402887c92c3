"""Reading images for the pipeline, and the seed's pre/post-processing.

Every reader returns 8-bit 3-channel RGB. Gray, gray+alpha, RGBA and 16-bit inputs are
converted explicitly and the conversion is reported, never silently misread.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from dipnet_deploy.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_rgb8(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read ``path`` as HxWx3 uint8 RGB; return it with notes on any conversion made.

    Raises InputError when the file is missing, unreadable or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise InputError(path, "not a readable image (corrupt, truncated or unsupported format)")
    notes: list[str] = []
    if image.dtype == np.uint16:
        image = np.floor(image.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
        notes.append("16-bit converted to 8-bit")
    elif image.dtype != np.uint8:
        raise InputError(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
        notes.append("gray replicated to RGB")
    elif image.shape[2] == 2:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., 0]), cv2.COLOR_GRAY2RGB)
        notes.append("gray+alpha: alpha dropped, gray replicated to RGB")
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
        notes.append("alpha channel dropped")
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image, notes


def list_images(directory: str | Path) -> list[Path]:
    """Files under ``directory`` (recursive) with an image suffix, sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "not a directory")
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def seed_preprocess(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """The vendor seed's input: cv2.resize (bilinear) to (W, H), RGB, CHW, float32/255, batch axis."""
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    return (resized.transpose(2, 0, 1).astype(np.float32) / 255.0)[None]


def to_uint8_rgb(output: np.ndarray) -> np.ndarray:
    """Model output [1, 3, H, W] in [0, 1] -> HxWx3 uint8 RGB, rounded (never truncated)."""
    chw = np.asarray(output)[0]
    return np.round(np.clip(chw * 255.0, 0, 255)).astype(np.uint8).transpose(1, 2, 0)


def seed_postprocess(output: np.ndarray) -> np.ndarray:
    """The vendor seed's output: squeeze, RGB->BGR, CHW->HWC, clip(x*255), round, uint8."""
    return np.ascontiguousarray(to_uint8_rgb(output)[..., ::-1])
