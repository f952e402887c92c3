"""PSNR and SSIM as in BasicSR ``metrics/psnr_ssim.py`` (MATLAB-equivalent).

Conventions:
- inputs are HxWxC uint8 (or float in [0, 255]) images in RGB order;
- ``crop_border`` pixels are removed from each edge before measuring (SR uses crop = scale);
- ``y_channel=True`` measures the BT.601 luma, ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``
  on the [0, 255] scale, as MATLAB's ``rgb2ycbcr``;
- PSNR uses a peak of 255 and float64 arithmetic;
- SSIM is Wang et al. 2004: Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, 'valid'
  filtering; for colour the mean over channels;
- both run over blocks of at most ``BLOCK_PIXELS`` (SSIM's blocks overlap by the window), so a large
  image costs a few float64 blocks, not a dozen float64 copies of itself; an image within one block
  is measured exactly as a whole, a larger one within 1e-12 of that (only the order of the sums differs).
"""

from __future__ import annotations

import cv2
import numpy as np

SSIM_WINDOW = 11  # side of the Gaussian window; SSIM needs images at least this large
BLOCK_PIXELS = 1 << 19  # pixels of one block measured at once (each float64 plane of it: 4 MiB)
BLOCK_WIDTH = 4096  # columns of a block of a wider image
# what a block costs at most: SSIM's planes of one channel (both images, squares, product, five filtered, the
# map's terms) and both blocks in float64, three channels each
METRIC_WORK_BYTES = (16 + 6) * 8 * BLOCK_PIXELS


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma on the [16, 235] scale from an RGB image on [0, 255] (float64)."""
    rgb = image.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _prepare(image: np.ndarray, crop_border: int, y_channel: bool) -> np.ndarray:
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
    image = rgb_to_y(image)[..., None] if y_channel else image.astype(np.float64)
    return image if image.ndim == 3 else image[..., None]


def _cropped(image: np.ndarray, crop_border: int) -> np.ndarray:
    image = image[crop_border:-crop_border, crop_border:-crop_border] if crop_border else image
    return image if image.ndim == 3 else image[..., None]


def blocks(height: int, width: int, overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of blocks tiling a ``height`` x ``width`` grid, each with ``overlap`` more
    rows and columns at most ``BLOCK_PIXELS``: the whole grid when it fits."""
    if (height + overlap) * (width + overlap) <= BLOCK_PIXELS:
        return [(0, height, 0, width)]
    columns = min(width, BLOCK_WIDTH)
    rows = max(1, BLOCK_PIXELS // (columns + overlap) - overlap)
    return [(top, min(height, top + rows), left, min(width, left + columns))
            for top in range(0, height, rows) for left in range(0, width, columns)]


def squared_error_sum(img: np.ndarray, ref: np.ndarray, y_channel: bool = False) -> float:
    """Sum of squared differences of two same-shape images (or of their luma), block by block in float64."""
    img, ref = _cropped(img, 0), _cropped(ref, 0)
    total = 0.0
    for top, bottom, left, right in blocks(*img.shape[:2]):
        a = _prepare(img[top:bottom, left:right], 0, y_channel)
        b = _prepare(ref[top:bottom, left:right], 0, y_channel)
        a -= b
        total += float(np.sum(a * a))
    return total


def psnr(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images).

    Args:
        img: the image to score, HxWxC (or HxW) uint8, or float on [0, 255], RGB order.
        ref: the reference, the same shape and convention.
        crop_border: pixels removed from each edge of both before measuring (SR: the scale).
        y_channel: measure the BT.601 luma (``rgb_to_y``) instead of every channel.
    """
    if img.shape != ref.shape:
        raise ValueError(f"shapes differ: {img.shape} vs {ref.shape}")
    a, b = _cropped(img, crop_border), _cropped(ref, crop_border)
    count = a.shape[0] * a.shape[1] * (1 if y_channel else a.shape[2])
    mse = squared_error_sum(a, b, y_channel) / count
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def max_abs_difference(img: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference of two same-shape images, in float64, block by block."""
    img, ref = _cropped(img, 0), _cropped(ref, 0)
    return max(float(np.abs(_prepare(img[top:bottom, left:right], 0, False)
                            - _prepare(ref[top:bottom, left:right], 0, False)).max())
               for top, bottom, left, right in blocks(*img.shape[:2]))


def _ssim_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of the SSIM map of two float64 planes over their 'valid' part."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(SSIM_WINDOW, 1.5)
    window = kernel @ kernel.T
    half = SSIM_WINDOW // 2

    def valid(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[half:-half, half:-half]

    mu_a, mu_b = valid(a), valid(b)
    var_a = valid(a * a) - mu_a**2
    var_b = valid(b * b) - mu_b**2
    cov = valid(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(np.sum(ssim_map))


def ssim(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity in [0, 1] (for colour, the mean over channels).

    Args:
        img: the image to score, HxWxC (or HxW) uint8, or float on [0, 255], RGB order.
        ref: the reference, the same shape and convention.
        crop_border: pixels removed from each edge of both before measuring (SR: the scale); what is
            left must be at least ``SSIM_WINDOW`` a side (ValueError otherwise).
        y_channel: measure the BT.601 luma (``rgb_to_y``) instead of every channel.
    """
    if img.shape != ref.shape:
        raise ValueError(f"shapes differ: {img.shape} vs {ref.shape}")
    if min(img.shape[:2]) - 2 * crop_border < SSIM_WINDOW:
        raise ValueError(f"{img.shape[1]}x{img.shape[0]} less a {crop_border} px border is smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    img, ref = _cropped(img, crop_border), _cropped(ref, crop_border)
    margin = SSIM_WINDOW - 1
    rows, columns = img.shape[0] - margin, img.shape[1] - margin  # the 'valid' map
    channels = 1 if y_channel else img.shape[2]
    sums = [0.0] * channels
    for top, bottom, left, right in blocks(rows, columns, margin):
        window = (slice(top, bottom + margin), slice(left, right + margin))
        a, b = _prepare(img[window], 0, y_channel), _prepare(ref[window], 0, y_channel)
        for channel in range(channels):
            sums[channel] += _ssim_sum(np.ascontiguousarray(a[..., channel]), np.ascontiguousarray(b[..., channel]))
    return float(np.mean([total / (rows * columns) for total in sums]))
