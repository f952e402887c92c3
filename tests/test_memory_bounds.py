"""Memory of large images: upscale and compare hold uint8 images and bands, never whole float copies; an
image whose header says it would take more than DIPNET_MAX_MEMORY_MB is refused before it is decoded.

The references here are the whole-image implementations these replaced (float tiling, dense resize
matrices, whole-image float64 metrics), kept as they were, so a change of any number shows.
"""

from __future__ import annotations

import io
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dipnet_deploy import error_maps, imageio, matlab_resize, metrics
from dipnet_deploy.compare import REPORT_BYTES, REPORT_BYTES_PER_PIXEL, compare_bytes
from dipnet_deploy.errors import InputError
from dipnet_deploy.imageio import PngWriter, decode_bytes, read_header, read_rgb8, to_uint8_rgb
from dipnet_deploy.sr_protocol import make_pair, to_input
from dipnet_deploy.tiling import TiledRunner
from dipnet_deploy.upscale import upscale_bytes, upscale_rgb

from .conftest import EVAL, need, resize_matrix

# --------------------------------------------------------------------------- models and images


def conv_x2(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A 3x3 Conv (3 -> 12) and DepthToSpace x2 with fixed input 1x3xHxW: a local model (radius 1), its
    outputs partly outside [0, 1] so that clipping and rounding are exercised."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((12, 3, 3, 3)) * 0.15).astype(np.float32)
    weight[:, :, 1, 1] += 0.4
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["pre"], pads=[1, 1, 1, 1]),
         helper.make_node("DepthToSpace", ["pre"], ["output"], blocksize=2)], "conv_x2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2 * height, 2 * width])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def smooth(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((height, width, 3)) * 255).astype(np.uint8), (5, 5), 1.2)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares ``width`` x ``height`` 8-bit RGB, with a few bytes of data: what a bomb's
    header says, a header read costs nothing, a decode would."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width))) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def model16x24(tmp_path_factory) -> Path:
    return conv_x2(tmp_path_factory.mktemp("conv") / "m.onnx", 16, 24)


@pytest.fixture
def decodes(monkeypatch) -> list:
    """Every call of the decoder ``read_rgb8`` uses (its path), recorded."""
    calls = []
    real = cv2.imdecode

    def recorded(data, flags):
        calls.append(len(data))
        return real(data, flags)

    monkeypatch.setattr(imageio.cv2, "imdecode", recorded)
    return calls


def one_line(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if "%|" not in line and line.strip()]


# --------------------------------------------------------------------------- the tiled uint8 path


@pytest.mark.parametrize("height, width", [(16, 24), (10, 12), (37, 61), (5, 100), (100, 5), (33, 24), (17, 25)])
def test_bands_equal_the_whole_float_path_exactly(model16x24, height, width):
    """``bands``/``run_rgb8`` (tile by tile into uint8) give what ``run`` on the whole float32 image, rounded,
    gives: bit for bit, for images smaller than a tile (mirror-padded), one tile, and many."""
    runner = TiledRunner(str(model16x24))
    rgb = (np.random.default_rng(height * width).random((height, width, 3)) * 255).astype(np.uint8)
    whole, tiles = runner.run(to_input(rgb))
    expected = to_uint8_rgb(whole)
    got, count = runner.run_rgb8(rgb)
    assert count == tiles and got.dtype == np.uint8 and got.flags.c_contiguous
    assert np.array_equal(got, expected)
    bands = list(runner.bands(rgb))
    assert sum(len(band) for band in bands) == 2 * height
    assert max(len(band) for band in bands) <= runner.band_rows(height)
    assert np.array_equal(np.concatenate(bands), expected)
    assert np.array_equal(upscale_rgb(runner, rgb), expected)


class DriftingRunner(TiledRunner):
    """Tiling around a forward whose output changes with every call (as a model with a global field sees each
    tile differently): where tile cores overlap, which tile's pixels are kept shows."""

    def __init__(self, tile_h: int, tile_w: int, halo: int):
        self.tile_h, self.tile_w, self.scale, self.halo, self.calls = tile_h, tile_w, 2, halo, 0

    def forward(self, tile: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (tile * 0.9 + 0.013 * self.calls).repeat(2, axis=2).repeat(2, axis=3).astype(np.float32)


@pytest.mark.parametrize("height, width", [(21, 29), (47, 28), (58, 83), (200, 31)])
def test_bands_keep_the_pixels_run_keeps_where_cores_overlap(height, width):
    rgb = (np.random.default_rng(7).random((height, width, 3)) * 255).astype(np.uint8)
    expected = to_uint8_rgb(DriftingRunner(20, 28, 4).run(to_input(rgb))[0])
    assert np.array_equal(DriftingRunner(20, 28, 4).run_rgb8(rgb)[0], expected)
    assert np.array_equal(np.concatenate(list(DriftingRunner(20, 28, 4).bands(rgb))), expected)


def test_tiled_uint8_equals_a_whole_image_onnxruntime_run(tmp_path):
    """A local model through 16x24 tiles gives what the same weights give run on the whole 45x70 image."""
    height, width = 45, 70
    tiled = TiledRunner(str(conv_x2(tmp_path / "tile.onnx", 16, 24, seed=3)))
    whole = ort.InferenceSession(str(conv_x2(tmp_path / "whole.onnx", height, width, seed=3)),
                                 providers=["CPUExecutionProvider"])
    rgb = smooth(height, width, 1)
    reference = whole.run(None, {"input": to_input(rgb)})[0]
    got, tiles = tiled.run_rgb8(rgb)
    assert tiles >= 9
    assert np.abs(tiled.run(to_input(rgb))[0] - reference).max() <= 1e-6
    assert np.array_equal(got, to_uint8_rgb(reference))


# --------------------------------------------------------------------------- PNG written band by band


@pytest.mark.parametrize("height, width, cuts", [(37, 53, [1, 8, 20]), (1, 1, []), (130, 7, [64, 65, 129])])
def test_png_writer_round_trips_exactly(height, width, cuts):
    rgb = smooth(height, width, height)
    buffer = io.BytesIO()
    writer = PngWriter(buffer, width, height)
    for start, end in zip([0, *cuts], [*cuts, height]):
        writer.write(rgb[start:end])
    writer.close()
    data = buffer.getvalue()
    assert np.array_equal(cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED),
                                       cv2.COLOR_BGR2RGB), rgb)
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # Pillow checks every chunk's CRC and the stream's end
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), rgb)


