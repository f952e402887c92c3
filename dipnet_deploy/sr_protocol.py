"""The SR benchmark protocol (BasicSR convention) shared by ``train`` validation and ``compare``.

HR is cropped to a multiple of the scale; LR = uint8(round(MATLAB bicubic(HR, 1/scale)));
SR output is rounded to uint8; PSNR/SSIM on Y (and RGB) with crop_border = scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dipnet_deploy.imageio import to_uint8_rgb
from dipnet_deploy.matlab_resize import bicubic_lr, crop_to_multiple
from dipnet_deploy.metrics import SSIM_WINDOW, psnr, ssim

if TYPE_CHECKING:
    import torch


def unscorable(hr: np.ndarray, scale: int) -> str | None:
    """Why HR image ``hr`` cannot be scored at ``scale`` (None when it can).

    After cropping to a multiple of the scale and removing ``scale`` px per edge, an SSIM window must
    fit; and a flat image (one colour) is reproduced exactly by any upscaler, so its PSNR is infinite.
    """
    need = -(-(SSIM_WINDOW + 2 * scale) // scale) * scale  # the smallest such multiple of the scale
    if min(hr.shape[:2]) < need:
        return f"{hr.shape[1]}x{hr.shape[0]} is too small for x{scale} (PSNR/SSIM need at least {need} px a side)"
    if hr.min() == hr.max():
        return "is one flat colour (its PSNR would be infinite)"
    return None


def make_pair(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR cropped to a multiple of scale, its uint8 MATLAB-bicubic LR)."""
    hr = crop_to_multiple(hr, scale)
    return hr, bicubic_lr(hr, scale)


def to_input(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> [1, 3, H, W] float32 in [0, 1]."""
    return (rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)[None]


def run_torch_whole(model: torch.nn.Module, lr: np.ndarray) -> np.ndarray:
    """Whole-image PyTorch forward of a uint8 RGB LR; returns the rounded uint8 SR."""
    import torch  # here, not at the top: compare and upscale never need it (some 200 MB of memory)

    device = next(model.parameters()).device
    with torch.no_grad():
        output = model(torch.from_numpy(to_input(lr)).to(device)).cpu().numpy()
    return to_uint8_rgb(output)


def score(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """PSNR/SSIM on Y and RGB with crop_border = scale."""
    return {
        "psnr_y": psnr(sr, hr, scale, y_channel=True),
        "ssim_y": ssim(sr, hr, scale, y_channel=True),
        "psnr_rgb": psnr(sr, hr, scale),
        "ssim_rgb": ssim(sr, hr, scale),
    }
