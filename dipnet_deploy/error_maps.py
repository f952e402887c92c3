"""Where two images differ, for the report's figures of the worst image, computed in bands of rows.

What the report shows (``report._crops_figure``, ``report._heatmap``):
- the crop: the ``CROP`` x ``CROP`` window (smaller images: their shorter side) with the largest mean of
  ``|a - b|`` averaged over RGB (``crop_box``), and that difference inside it (``crop_difference``);
- the heatmap: ``|a - b|``, the maximum over RGB, in 8-bit levels, drawn with a colour scale up to its
  99.9th percentile (``heatmap``).

The numbers are those of the whole-image float64 arithmetic these functions replaced (an integral image of
the mean difference, ``np.percentile`` of the whole map), bit for bit: the same window, ties included, and
the same scale. But no whole-image float copy exists: the integral image is made a band of rows at a time
(only the rows the windows of a band need are kept), the percentile comes from a histogram of the 256
levels, and an image more than ``HEATMAP_SIDE`` pixels wide or tall is drawn from the maxima of blocks of
k x k pixels (a figure shows some 600 pixels across: drawing more only costs matplotlib some 70 bytes per
pixel drawn). ``figure_bytes`` is what this takes for an image of a given size (``compare.compare_bytes``).

The pictures are uint8 (the ``sr`` protocol's), or float on [0, 255] (the ``seed`` protocol's, at the model's
output size whatever the image): for those the same arithmetic runs in float64, and the percentile is numpy's
of the whole map (8 bytes a pixel of the model's output).
"""

from __future__ import annotations

import math

import numpy as np

CROP = 96  # side of the crops the report shows, in HR pixels
HEATMAP_SIDE = 1024  # the heatmap of a wider or taller image is drawn from k x k block maxima, at most this side
BAND_BYTES = 4 << 20  # the float64 rows one step of ``crop_box`` makes of the integral image (and each buffer)
# ``crop_box``'s float64 buffers of a step's rows, counted: the rows kept, the new ones and their concatenation,
# the sums (measured with tracemalloc: 2.5 to 3 at most, the image's differences of a step included)
SEARCH_BUFFERS = 4
DRAW_BYTES_PER_PIXEL = 80  # matplotlib drawing a float64 map, the map included (measured: 68 at 1 MP, 53 at 4 MP)
PERCENTILE = 99.9  # the heatmap's colour scale ends at this percentile of the difference


def _levels(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether both pictures are 8-bit levels (else floats)."""
    return a.dtype == np.uint8 and b.dtype == np.uint8


def mean_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.abs(a.astype(float64) - b.astype(float64)).mean(axis=2)`` of two HxWx3 images, bit for bit (for
    uint8 ones the sum over RGB is an exact integer, divided by 3 as ``mean`` divides it)."""
    if not _levels(a, b):
        return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=2)
    total = np.abs(a.astype(np.int16) - b.astype(np.int16)).sum(axis=2, dtype=np.int32)
    return total / 3.0


