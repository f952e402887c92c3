"""Image reading conversions and the seed's pre/post-processing."""

import cv2
import numpy as np
import pytest

from dipnet_deploy.errors import InputError
from dipnet_deploy.imageio import read_rgb8, vendor_postprocess, vendor_preprocess


@pytest.fixture
def bgr():
    return (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)


def test_colour_png_is_rgb(tmp_path, bgr):
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    rgb, notes = read_rgb8(tmp_path / "c.png")
    assert np.array_equal(rgb, bgr[..., ::-1]) and notes == []


def test_conversions_are_explicit(tmp_path, bgr):
    gray = bgr[..., 0]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    rgb, notes = read_rgb8(tmp_path / "g.png")
    assert np.array_equal(rgb, np.repeat(gray[..., None], 3, 2)) and notes == ["gray replicated to RGB"]

    bgra = np.concatenate([bgr, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    rgb, notes = read_rgb8(tmp_path / "a.png")
    assert np.array_equal(rgb, bgr[..., ::-1]) and notes == ["alpha channel dropped"]

    deep = bgr.astype(np.uint16) * 257  # 8-bit values scaled exactly to 16 bits
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    rgb, notes = read_rgb8(tmp_path / "d.png")
    assert np.array_equal(rgb, bgr[..., ::-1]) and notes == ["16-bit converted to 8-bit"]


def test_unreadable_files_raise_input_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="x.png: not a readable image"):
        read_rgb8(tmp_path / "x.png")
    with pytest.raises(InputError, match="no such file"):
        read_rgb8(tmp_path / "missing.png")


def test_seed_pre_and_post_processing(bgr):
    rgb = bgr[..., ::-1]
    x = vendor_preprocess(rgb, 20, 30)  # same size: resize is the identity
    assert x.shape == (1, 3, 20, 30) and x.dtype == np.float32
    assert np.allclose(x[0, 0], bgr[..., 2] / 255.0)  # channel 0 is red
    assert np.array_equal(vendor_postprocess(x), bgr)  # back to BGR uint8 exactly
    resized = vendor_preprocess(rgb, 40, 60)
    expected = cv2.resize(bgr, (60, 40), interpolation=cv2.INTER_LINEAR)[..., ::-1].transpose(2, 0, 1) / 255.0
    assert np.allclose(resized[0], expected, atol=1e-7)
    assert np.array_equal(vendor_postprocess(np.full((1, 3, 2, 2), 0.5019608, np.float32))[0, 0], [128, 128, 128])


def test_missing_shared_data_skips_or_fails_under_require_shared(tmp_path, monkeypatch):
    from .conftest import need

    monkeypatch.delenv("DIPNET_REQUIRE_SHARED", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent"):
        need(tmp_path / "missing")
    monkeypatch.setenv("DIPNET_REQUIRE_SHARED", "1")
    with pytest.raises(pytest.fail.Exception, match="DIPNET_REQUIRE_SHARED=1"):
        need(tmp_path / "missing")
    assert need(tmp_path) == tmp_path


def test_importing_the_package_changes_no_global_state():
    """No import-time side effects: Pillow's bomb limit stays Pillow's, matplotlib's pyplot (and its global
    backend choice) is never imported, the root logger keeps its level; a header read restores the limit."""
    import subprocess
    import sys

    script = """
import logging, sys
import PIL.Image as Image
limit, level = Image.MAX_IMAGE_PIXELS, logging.getLogger().level
import dipnet_deploy.cli, dipnet_deploy.report, dipnet_deploy.imageio, dipnet_deploy.quantize, dipnet_deploy.compare
assert Image.MAX_IMAGE_PIXELS == limit, Image.MAX_IMAGE_PIXELS
assert "matplotlib.pyplot" not in sys.modules
assert logging.getLogger().level == level
import numpy as np, cv2, pathlib, tempfile
path = pathlib.Path(tempfile.mkdtemp()) / "a.png"
cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))
dipnet_deploy.imageio.read_header(path)
assert Image.MAX_IMAGE_PIXELS == limit
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("text", ["5_0", "\u0665\u0660", " 50", "1e3", "nan", "inf", "0", "-5"])
def test_limits_read_from_python_take_plain_positive_numbers_only(text, monkeypatch):
    """What the command line refuses in these variables, the library refuses too (``float`` takes 5_0)."""
    from dipnet_deploy.imageio import max_memory_bytes, max_pixels

    for variable, read in (("DIPNET_MAX_MEGAPIXELS", max_pixels), ("DIPNET_MAX_MEMORY_MB", max_memory_bytes)):
        monkeypatch.setenv(variable, text)
        with pytest.raises(InputError, match=variable):
            read()
        monkeypatch.setenv(variable, "2.5")
        assert read() == (2_500_000 if variable == "DIPNET_MAX_MEGAPIXELS" else int(2.5 * 2**20))
