"""A port of MATLAB's ``imresize(img, scale, 'bicubic')`` (antialiasing on).

Conventions, as MATLAB:
- cubic kernel with a = -0.5; when shrinking, the kernel is stretched by 1/scale (antialiasing);
- pixel centres map by ``u = x / scale + 0.5 * (1 - 1 / scale)`` (1-based x);
- out-of-range taps are mirrored symmetrically (``[1..n, n..1]`` repeated);
- output size is ``ceil(in * scale)``; both axes are resized, rows first;
- arithmetic in float64; a uint8 input gives a uint8 output rounded half away from zero and
  clipped, like MATLAB.

Each axis becomes one dense [out, in] matrix, so an image is resized by two matrix products.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def cubic(x: np.ndarray) -> np.ndarray:
    absx = np.abs(x)
    absx2, absx3 = absx**2, absx**3
    near = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
    far = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
    return near + far


@lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """Dense [out_length, in_length] float64 matrix applying MATLAB's bicubic along one axis."""
    kernel_width = 4.0
    antialias = scale < 1
    if antialias:
        kernel_width /= scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    distance = u[:, None] - indices
    weights = scale * cubic(scale * distance) if antialias else cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    columns = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), columns.ravel()), weights.ravel())
    return matrix


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an HxW or HxWxC image by ``scale`` exactly as MATLAB's bicubic imresize.

    uint8 in -> uint8 out (rounded, clipped); float in -> float64 out (no rounding).
    """
    height, width = image.shape[:2]
    out_h, out_w = int(math.ceil(height * scale)), int(math.ceil(width * scale))
    rows = resize_matrix(height, out_h, float(scale))
    cols = resize_matrix(width, out_w, float(scale))
    data = image.astype(np.float64)
    resized = np.tensordot(rows, data, axes=(1, 0))
    resized = np.moveaxis(np.tensordot(cols, resized, axes=(1, 1)), 0, 1)
    if image.dtype == np.uint8:
        # MATLAB rounds half away from zero; values here are >= 0 after clipping.
        return np.floor(np.clip(resized, 0, 255) + 0.5).astype(np.uint8)
    return resized


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of ``scale`` (BasicSR ``mod_crop``)."""
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The SR benchmark LR: uint8(round(imresize(mod_crop(HR), 1/scale)))."""
    return imresize(crop_to_multiple(hr, scale), 1.0 / scale)