def max_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.abs(a.astype(float64) - b.astype(float64)).max(axis=2)`` of two HxWx3 images: for uint8 ones as uint8
    (exact: no overflow), else float64."""
    if not _levels(a, b):
        return np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=2)
    return (np.maximum(a, b) - np.minimum(a, b)).max(axis=2)


def crop_side(height: int, width: int) -> int:
    return min(CROP, height, width)


def search_rows(width: int) -> int:
    """Window rows (tops) one step of ``crop_box`` handles in an image ``width`` wide."""
    return max(1, BAND_BYTES // (8 * (width + 1)))


def crop_box(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of the window of side ``crop_side`` with the largest mean ``mean_difference(a, b)``.

    The window sums are those of the integral image ``np.pad(diff, ((1, 0), (1, 0))).cumsum(0).cumsum(1)``,
    each entry made by the same float64 additions in the same order (a cumulative sum down the columns,
    carried from band to band, then along each row), and compared in the same order (the first largest
    wins, as ``np.argmax``): the window the whole-image search found, ties included.
    """
    height, width = a.shape[:2]
    size = crop_side(height, width)
    step = search_rows(width)
    carry = np.zeros(width + 1)  # the column sums of the last integral row made
    kept, kept_from, made = np.zeros((1, width + 1)), 0, 1  # integral rows kept_from.., and the next to make
    best, where = -math.inf, (0, 0)
    for top in range(0, height - size + 1, step):
        last = min(height - size, top + step - 1)  # the last window top of this step
        kept = kept[top - kept_from:]
        kept_from = top
        if last + size >= made:  # make integral rows made .. last + size (each from the image row above it)
            rows = np.zeros((last + size - made + 2, width + 1))
            rows[0] = carry
            rows[1:, 1:] = mean_difference(a[made - 1:last + size], b[made - 1:last + size])
            np.cumsum(rows, axis=0, out=rows)
            carry = rows[-1].copy()
            np.cumsum(rows[1:], axis=1, out=rows[1:])
            kept = np.concatenate([kept, rows[1:]])
            del rows
            made = last + size + 1
        count = last - top + 1
        sums = kept[size:size + count, size:] - kept[:count, size:] - kept[size:size + count, :-size] \
            + kept[:count, :-size]
        index = int(np.argmax(sums))
        if sums.flat[index] > best:
            best, where = float(sums.flat[index]), (top + index // sums.shape[1], index % sums.shape[1])
    return int(where[0]), int(where[1]), size


def crop_difference(a: np.ndarray, b: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """``mean_difference`` inside the window: what the crops figure shows of it."""
    window = (slice(top, top + size), slice(left, left + size))
    return mean_difference(a[window], b[window])


def heatmap_block(height: int, width: int) -> int:
    """k: the heatmap of a ``height`` x ``width`` image is drawn from the maxima of k x k blocks."""
    return max(1, math.ceil(max(height, width) / HEATMAP_SIDE))


def percentile_of_levels(counts: np.ndarray, percentile: float) -> float:
    """``float(np.percentile(values, percentile))`` (linear interpolation) of values given by the count of
    each level 0, 1, ...: the same float64 arithmetic as numpy's."""
    n = int(counts.sum())
    position = (n - 1) * (percentile / 100)
    below = math.floor(position)
    cumulative = np.cumsum(counts)
    low = float(np.searchsorted(cumulative, below, side="right"))  # the value at sorted index ``below``
    high = float(np.searchsorted(cumulative, min(below + 1, n - 1), side="right"))
    gamma = position - below
    step = high - low
    return high - step * (1 - gamma) if gamma >= 0.5 else low + step * gamma


def heatmap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """(what the heatmap draws, where its colour scale ends): ``max_difference(a, b)`` as float64, for an image
    over ``HEATMAP_SIDE`` its maxima over blocks of ``heatmap_block`` pixels a side (those at the right and
    bottom edges may be smaller); and the ``PERCENTILE`` of the whole difference, every pixel counted."""
    height, width = a.shape[:2]
    k = heatmap_block(height, width)
    levels = _levels(a, b)
    counts = np.zeros(256, np.int64)
    whole = None if levels else np.empty((height, width))  # floats: numpy's percentile of the whole map
    shown = np.zeros((-(-height // k), -(-width // k)), np.uint8 if levels else np.float64)
    rows = k * max(1, BAND_BYTES // (8 * width * k))  # whole blocks; the histogram's indices are 8 B a pixel
    for top in range(0, height, rows):
        difference = max_difference(a[top:top + rows], b[top:top + rows])
        if levels:
            counts += np.bincount(difference.ravel(), minlength=256)
        else:
            whole[top:top + len(difference)] = difference
        if k > 1:  # padded with zero, no difference: the maximum of a partial block is its pixels'
            padded = np.zeros((-(-len(difference) // k) * k, shown.shape[1] * k), shown.dtype)
            padded[:len(difference), :width] = difference
            difference = padded.reshape(len(padded) // k, k, shown.shape[1], k).max(axis=(1, 3))
        shown[top // k:top // k + len(difference)] = difference
    scale_top = percentile_of_levels(counts, PERCENTILE) if levels else float(np.percentile(whole, PERCENTILE))
    return shown.astype(np.float64), scale_top


def figure_bytes(height: int, width: int) -> int:
    """Bytes ``crop_box`` and ``heatmap`` (and matplotlib drawing it) take at most for a ``height`` x ``width``
    uint8 image, beyond the images themselves: a step of the window search, or the drawn map and a band of rows."""
    size = crop_side(height, width)
    rows = min(height - size + 1, search_rows(width)) + size + 1
    search = SEARCH_BUFFERS * 8 * (width + 1) * rows
    k = heatmap_block(height, width)
    drawn = -(-height // k) * -(-width // k)
    rows = min(-(-height // k) * k, k * max(1, BAND_BYTES // (8 * width * k)))  # ``heatmap``'s band of rows
    band = 32 * width * rows  # its differences and histogram indices
    return max(search, DRAW_BYTES_PER_PIXEL * drawn + band)
