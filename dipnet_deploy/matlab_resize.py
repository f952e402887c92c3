"""A port of MATLAB's ``imresize(img, scale, 'bicubic')`` (antialiasing on).

Conventions, as MATLAB:
- cubic kernel with a = -0.5; when shrinking, the kernel is stretched by 1/scale (antialiasing);
- pixel centres map by ``u = x / scale + 0.5 * (1 - 1 / scale)`` (1-based x);
- out-of-range taps are mirrored symmetrically (``[1..n, n..1]`` repeated);
- output size is ``ceil(in * scale)``; both axes are resized, rows first;
- arithmetic in float64; a uint8 input gives a uint8 output rounded half away from zero and
  clipped, like MATLAB.

Each axis is a band matrix (``axis_weights``: for each output, the few inputs it mixes and their weights,
the nonzero entries of the dense [out, in] resize matrix, which is never built); an image is resized a band
of output rows at a time, so the float64 work stays a few MiB whatever the image size (a whole float64
copy of a 25-megapixel image is 600 MB). For x2 and x4 every weight and product is a short binary
fraction, so the result equals the dense matrix products (the tests' reference) bit for bit; for other
scales within 1e-12.
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


BAND_BYTES = 8 << 20  # the float64 rows one step of ``imresize`` works on (each of its few buffers)


def _taps(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(input column, weight) [out_length, taps] of every kernel tap, mirrored into range, in tap order."""
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
    return columns, weights


@lru_cache(maxsize=64)
def axis_weights(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(first [out_length], weights [out_length, K]): output i mixes inputs ``first[i] .. first[i] + K - 1``
    with ``weights[i]``, which are exactly the entries of row i of the dense resize matrix there (taps falling
    on the same input summed in tap order, as ``np.add.at`` sums them); zeros elsewhere in the window."""
    if out_length == 0 or in_length == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.float64)
    columns, weights = _taps(in_length, out_length, scale)
    low = columns.min(axis=1)
    span = int((columns.max(axis=1) - low).max()) + 1  # <= in_length: every column is in range
    first = np.minimum(low, in_length - span)
    window = np.zeros((out_length, span), dtype=np.float64)
    np.add.at(window, (np.repeat(np.arange(out_length), columns.shape[1]), (columns - first[:, None]).ravel()),
              weights.ravel())
    first.flags.writeable = window.flags.writeable = False  # cached: shared by every caller
    return first, window


def _along(data: np.ndarray, first: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """sum over k of weights[:, k] * data[first + k] along ``axis`` (0 or 1) of float64 ``data``."""
    shape = [1] * data.ndim
    shape[axis] = len(first)
    total = None
    for k in range(weights.shape[1]):
        term = np.take(data, first + k, axis=axis)
        term *= weights[:, k].reshape(shape)
        total = term if total is None else np.add(total, term, out=total)
    return total


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an HxW or HxWxC image by ``scale`` exactly as MATLAB's bicubic imresize.

    uint8 in -> uint8 out (rounded, clipped); float in -> float64 out (no rounding). Rows are resized
    first, then columns, a band of output rows at a time.
    """
    height, width = image.shape[:2]
    out_h, out_w = int(math.ceil(height * scale)), int(math.ceil(width * scale))
    row_first, row_weights = axis_weights(height, out_h, float(scale))
    column_first, column_weights = axis_weights(width, out_w, float(scale))
    channels = int(np.prod(image.shape[2:], dtype=np.int64))
    out = np.empty((out_h, out_w, *image.shape[2:]), dtype=np.uint8 if image.dtype == np.uint8 else np.float64)
    band = max(1, BAND_BYTES // (8 * max(1, width, out_w) * max(1, channels)))
    for top in range(0, out_h, band):
        rows = slice(top, min(out_h, top + band))
        first = row_first[rows]
        needed = slice(int(first.min()), int(first.max()) + row_weights.shape[1])  # the input rows this band mixes
        data = image[needed].astype(np.float64)
        resized = _along(data, first - needed.start, row_weights[rows], 0)
        resized = _along(resized, column_first, column_weights, 1)
        if image.dtype == np.uint8:
            # MATLAB rounds half away from zero; values here are >= 0 after clipping.
            np.clip(resized, 0, 255, out=resized)
            resized += 0.5
            np.floor(resized, out=resized)
        out[rows] = resized
    return out


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of ``scale`` (BasicSR ``mod_crop``)."""
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The SR benchmark LR: uint8(round(imresize(mod_crop(HR), 1/scale)))."""
    return imresize(crop_to_multiple(hr, scale), 1.0 / scale)