def test_png_writer_is_about_opencvs_size_and_refuses_a_short_image():
    rgb = smooth(300, 400, 2)
    buffer = io.BytesIO()
    writer = PngWriter(buffer, 400, 300)
    writer.write(rgb)
    writer.close()
    ours, theirs = len(buffer.getvalue()), len(cv2.imencode(".png", rgb)[1])
    assert 0.8 * theirs <= ours <= 1.2 * theirs, (ours, theirs)  # the same filter and deflate settings
    writer = PngWriter(io.BytesIO(), 400, 300)
    writer.write(rgb[:299])
    with pytest.raises(ValueError, match="299 of the 300 rows"):
        writer.close()
    with pytest.raises(ValueError, match="rows x 400 x 3 uint8"):
        writer.write(rgb[:, :399])


def test_upscaled_png_is_the_whole_image_result(model16x24, tmp_path, invoke):
    """The CLI's PNG (written band by band) decodes to the whole float path's rounded output."""
    rgb = smooth(45, 70, 4)
    cv2.imwrite(str(tmp_path / "in.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    code, _, err = invoke("upscale", tmp_path / "in.png", "--model", model16x24, "-o", tmp_path / "out")
    assert code == 0, err
    expected = to_uint8_rgb(TiledRunner(str(model16x24)).run(to_input(rgb))[0])
    assert np.array_equal(read_rgb8(tmp_path / "out" / "in.png")[0], expected)
    from dipnet_deploy.upscale import upscaled_png  # what a Ray worker sends back

    data, _ = upscaled_png(TiledRunner(str(model16x24)), tmp_path / "in.png")
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1], expected)


# --------------------------------------------------------------------------- refused from the header


def test_header_over_the_budget_is_refused_before_decoding(model16x24, tmp_path, invoke, monkeypatch, decodes):
    """20000x20000 declared in a 1 KB file, within a raised megapixel limit: one line naming the file, the
    pixels, the memory and the variable to raise, exit 2, nothing written, the decoder never called."""
    monkeypatch.setenv("DIPNET_MAX_MEGAPIXELS", "1000")
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    code, _, err = invoke("upscale", bomb, "--model", model16x24, "-o", tmp_path / "out")
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for words in ("bomb.png", "20000x20000", "400.0 megapixels", "MiB", "DIPNET_MAX_MEMORY_MB", "upscale it x2"):
        assert words in lines[0], (words, lines[0])
    assert decodes == [] and not (tmp_path / "out").exists()


def budget_given(how: str, mib: str, monkeypatch) -> list[str]:
    """The memory budget ``mib`` set as ``how`` says: in the environment, or as the CLI's option (the arguments
    to put before the command); the environment is restored after the test either way (the option sets it)."""
    if how == "env":
        monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", mib)
        return []
    monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", "")  # recorded, so that teardown restores what was there before
    monkeypatch.delenv("DIPNET_MAX_MEMORY_MB")
    return ["--max-memory-mb", mib]


