"""PSNR and SSIM as in BasicSR ``metrics/psnr_ssim.py`` (MATLAB-equivalent).

Conventions:
- inputs are HxWxC uint8 (or float in [0, 255]) images in RGB order;
- ``crop_border`` pixels are removed from each edge before measuring (SR uses crop = scale);
- ``y_channel=True`` measures the BT.601 luma, ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``
  on the [0, 255] scale, as MATLAB's ``rgb2ycbcr``;
- PSNR uses a peak of 255 and float64 arithmetic;
- SSIM is Wang et al. 2004: Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, 'valid'
  filtering; for colour the mean over channels.
"""

from __future__ import annotations

import cv2
import numpy as np

SSIM_WINDOW = 11  # side of the Gaussian window; SSIM needs images at least this large


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma on the [16, 235] scale from an RGB image on [0, 255] (float64)."""
    rgb = image.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _prepare(image: np.ndarray, crop_border: int, y_channel: bool) -> np.ndarray:
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
    image = rgb_to_y(image)[..., None] if y_channel else image.astype(np.float64)
    return image if image.ndim == 3 else image[..., None]


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
    a, b = _prepare(img, crop_border, y_channel), _prepare(ref, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _ssim_single(a: np.ndarray, b: np.ndarray) -> float:
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
    return float(ssim_map.mean())


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
    a, b = _prepare(img, crop_border, y_channel), _prepare(ref, crop_border, y_channel)
    return float(np.mean([_ssim_single(a[..., c], b[..., c]) for c in range(a.shape[2])]))
