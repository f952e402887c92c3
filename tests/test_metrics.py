"""MATLAB bicubic against published numbers; PSNR/SSIM against scikit-image."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dipnet_deploy.imageio import read_rgb8
from dipnet_deploy.matlab_resize import imresize, resize_matrix
from dipnet_deploy.metrics import psnr, rgb_to_y, ssim
from dipnet_deploy.sr_protocol import make_pair

from .conftest import EVAL, need


@pytest.mark.parametrize("scale, published", [(2, 33.66), (4, 28.42)])
def test_bicubic_set5_reproduces_published_y_psnr(scale, published):
    values = []
    for path in sorted(need(EVAL / "Set5").iterdir()):
        hr, lr = make_pair(read_rgb8(path)[0], scale)
        values.append(psnr(imresize(lr, scale), hr, crop_border=scale, y_channel=True))
    assert np.mean(values) == pytest.approx(published, abs=0.03)


def test_resize_matrix_properties():
    down = resize_matrix(12, 6, 0.5)
    assert np.allclose(down.sum(axis=1), 1.0)  # rows are normalized interpolation weights
    # antialiased x1/2 bicubic taps (MATLAB): cubic(x / 2) / 2 at distances 0.5, 1.5, 2.5, 3.5, normalized
    taps = np.array([0.5, 1.5, 2.5, 3.5]) / 2
    weights = np.where(taps <= 1, 1.5 * taps**3 - 2.5 * taps**2 + 1, -0.5 * taps**3 + 2.5 * taps**2 - 4 * taps + 2)
    interior = down[3, 3:11]  # output 4 (1-based) sits at input 7.5: taps 4..11 (1-based)
    expected = np.concatenate([weights[::-1], weights]) / (2 * weights.sum())
    assert np.allclose(interior, expected)
    assert np.allclose(imresize(np.full((9, 7), 77.0), 0.5), 77.0)  # constants stay constant


def test_psnr_ssim_match_scikit_image():
    rng = np.random.default_rng(0)
    ref = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    img = np.clip(ref.astype(np.int16) + rng.integers(-12, 13, ref.shape), 0, 255).astype(np.uint8)
    border = 2
    a, b = rgb_to_y(img)[border:-border, border:-border], rgb_to_y(ref)[border:-border, border:-border]
    assert psnr(img, ref, border, y_channel=True) == pytest.approx(
        peak_signal_noise_ratio(b, a, data_range=255), abs=1e-9)
    expected = structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim(img, ref, border, y_channel=True) == pytest.approx(expected, abs=1e-6)
    expected_rgb = structural_similarity(img.astype(np.float64), ref.astype(np.float64), data_range=255,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         channel_axis=2)
    assert ssim(img, ref) == pytest.approx(expected_rgb, abs=1e-6)