@pytest.mark.parametrize("how", ["env", "option"])
def test_a_real_bomb_over_a_low_budget_is_refused_and_a_raised_budget_lets_it_through(how, tmp_path, invoke,
                                                                                    monkeypatch, decodes):
    """A 2000x1500 black PNG (some 10 KB: a real bomb, decodable) over a 10 MiB budget (DIPNET_MAX_MEMORY_MB or
    --max-memory-mb); the estimate the message gives is the budget that lets it through."""
    model = conv_x2(tmp_path / "m.onnx", 500, 700)
    bomb = tmp_path / "black.png"
    cv2.imwrite(str(bomb), np.zeros((1500, 2000, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert bomb.stat().st_size < 20_000
    code, _, err = invoke(*budget_given(how, "10", monkeypatch), "upscale", bomb, "--model", model, "-o", tmp_path / "out")
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "black.png" in lines[0] and decodes == [], err
    need_mib = int(lines[0].split("DIPNET_MAX_MEMORY_MB to ")[1].split()[0])
    assert need_mib == math.ceil(upscale_bytes(read_header(bomb), TiledRunner(str(model))) / 2**20)
    code, _, err = invoke(*budget_given(how, str(need_mib), monkeypatch), "upscale", bomb, "--model", model,
                          "-o", tmp_path / "out")
    assert code == 0 and decodes, err
    assert cv2.imread(str(tmp_path / "out" / "black.png")).shape == (3000, 4000, 3)


def test_compare_skips_an_image_over_the_budget_before_decoding_and_scores_the_rest(tmp_path, invoke, monkeypatch,
                                                                                  decodes):
    fp32 = conv_x2(tmp_path / "m.onnx", 32, 48)
    data = tmp_path / "hr"
    data.mkdir()
    cv2.imwrite(str(data / "a.png"), smooth(96, 128, 5))
    monkeypatch.setenv("DIPNET_MAX_MEGAPIXELS", "1000")
    png_header_only(data / "bomb.png", 12000, 9000)
    code, _, err = invoke("compare", tmp_path / "report", "--fp32", fp32, "--data", data, "--repeats", "1")
    assert code == 0, err
    warning = [line for line in one_line(err) if "bomb.png" in line]
    assert len(warning) == 1 and "108.0 megapixels" in warning[0] and "DIPNET_MAX_MEMORY_MB" in warning[0], err
    assert "score it x2" in warning[0]
    assert len(decodes) == 2  # a.png, scored, then read again for the report's pictures; never the bomb
    assert (tmp_path / "report" / "metrics.json").is_file()


@pytest.mark.parametrize("how", ["env", "option"])
@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e300", "9e12"])
def test_a_budget_that_is_no_number_of_mib_is_refused_before_any_work(how, value, model16x24, tmp_path, invoke,
                                                                      monkeypatch):
    """One line naming what the user set (the variable or the option), exit 2, nothing written."""
    cv2.imwrite(str(tmp_path / "in.png"), smooth(20, 20, 0))
    given = budget_given(how, value, monkeypatch)
    code, _, err = invoke(*given, "upscale", tmp_path / "in.png", "--model", model16x24, "-o", tmp_path / "out")
    lines = one_line(err)
    name = "DIPNET_MAX_MEMORY_MB" if how == "env" else "--max-memory-mb"
    assert code == 2 and len(lines) == 1 and name in lines[0] and "MiB" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_budget_option_is_documented_and_reaches_compare(tmp_path, invoke, monkeypatch):
    """--help names the option and its variable; --max-memory-mb applies to compare's images as the variable
    does (a skipped image names the budget)."""
    code, out, _ = invoke("--help")
    assert code == 0 and "--max-memory-mb" in out and "DIPNET_MAX_MEMORY_MB" in out
    fp32 = conv_x2(tmp_path / "m.onnx", 32, 48)
    data = tmp_path / "hr"
    data.mkdir()
    cv2.imwrite(str(data / "a.png"), smooth(96, 128, 5))
    code, _, err = invoke(*budget_given("option", "1", monkeypatch), "compare", tmp_path / "report", "--fp32", fp32,
                          "--data", data, "--repeats", "1")
    skipped = [line for line in one_line(err) if line.startswith("warning: skipped")]
    assert code == 2 and len(skipped) == 1 and "a.png" in skipped[0] and "over the 1 MiB budget" in skipped[0], err
    assert one_line(err)[-1].startswith("dipnet-deploy: error: ") and "no usable HR images" in one_line(err)[-1]


def _encoded(path: Path, array: np.ndarray, kind: str) -> Path:
    if kind == "palette":
        Image.fromarray(array[..., 0]).convert("P").save(path)
    else:
        assert cv2.imwrite(str(path), array)
    return path


@pytest.mark.parametrize("name, array, kind, layout", [
    ("rgb.png", np.full((30, 40, 3), 9, np.uint8), "", (3, 1)),
    ("gray.png", np.full((30, 40), 9, np.uint8), "", (1, 1)),
    ("rgba.png", np.full((30, 40, 4), 9, np.uint8), "", (4, 1)),
    ("rgb16.png", np.full((30, 40, 3), 999, np.uint16), "", (3, 2)),
    ("gray16.png", np.full((30, 40), 999, np.uint16), "", (1, 2)),
    ("rgba16.png", np.full((30, 40, 4), 999, np.uint16), "", (4, 2)),
    ("pal.png", np.full((30, 40, 3), 9, np.uint8), "palette", (4, 1)),
    ("rgb.jpg", np.full((30, 40, 3), 9, np.uint8), "", (3, 1)),
    ("gray.jpg", np.full((30, 40), 9, np.uint8), "", (1, 1)),
    ("rgb16.tif", np.full((30, 40, 3), 999, np.uint16), "", (3, 2)),
    ("rgba.webp", np.full((30, 40, 4), 9, np.uint8), "", (4, 1)),
    ("rgb.bmp", np.full((30, 40, 3), 9, np.uint8), "", (3, 1)),
])
def test_header_layout_bounds_what_the_decoder_gives(tmp_path, name, array, kind, layout):
    """The channels and bytes per sample read from the header (Pillow says "RGB" for a 16-bit PNG or TIFF)
    are what OpenCV decodes, or more (a palette may come out with alpha), never less."""
    path = _encoded(tmp_path / name, array, kind)
    header = read_header(path)
    decoded = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    assert (header.width, header.height) == (40, 30)
    assert (header.channels, header.sample_bytes) == layout
    assert header.channels >= channels and header.sample_bytes >= decoded.itemsize
    assert decode_bytes(header) >= header.file_bytes + 2 * decoded.nbytes


def test_estimates_count_what_each_command_holds_per_pixel(model16x24, tmp_path):
    runner = TiledRunner(str(model16x24))
    for side in (1000, 4000):
        header = read_header(png_header_only(tmp_path / f"{side}.png", side, side))
        pixels = header.pixels
        # decoding: OpenCV's buffer and its copy (the file is some bytes); a band of tiles is small here
        assert 6 * pixels <= upscale_bytes(header, runner) <= 6 * pixels + (8 << 20)
        # the encoded PNG a Ray worker sends back: up to the raw x2 output (12 B/px) beside the pixels
        assert upscale_bytes(header, runner, png_in_memory=True) >= 15 * pixels
        # the report: HR, fp32 and bicubic (3 B/px each), what it adds per pixel, its bands and drawn map (bounded)
        fp32 = compare_bytes(header, {"fp32": runner}, "sr", 2)
        figures = error_maps.figure_bytes(side, side) + REPORT_BYTES
        assert fp32 == (9 + REPORT_BYTES_PER_PIXEL) * pixels + figures and figures < 200 << 20
        assert compare_bytes(header, {"fp32": runner, "int8": runner}, "sr", 2) == fp32 + 3 * pixels
        # seed: the outputs are the model's size, whatever the image; the HR, its LR, the resize's bands
        assert compare_bytes(header, {"fp32": runner}, "seed", 2) <= 6 * pixels + (100 << 20)


# --------------------------------------------------------------------------- resize and metrics, lean


def dense_imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """The former whole-image ``imresize``: two products with dense float64 matrices."""
    height, width = image.shape[:2]
    out_h, out_w = int(math.ceil(height * scale)), int(math.ceil(width * scale))
    rows = resize_matrix(height, out_h, float(scale))
    cols = resize_matrix(width, out_w, float(scale))
    resized = np.tensordot(rows, image.astype(np.float64), axes=(1, 0))
    resized = np.moveaxis(np.tensordot(cols, resized, axes=(1, 1)), 0, 1)
    return np.floor(np.clip(resized, 0, 255) + 0.5).astype(np.uint8) if image.dtype == np.uint8 else resized


def set5() -> list[np.ndarray]:
    return [read_rgb8(path)[0] for path in sorted(need(EVAL / "Set5").iterdir())]


def test_banded_imresize_equals_the_dense_matrix_products(monkeypatch):
    """Bands of a few rows (forced small here) give the dense products' result: bit for bit at x2 and x4 (every
    weight a short binary fraction), uint8 equal and floats within 1e-12 at x3."""
    monkeypatch.setattr(matlab_resize, "BAND_BYTES", 20_000)
    rng = np.random.default_rng(0)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in [(37, 53), (60, 8), (5, 7)]]
    for image in images + [set5()[1][:96, :120]]:
        for scale in (2, 3, 4):
            hr = matlab_resize.crop_to_multiple(image, scale)
            for factor in (1 / scale, scale):
                assert np.array_equal(matlab_resize.imresize(hr, factor), dense_imresize(hr, factor)), (scale, factor)
                floats = hr.astype(np.float64)
                got, expected = matlab_resize.imresize(floats, factor), dense_imresize(floats, factor)
                assert got.shape == expected.shape
                assert np.array_equal(got, expected) if scale != 3 else np.abs(got - expected).max() <= 1e-12


def test_benchmark_pairs_unchanged_on_set5():
    for image in set5():
        for scale in (2, 4):
            hr, lr = make_pair(image, scale)
            assert np.array_equal(lr, dense_imresize(hr, 1 / scale))
            assert np.array_equal(matlab_resize.imresize(lr, scale), dense_imresize(lr, scale))


def whole_psnr(img: np.ndarray, ref: np.ndarray, crop: int, y: bool) -> float:
    """The former PSNR: whole-image float64 arrays."""
    a, b = (metrics._prepare(x, crop, y) for x in (img, ref))
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def whole_ssim(img: np.ndarray, ref: np.ndarray, crop: int, y: bool) -> float:
    """The former SSIM: whole-image float64 planes, one 'valid' map each."""
    a, b = (metrics._prepare(x, crop, y) for x in (img, ref))
    return float(np.mean([metrics._ssim_sum(a[..., c].copy(), b[..., c].copy())
                          / ((a.shape[0] - 10) * (a.shape[1] - 10)) for c in range(a.shape[2])]))


def _noisy(image: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("block_pixels", [1 << 19, 3000])
def test_metrics_in_blocks_match_the_whole_image_float64(monkeypatch, block_pixels):
    """One block (the default on these sizes): the same numbers bit for bit; many small blocks: within 1e-9 dB
    and 1e-10 (the order of the sums only), on random images and Set5."""
    monkeypatch.setattr(metrics, "BLOCK_PIXELS", block_pixels)
    monkeypatch.setattr(metrics, "BLOCK_WIDTH", 64)
    rng = np.random.default_rng(1)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in [(90, 130), (40, 300), (23, 19)]]
    for index, ref in enumerate(images + [image[:150, :200] for image in set5()]):
        img = _noisy(ref, index)
        for crop, y in [(0, False), (2, True), (4, False), (4, True)]:
            pairs = [(metrics.psnr(img, ref, crop, y), whole_psnr(img, ref, crop, y)),
                     (metrics.ssim(img, ref, crop, y), whole_ssim(img, ref, crop, y))]
            if block_pixels == 1 << 19:
                assert pairs[0][0] == pairs[0][1] and pairs[1][0] == pairs[1][1], (index, crop, y)
            else:
                assert abs(pairs[0][0] - pairs[0][1]) <= 1e-9 and abs(pairs[1][0] - pairs[1][1]) <= 1e-10
        assert metrics.max_abs_difference(img, ref) == float(np.abs(img.astype(float) - ref.astype(float)).max())


# --------------------------------------------------------------------------- the report's figures, lean


def whole_crop_box(diff: np.ndarray) -> tuple[int, int]:
    """The former crop search: an integral image of the whole float64 difference."""
    h, w = diff.shape
    size = min(error_maps.CROP, h, w)
    integral = np.pad(diff, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    top, left = np.unravel_index(np.argmax(sums), sums.shape)
    return int(top), int(left)


def whole_crops_figure(images: dict, title: str, path: Path, amplify: float) -> None:
    """The former ``report._crops_figure``: float64 copies and differences of the whole images."""
    import matplotlib.pyplot as plt

    reference = images.get("int8", images["fp32"])
    diff = np.abs(reference.astype(np.float64) - images["fp32"].astype(np.float64)).mean(axis=2)
    if "int8" not in images:
        diff = np.abs(images["fp32"].astype(np.float64) - images["hr"].astype(np.float64)).mean(axis=2)
    top, left = whole_crop_box(diff)
    size = min(error_maps.CROP, diff.shape[0], diff.shape[1])
    window = (slice(top, top + size), slice(left, left + size))
    panels = [("HR", images["hr"]), ("bicubic", images["bicubic"]), ("fp32", images["fp32"])]
    if "int8" in images:
        panels += [("int8", images["int8"]),
                   (f"|int8 - fp32| x{amplify:g}", np.clip(diff[..., None].repeat(3, 2) * amplify, 0, 255))]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.7), dpi=110)
    for ax, (name, image) in zip(axes, panels):
        ax.imshow(np.clip(np.asarray(image, dtype=np.float64)[window] / 255.0, 0, 1), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def whole_heatmap(images: dict, path: Path) -> str:
    """The former ``report._heatmap``: the whole float64 difference drawn, its percentile by numpy."""
    import matplotlib.pyplot as plt

    if "int8" in images:
        diff = np.abs(images["int8"].astype(np.float64) - images["fp32"].astype(np.float64)).max(axis=2)
        label = "|int8 - fp32| (8-bit levels, max over RGB)"
    else:
        diff = np.abs(images["fp32"].astype(np.float64) - images["hr"].astype(np.float64)).max(axis=2)
        label = "|fp32 - HR| (8-bit levels, max over RGB)"
    h, w = diff.shape
    fig, ax = plt.subplots(figsize=(6, 6 * h / w + 0.6), dpi=110)
    shown = ax.imshow(diff, cmap="magma", vmin=0, vmax=max(1.0, float(np.percentile(diff, 99.9))))
    ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return label


def worst_pictures(hr: np.ndarray, seed: int, int8: bool = True, floats: bool = False) -> dict[str, np.ndarray]:
    """What ``compare`` hands the report: HR, bicubic, fp32 and (sparsely off by a level or two) int8; with
    ``floats`` as the seed protocol does, float64 HR and unrounded float32 outputs on [0, 255]."""
    rng = np.random.default_rng(seed)
    fp32 = cv2.GaussianBlur(hr, (3, 3), 0.8)
    images = {"hr": hr, "bicubic": cv2.GaussianBlur(hr, (5, 5), 1.5), "fp32": fp32}
    if int8:
        step = rng.integers(-2, 3, fp32.shape) * (rng.random(fp32.shape) < 0.3)
        images["int8"] = np.clip(fp32.astype(np.int16) + step, 0, 255).astype(np.uint8)
    if floats:
        jitter = {name: rng.random(hr.shape, np.float32) - 0.5 for name in images}
        images = {name: (image.astype(np.float64) if name == "hr" else
                         np.clip(image.astype(np.float32) + jitter[name], 0, 255)) for name, image in images.items()}
    return images


def _pixels(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("int8, floats", [(True, False), (False, False), (True, True)],
                         ids=["int8", "fp32 alone", "seed protocol floats"])
def test_report_figures_are_the_whole_image_figures(tmp_path, int8, floats):
    """On a Set5 image and a random one, with and without int8, uint8 or float pictures: the crops and the
    heatmap the report draws (in bands) are the former whole-image figures, pixel for pixel (the same window,
    the same colour scale)."""
    from dipnet_deploy import report

    random = (np.random.default_rng(5).random((230, 347, 3)) * 255).astype(np.uint8)
    for index, hr in enumerate([set5()[1], random]):
        images = worst_pictures(hr, index, int8, floats)
        whole_crops_figure(images, "worst", tmp_path / "whole_crops.png", 32.0)
        report._crops_figure(images, "worst", tmp_path / "crops.png", 32.0)
        assert np.array_equal(_pixels(tmp_path / "crops.png"), _pixels(tmp_path / "whole_crops.png")), index
        assert report._heatmap(images, tmp_path / "heat.png") == whole_heatmap(images, tmp_path / "whole_heat.png")
        assert np.array_equal(_pixels(tmp_path / "heat.png"), _pixels(tmp_path / "whole_heat.png")), index


def _differing(height: int, width: int, seed: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "floats":  # the seed protocol's: float32 outputs on [0, 255], not rounded
        return (np.clip(a + rng.random(a.shape, np.float32) * 3, 0, 255),
                np.clip(a + rng.random(a.shape, np.float32) * 3, 0, 255))
    if kind == "noise":
        return a, np.clip(a.astype(np.int16) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    b = a.copy()  # sparse single-level flips: many windows tie, and ties must go to the first, as before
    b[rng.random((height, width)) < (0.01 if kind == "sparse" else 0.0)] ^= 1
    return a, b


@pytest.mark.parametrize("band_bytes", [error_maps.BAND_BYTES, 3000])
def test_crop_search_and_heatmap_numbers_are_the_whole_image_ones(monkeypatch, band_bytes):
    """The window (ties included) and the colour scale of the former whole-image search, bit for bit, on images
    smaller than the crop, one step and (with small bands) many steps of the search."""
    monkeypatch.setattr(error_maps, "BAND_BYTES", band_bytes)
    for seed, (height, width) in enumerate([(37, 53), (96, 200), (200, 96), (5, 7), (300, 301), (97, 400),
                                            (500, 20), (1000, 700)]):
        for kind in ("noise", "sparse", "equal", "floats"):
            a, b = _differing(height, width, seed, kind)
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            assert np.array_equal(error_maps.mean_difference(a, b), diff.mean(axis=2))
            top, left, size = error_maps.crop_box(a, b)
            assert (top, left) == whole_crop_box(diff.mean(axis=2)) and size == min(96, height, width)
            shown, scale_top = error_maps.heatmap(a, b)
            assert scale_top == float(np.percentile(diff.max(axis=2), 99.9)), (height, width, kind)
            assert np.array_equal(shown, diff.max(axis=2))  # drawn whole: within HEATMAP_SIDE


def test_percentile_of_levels_is_numpys():
    rng = np.random.default_rng(2)
    for _ in range(2000):
        values = rng.integers(0, int(rng.integers(1, 256)) + 1, int(rng.integers(1, 3000))).astype(np.uint8)
        values[rng.random(len(values)) < rng.random()] = 0  # long runs of one level, as a difference map has
        for percentile in (99.9, 50.0, 37.3):
            assert error_maps.percentile_of_levels(np.bincount(values, minlength=256), percentile) == float(
                np.percentile(values.astype(np.float64), percentile))


def test_heatmap_of_a_large_image_is_drawn_from_block_maxima(monkeypatch):
    """Over ``HEATMAP_SIDE`` (made small here) the map drawn is the maximum of each k x k block (partial blocks
    at the edges), at most that side; the colour scale still counts every pixel."""
    monkeypatch.setattr(error_maps, "HEATMAP_SIDE", 64)
    monkeypatch.setattr(error_maps, "BAND_BYTES", 5000)  # several bands, each whole blocks
    a, b = _differing(150, 203, 9, "noise")
    b[149, 202] = a[149, 202] ^ 200  # a lone large difference in the last, partial block
    full = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)
    shown, scale_top = error_maps.heatmap(a, b)
    k = error_maps.heatmap_block(150, 203)
    assert k == 4 and shown.shape == (38, 51) and max(shown.shape) <= 64
    padded = np.zeros((152, 204), np.int16)
    padded[:150, :203] = full
    assert np.array_equal(shown, padded.reshape(38, 4, 51, 4).max(axis=(1, 3)))
    assert shown[-1, -1] == full[149, 202] and scale_top == float(np.percentile(full, 99.9))


@pytest.mark.parametrize("height, width", [(1200, 1700), (100, 20000), (20000, 100), (97, 30000), (1030, 1030)])
def test_figures_take_what_figure_bytes_says_whatever_the_shape(height, width):
    """The crop search and the heatmap (numpy's allocations, traced) stay within ``figure_bytes``, a bound that
    does not grow with the image's height; the drawn map is at most ``HEATMAP_SIDE`` a side."""
    import tracemalloc

    a, b = _differing(height, width, 3, "noise")
    for step in (error_maps.crop_box, error_maps.heatmap):
        tracemalloc.start()
        try:
            result = step(a, b)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= error_maps.figure_bytes(height, width), (step.__name__, peak)
    assert max(result[0].shape) <= error_maps.HEATMAP_SIDE
    assert max(error_maps.figure_bytes(rows, 500) for rows in (5_000, 50_000, 500_000)) < 32 << 20
    assert error_maps.figure_bytes(10_000, 10_000) < 160 << 20


def test_heatmap_of_a_very_tall_image_is_a_bounded_figure(tmp_path):
    """A strip 40 pixels wide and 6000 tall (the former figure: 90,000 pixels tall, which Agg refuses)."""
    from dipnet_deploy import report

    hr = np.zeros((6000, 40, 3), np.uint8)
    images = worst_pictures(hr, 0)
    report._heatmap(images, tmp_path / "heat.png")
    report._crops_figure(images, "strip", tmp_path / "crops.png", 32.0)
    assert _pixels(tmp_path / "heat.png").shape[0] <= (6 * report.HEATMAP_ASPECT + 0.6) * 110 + 1


# --------------------------------------------------------------------------- measured: a child's peak memory


# the CLI, writing its own peak resident memory (VmHWM, KiB) to argv[1] as it exits: a child's ru_maxrss would
# include the memory of the test process it was forked from
PEAK_CLI = """
import atexit, sys
def peak(path=sys.argv[1]):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(peak)
sys.argv = ["dipnet-deploy", *sys.argv[2:]]
from dipnet_deploy.cli import run
run()
"""


def _peak_kib(args: list, env: dict, tmp_path: Path) -> int:
    """Peak resident memory (KiB) of the CLI run in a child process with ``args``; the run must succeed."""
    report = tmp_path / "peak.txt"
    done = subprocess.run([sys.executable, "-c", PEAK_CLI, str(report), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(report.read_text())


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc (Linux)")
def test_upscale_of_a_4_megapixel_image_costs_a_few_bytes_per_pixel(tmp_path):
    """What a 2400x1600 image adds to the peak memory of upscale x2, against an image of two tiles, stays
    within the estimate the budget is checked against, and under 10 bytes per input pixel (the whole-image
    float path took some 170: a float32 copy of the output alone is 48)."""
    model = conv_x2(tmp_path / "m.onnx", 256, 256)
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    cv2.imwrite(str(small), smooth(256, 400, 0))  # two tiles: the runtime's memory grows at its second forward
    y, x = np.mgrid[0:1600, 0:2400]
    picture = np.stack([(x * 7 + y) % 256, (x + y * 3) % 256, (x * y) % 256], axis=2).astype(np.uint8)
    cv2.imwrite(str(large), picture)
    env = {"OMP_NUM_THREADS": "1"}
    base = _peak_kib(["upscale", small, "--model", model, "-o", tmp_path / "a", "--threads", "1"], env, tmp_path)
    peak = _peak_kib(["upscale", large, "--model", model, "-o", tmp_path / "b", "--threads", "1"], env, tmp_path)
    added = (peak - base) * 1024
    pixels = 2400 * 1600
    estimate = upscale_bytes(read_header(large), TiledRunner(str(model)))
    assert added <= estimate, (added / pixels, estimate / pixels)
    assert added / pixels < 10, added / pixels
    print(f"added {added / pixels:.2f} B/px, estimate {estimate / pixels:.2f} B/px")  # measured 6.25 and 6.85
    assert cv2.imread(str(tmp_path / "b" / "large.png")).shape == (3200, 4800, 3)


# --------------------------------------------------------------------------- a JPEG's coefficient buffer


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x // 3) % 256, (y // 2) % 256, ((x + y) // 5) % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize("subsampling, progressive, per_pixel", [(0, True, 6), (2, True, 3), (0, False, 0),
                                                                 ("gray", True, 2)])
def test_a_progressive_jpeg_counts_its_coefficient_buffer(tmp_path, subsampling, progressive, per_pixel):
    """Two bytes per coefficient of every component, read from the markers (4:4:4: 6 bytes a pixel, 4:2:0: 3,
    gray: 2); a baseline JPEG has none. The buffer is beside the decoded image while libjpeg decodes."""
    image = Image.fromarray(_gradient(480, 640))
    path = tmp_path / "photo.jpg"
    if subsampling == "gray":
        image.convert("L").save(path, quality=90, progressive=progressive)
    else:
        image.save(path, quality=90, progressive=progressive, subsampling=subsampling)
    header = read_header(path)
    assert header.coefficient_bytes == per_pixel * 640 * 480
    decoded = header.pixels * header.channels
    assert decode_bytes(header) >= header.file_bytes + header.coefficient_bytes + decoded


def _jpeg_markers(frame: int, components: int, in_first_scan: int) -> bytes:
    """SOI, an APP0 segment, a frame header (marker ``frame``) of ``components`` 4:4:4 components, 64x48, and a
    scan header naming ``in_first_scan`` of them."""
    def segment(marker: int, data: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", 2 + len(data)) + data

    sof = struct.pack(">BHHB", 8, 48, 64, components) + b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    sos = bytes([in_first_scan]) + b"".join(bytes([i + 1, 0]) for i in range(in_first_scan)) + bytes([0, 63, 0])
    return b"\xff\xd8" + segment(0xE0, b"JFIF\x00") + segment(frame, sof) + segment(0xDA, sos)


@pytest.mark.parametrize("frame, in_first_scan, counted", [(0xC0, 3, False), (0xC0, 1, True), (0xC2, 3, True)])
def test_a_sequential_jpeg_with_a_scan_per_component_counts_the_buffer_too(tmp_path, frame, in_first_scan, counted):
    """libjpeg buffers the whole image whenever it comes in several scans: progressive, or sequential with fewer
    components in the first scan than in the frame (a case Pillow's header does not tell)."""
    from dipnet_deploy.jpeg_scans import coefficient_bytes

    path = tmp_path / "scans.jpg"
    path.write_bytes(_jpeg_markers(frame, 3, in_first_scan) + b"\x00" * 16 + b"\xff\xd9")
    assert coefficient_bytes(path) == (3 * 2 * 64 * 48 if counted else 0)


def test_decoding_a_progressive_jpeg_stays_within_its_estimate(tmp_path):
    """Measured in a child process (its peak reset just before the decode): a 4:4:4 progressive JPEG takes
    more than the file and the decoded image twice (what the estimate counted before), and no more than
    ``decode_bytes`` and some MiB of the decoder's fixed tables (they do not grow with the image)."""
    path, small = tmp_path / "progressive.jpg", tmp_path / "small.jpg"
    Image.fromarray(_gradient(2000, 3000)).save(path, quality=90, progressive=True, subsampling=0)
    Image.fromarray(_gradient(64, 64)).save(small, quality=90, progressive=True, subsampling=0)
    script = f"""
import sys
from pathlib import Path
from dipnet_deploy.imageio import read_rgb8
def status(key):
    with open("/proc/self/status") as lines:
        return 1024 * int(next(line.split()[1] for line in lines if line.startswith(key)))
read_rgb8(Path({str(small)!r}))  # every library loaded, the JPEG reader's included
before = status("VmRSS:")
try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak back to what is resident now
except OSError:
    sys.exit(3)
read_rgb8(Path({str(path)!r}))
print(status("VmHWM:") - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if done.returncode == 3:
        pytest.skip("the peak resident memory cannot be reset here (/proc/self/clear_refs)")
    assert done.returncode == 0, done.stderr
    added = int(done.stdout)
    header = read_header(path)
    fixed = 2 << 20
    assert header.file_bytes + 2 * 3 * header.pixels < added <= decode_bytes(header) + fixed, (added, header)


# --------------------------------------------------------------------------- every decode is checked


def test_an_image_read_without_a_check_of_its_own_is_refused_before_decoding(tmp_path, monkeypatch, decodes):
    """What reads images with no estimate of its own (quantize's calibration, package weights) still refuses,
    before decoding, an image whose decoding is over the budget: one line naming it; in a folder it is skipped
    with a warning, as compare skips one."""
    from dipnet_deploy.quantize import select_images

    monkeypatch.setenv("DIPNET_MAX_MEGAPIXELS", "1000")
    folder = tmp_path / "calib"
    folder.mkdir()
    bomb = png_header_only(folder / "bomb.png", 20000, 15000)
    cv2.imwrite(str(folder / "a.png"), smooth(64, 80, 1))
    with pytest.raises(InputError, match="bomb.png: 20000x15000 .* MiB of memory to decode it, over the "):
        read_rgb8(bomb)
    assert decodes == []
    warnings = []
    usable, skipped = select_images(folder, None, warnings.append)
    assert [path.name for path in usable] == ["a.png"] and len(decodes) == 1
    assert len(skipped) == 1 and "DIPNET_MAX_MEMORY_MB" in skipped[0] and "bomb.png" in skipped[0]


# --------------------------------------------------------------------------- videos: refused from the stream header


def _black_clip(path: Path, width: int, height: int, frames: int) -> Path:
    """A black H.264 clip of ``width`` x ``height`` frames made cheaply (no look-ahead): a few KB whatever the size."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "rc-lookahead": "0", "bframes": "0"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture
def frames_decoded(monkeypatch) -> list:
    """Every packet the upscale of a video decodes (its frames' sizes), the AVI order check's and transcode's."""
    from dipnet_deploy import video

    calls = []
    real = video._decode

    def recorded(source, packet, frames):
        decoded = real(source, packet, frames)
        calls.extend((frame.width, frame.height) for frame in decoded)
        return decoded

    monkeypatch.setattr(video, "_decode", recorded)
    return calls


def test_a_video_bomb_is_refused_before_a_frame_is_decoded(model16x24, tmp_path, invoke, frames_decoded):
    """A 2000x2000 black clip of some KB, well within the megapixel limit: its frames x2 in the encoder's
    look-ahead would take more than the default budget. One line naming the file, its frame size, the codec and
    the variable to raise; exit 2; nothing written; no frame decoded."""
    bomb = _black_clip(tmp_path / "bomb.mp4", 2000, 2000, 2)
    assert bomb.stat().st_size < 20_000
    code, _, err = invoke("upscale", bomb, "--model", model16x24, "-o", tmp_path / "out")
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for words in ("bomb.mp4", "2000x2000 frames", "upscale them x2 and encode them with libx264",
                  "DIPNET_MAX_MEMORY_MB"):
        assert words in lines[0], (words, lines[0])
    assert frames_decoded == [] and not (tmp_path / "out").exists()


def test_a_video_is_let_through_by_the_budget_its_refusal_names(model16x24, tmp_path, invoke, monkeypatch,
                                                                  frames_decoded):
    from dipnet_deploy.video import video_bytes, write_clip

    clip = tmp_path / "clip.mp4"
    write_clip(clip, [smooth(120, 160, seed) for seed in range(2)], 10)
    monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", "1")
    code, _, err = invoke("upscale", clip, "--model", model16x24, "-o", tmp_path / "out")
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "clip.mp4: 160x120 frames" in lines[0] and frames_decoded == [], err
    need_mib = int(lines[0].split("DIPNET_MAX_MEMORY_MB to ")[1].split()[0])
    assert need_mib == math.ceil(video_bytes(160, 120, "yuv420p", 2, "libx264") / 2**20) > 1
    monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", str(need_mib))
    code, _, err = invoke("upscale", clip, "--model", model16x24, "-o", tmp_path / "out")
    assert code == 0 and frames_decoded, err


def test_the_video_estimate_grows_with_the_encoders_look_ahead_and_the_frame_format():
    from dipnet_deploy.video import frame_bytes, video_bytes

    assert frame_bytes("yuv420p") == 1.5 and frame_bytes("yuv444p16le") == 6 and frame_bytes(None) == 8
    x264 = video_bytes(960, 540, "yuv420p", 2, "libx264")
    assert 60 * 4 * 960 * 540 < x264 < video_bytes(960, 540, "yuv444p16le", 2, "libx264")
    # x264 with our short look-ahead keeps the fewest frames; an encoder we have not measured counts the most
    assert x264 < video_bytes(960, 540, "yuv420p", 2, "libvpx-vp9") < video_bytes(960, 540, "yuv420p", 2, "mpeg4")
    assert video_bytes(960, 540, "yuv420p", 4, "libx264") > 3.4 * x264  # the output, most of it, is 4 times larger


# --------------------------------------------------------------------------- compare --diagnose: one image at a time


def qdq_x2(path: Path, height: int, width: int) -> Path:
    """``conv_x2``'s model with Q/DQ pairs on its input and its Conv's output: an int8 model with two
    activation pairs to diagnose."""
    model = onnx.load(str(conv_x2(path.with_suffix(".fp32.onnx"), height, width)))
    inits = list(model.graph.initializer)

    def pair(name: str, scale: float, zero_point: int) -> list:
        inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                      numpy_helper.from_array(np.array(zero_point, np.uint8), f"{name}_zp")])
        return [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_zp"], [f"{name}_q"]),
                helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_dq"])]

    nodes = pair("input", 1 / 255, 0) + [helper.make_node("Conv", ["input_dq", "w"], ["pre"], pads=[1, 1, 1, 1])]
    nodes += pair("pre", 2 / 255, 64) + [helper.make_node("DepthToSpace", ["pre_dq"], ["output"], blocksize=2)]
    graph = helper.make_graph(nodes, "qdq_x2", list(model.graph.input), list(model.graph.output), inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_diagnose_holds_one_image_at_a_time(tmp_path, monkeypatch):
    """Every pass of the diagnosis reads the images again, one at a time (none is alive when the next is read,
    but the one just used): many images take no more memory than one. Each is read with the comparison's
    memory check."""
    import gc
    import weakref

    from dipnet_deploy import diagnose as diagnose_module
    from dipnet_deploy.compare import CompareOptions, compare

    fp32, int8 = conv_x2(tmp_path / "m.onnx", 32, 48), qdq_x2(tmp_path / "m.int8.onnx", 32, 48)
    data = tmp_path / "hr"
    data.mkdir()
    for index in range(4):
        cv2.imwrite(str(data / f"{index}.png"), smooth(70, 90, index))
    alive, most, checks = [], [0], []
    real = diagnose_module.read_rgb8

    def read(path, check=None):
        gc.collect()
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        checks.append(check)
        rgb, notes = real(path, check)
        alive.append(weakref.ref(rgb))
        return rgb, notes

    monkeypatch.setattr(diagnose_module, "read_rgb8", read)
    result = compare(fp32, int8, data, CompareOptions(diagnose=True, latency_repeats=1), warn=lambda _: None)
    assert len(result.diagnosis) == 2 and len(alive) >= 4 * 3  # the SQNR pass and one per pair
    assert most[0] <= 1 and all(check is not None for check in checks)


@pytest.mark.parametrize("height, width", [(20, 30), (40, 60), (20, 60), (40, 30), (9, 13), (33, 47)])
def test_the_first_tile_of_the_corner_is_the_first_tile_of_the_whole_image(model16x24, height, width):
    """``first_tile`` converts only the LR's tile-sized corner: the same input as tiling the whole image."""
    from dipnet_deploy.diagnose import first_tile

    runner = TiledRunner(str(model16x24))
    hr = smooth(2 * height, 2 * width, height)
    _, lr = make_pair(hr, 2)
    assert np.array_equal(first_tile(hr, runner, "sr", 2), next(runner.tiles(to_input(lr)))[2])


# --------------------------------------------------------------------------- compare --workers N: one budget shared


def test_compare_workers_share_the_budget(tmp_path, invoke, monkeypatch):
    """A budget that lets an image through one process is split between two workers: each refuses it, the
    warning naming its share and what would allow it (with either more budget or fewer workers)."""
    fp32 = conv_x2(tmp_path / "m.onnx", 32, 48)
    data = tmp_path / "hr"
    data.mkdir()
    for index in range(2):
        cv2.imwrite(str(data / f"{index}.png"), smooth(96, 128, index))
    runner = TiledRunner(str(fp32))
    need_mib = compare_bytes(read_header(data / "0.png"), {"fp32": runner}, "sr", 2) / 2**20
    monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", str(math.ceil(need_mib * 1.5)))
    args = ["compare", tmp_path / "report", "--fp32", fp32, "--data", data, "--repeats", "1"]
    code, _, err = invoke(*args, "--workers", "2")
    skipped = [line for line in one_line(err) if line.startswith("warning: skipped")]
    assert code == 2 and len(skipped) == 2 and "Traceback" not in err, err
    assert "share each of the 2 workers" in skipped[0] and "or run fewer workers" in skipped[0], skipped[0]
    assert not (tmp_path / "report").exists()
    code, _, err = invoke(*args, "--workers", "1")
    assert code == 0, err


# --------------------------------------------------------------------------- train and finetune images


def test_a_validation_image_whose_forward_is_over_the_budget_is_skipped_before_decoding(tmp_path, invoke,
                                                                                         monkeypatch, decodes):
    """train --val runs each validation image whole through the model: a 1200x1200 one (a 2 MB PNG) would take
    hundreds of MiB doing so. Under a 150 MiB budget the training image passes and it is skipped, undecoded,
    with one warning; with no other validation image the run ends in one line, nothing written."""
    for folder, name, side in (("train", "a.png", 96), ("val", "big.png", 1200)):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / name), smooth(side, side, side))
    monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", "150")
    code, _, err = invoke("train", "--data", tmp_path / "train", "--val", tmp_path / "val", "--iters", "1",
                          "--patch", "32", "--batch", "1", "--out", tmp_path / "w.pth")
    lines = one_line(err)
    assert code == 2 and len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("warning: skipped") and "big.png: 1200x1200" in lines[0], lines[0]
    assert "validate x2 on it" in lines[0] and "DIPNET_MAX_MEMORY_MB" in lines[0], lines[0]
    assert len(decodes) == 1 and not (tmp_path / "w.pth").exists()


def test_finetune_counts_a_whole_image_forward_of_each_training_image(tmp_path, monkeypatch):
    """A training image of finetune (measured whole through the model) costs what a validation image does, and
    an image over the budget is skipped with a warning before it is decoded; train's images cost their decoding
    and pair only."""
    from dipnet_deploy.config import PRESETS
    from dipnet_deploy.train import PairedPatches
    from dipnet_deploy.training_memory import TrainingMemory

    config = PRESETS["x2"]
    header = read_header(png_header_only(tmp_path / "h.png", 6000, 5000))
    train, finetune = TrainingMemory(config), TrainingMemory(config, finetune=True)
    assert train.peak_bytes(header, "training") < 40 * header.pixels < finetune.peak_bytes(header, "training")
    assert finetune.peak_bytes(header, "training") > train.peak_bytes(header, "validation") > 150 * header.pixels
    folder = tmp_path / "data"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), smooth(96, 96, 1))
    cv2.imwrite(str(folder / "b.png"), smooth(1200, 1200, 2))
    monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", "150")
    warnings = []
    patches = PairedPatches(folder, 2, 32, warnings.append, finetune)
    assert len(patches.pairs) == 1 and patches.pairs[0][0].shape == (96, 96, 3)
    assert len(warnings) == 1 and "b.png: 1200x1200" in warnings[0] and "train x2 on it" in warnings[0]
    assert len(PairedPatches(folder, 2, 32, warnings.append, train).pairs) == 2
