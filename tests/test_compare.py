"""compare: exact tiling, ESA deviation, both protocols, the report, bad input."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.compare import CompareOptions, compare
from dipnet_deploy.config import PRESETS
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import read_rgb8
from dipnet_deploy.quantize import quantize
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole, score, to_input
from dipnet_deploy.tiling import TiledRunner, receptive_field

from .conftest import EVAL, need, random_train_model


@pytest.fixture(scope="module")
def x2_pair(tmp_path_factory):
    """fp32 + int8 x2 models (random weights, 64x96 input) and the unfolded reference module."""
    work = tmp_path_factory.mktemp("pair")
    train_model = random_train_model(PRESETS["x2"].replace(expansion=24), std=0.06)
    checkpoint = work / "x2.pth"
    torch.save(train_model.state_dict(), checkpoint)
    fp32 = export(load_checkpoint(checkpoint), work / "x2.onnx", ExportOptions(height=64, width=96)).onnx_path
    calib = work / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(calib / f"{i}.png"), cv2.GaussianBlur((rng.random((90, 120, 3)) * 255).astype(np.uint8), (5, 5), 2))
    int8 = quantize(fp32, work / "x2.int8.onnx", calib).int8_path
    return fp32, int8, train_model


@pytest.fixture
def hr_dir(tmp_path):
    """Three small colour HR images (one larger than a tile of the 64x96 model at x2)."""
    directory = tmp_path / "hr"
    directory.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w) in {"a.png": (300, 420), "b.png": (96, 128), "c.png": (60, 90)}.items():
        noise = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (7, 7), 3)
        cv2.imwrite(str(directory / name), noise)
    return directory


def test_receptive_field_of_the_presets(x2_pair, official_x4, tmp_path):
    import onnx

    assert receptive_field(onnx.load(str(x2_pair[0]))).radius == 15  # 15 chained 3x3 convs
    assert receptive_field(onnx.load(str(x2_pair[0]))).local
    x4 = export(load_checkpoint(official_x4), tmp_path / "x4.onnx", ExportOptions(64, 64)).onnx_path
    assert not receptive_field(onnx.load(str(x4))).local


def test_tiling_equals_whole_image_pytorch_for_no_esa(x2_pair):
    fp32, _, train_model = x2_pair
    runner = TiledRunner(str(fp32))
    lr = (np.random.default_rng(2).random((150, 230, 3)) * 255).astype(np.uint8)  # > one 64x96 tile
    tiled, tiles = runner.run(to_input(lr))
    with torch.no_grad():
        whole = train_model(torch.from_numpy(to_input(lr))).numpy()  # unfolded, whole image
    assert tiles > 4
    assert np.abs(tiled - whole).max() <= 1e-4


def test_tiled_psnr_within_0_01_db_of_whole_image(x2_pair, hr_dir):
    fp32, _, train_model = x2_pair
    runner = TiledRunner(str(fp32))
    hr, lr = make_pair(read_rgb8(hr_dir / "a.png")[0], 2)
    tiled = score(np.round(np.clip(runner.run(to_input(lr))[0][0] * 255, 0, 255)).astype(np.uint8).transpose(1, 2, 0),
                  hr, 2)["psnr_y"]
    whole = score(run_torch_whole(train_model, lr), hr, 2)["psnr_y"]
    assert abs(tiled - whole) <= 0.01


def test_esa_official_x4_deviation_on_set5_within_0_05_db(official_x4, tmp_path):
    loaded = load_checkpoint(official_x4)
    fp32 = export(loaded, tmp_path / "x4.onnx", ExportOptions(270, 480)).onnx_path
    runner = TiledRunner(str(fp32))
    deviations = []
    for path in sorted(need(EVAL / "Set5").iterdir()):
        hr, lr = make_pair(read_rgb8(path)[0], 4)
        tiled = np.round(np.clip(runner.run(to_input(lr))[0][0] * 255, 0, 255)).astype(np.uint8).transpose(1, 2, 0)
        deviations.append(score(tiled, hr, 4)["psnr_y"] - score(run_torch_whole(loaded.model, lr), hr, 4)["psnr_y"])
    assert abs(np.mean(deviations)) <= 0.05


def test_compare_report_sr(x2_pair, hr_dir, tmp_path, invoke):
    fp32, int8, _ = x2_pair
    report = tmp_path / "report"
    code, out, err = invoke("compare", report, "--fp32", fp32, "--int8", int8, "--data", hr_dir, "--json",
                            "--repeats", "2")
    assert code == 0, err
    headline = json.loads(out.strip().splitlines()[-1])
    assert headline["images"] == 3 and headline["speedup_int8"] > 0
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
        assert set(metrics["mean"][key]) == {"fp32", "int8", "bicubic"}
        assert metrics["mean"][key]["fp32"] == pytest.approx(np.mean([r[key]["fp32"] for r in metrics["images"]]))
    assert metrics["protocol"] == "sr" and metrics["scale"] == 2 and metrics["models"]["int8"]["sha256"]
    assert [r["tiles"] for r in metrics["images"]] == [12, 1, 1]
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "largest int8 drop" in html
    for name in ("report.md", "psnr_per_image.png", "worst_crops.png", "error_heatmap.png"):
        assert (report / name).stat().st_size > 0


def test_compare_seed_protocol_matches_hand_computation(x2_pair, hr_dir):
    fp32, _, train_model = x2_pair
    comparison = compare(fp32, None, hr_dir, CompareOptions(protocol="seed", limit=1, latency_repeats=1))
    hr_rgb = read_rgb8(hr_dir / "a.png")[0]
    _, lr = make_pair(hr_rgb, 2)
    x = cv2.resize(lr, (96, 64), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)[None].astype(np.float32) / 255
    with torch.no_grad():
        out = np.clip(train_model(torch.from_numpy(x)).numpy()[0] * 255, 0, 255).transpose(1, 2, 0)
    ref = cv2.resize(hr_rgb, (192, 128), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    expected = 10 * np.log10(255**2 / np.mean((out.astype(np.float64) - ref) ** 2))
    assert comparison.rows[0]["psnr_rgb"]["fp32"] == pytest.approx(expected, abs=1e-3)


def test_workers_give_the_same_rows(x2_pair, hr_dir):
    fp32, int8, _ = x2_pair
    one = compare(fp32, int8, hr_dir, CompareOptions(latency_repeats=1))
    two = compare(fp32, int8, hr_dir, CompareOptions(workers=2, latency_repeats=1))
    assert [r["psnr_y"] for r in one.rows] == [r["psnr_y"] for r in two.rows]


def _mismatched(tmp_path):
    model = DIPNet(PRESETS["x2"])
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    return export(load_checkpoint(path), tmp_path / "other.onnx", ExportOptions(48, 64)).onnx_path


BAD = {
    "empty data": (lambda t, h: ["--data", (t / "e").mkdir() or t / "e"], "no image files"),
    "data not a dir": (lambda t, h: ["--data", t / "nope"], "not a directory"),
    "missing fp32": (lambda t, h: ["--data", h, "--fp32", t / "none.onnx"], "no such ONNX file"),
    "invalid fp32": (lambda t, h: ["--data", h, "--fp32", (t / "bad.onnx").write_text("x") and t / "bad.onnx"],
                     "not an ONNX model"),
    "mismatched pair": (lambda t, h: ["--data", h, "--int8", _mismatched(t)], "does not match the fp32 model"),
    "report is a file": (lambda t, h: ["--data", h, (t / "rep").write_text("x") and t / "rep"], "not a directory"),
    "all too small": (lambda t, h: ["--data", (t / "s").mkdir() or cv2.imwrite(str(t / "s" / "x.png"),
                                                                                 np.zeros((3, 3, 3), np.uint8))
                                    and t / "s"], "all skipped"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_compare_input(case, x2_pair, hr_dir, tmp_path, invoke):
    make, words = BAD[case]
    args = make(tmp_path, hr_dir)
    if "--fp32" not in args:
        args += ["--fp32", x2_pair[0]]
    if not any(str(a).endswith("rep") for a in args):
        args = [tmp_path / "report", *args]
    code, _, err = invoke("compare", *args, "--repeats", "1")
    lines = [line for line in err.strip().splitlines() if line.startswith("dipnet-deploy: error")]
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_single_bad_images_are_skipped_with_a_warning(x2_pair, hr_dir, tmp_path, invoke):
    (hr_dir / "broken.png").write_bytes(b"not a png")
    cv2.imwrite(str(hr_dir / "tiny.png"), np.zeros((1, 1, 3), np.uint8))
    code, out, err = invoke("compare", tmp_path / "r", "--fp32", x2_pair[0], "--data", hr_dir, "--json",
                            "--repeats", "1")
    assert code == 0, err
    assert "broken.png" in err and "tiny.png" in err
    assert json.loads(out.strip().splitlines()[-1])["images"] == 3
    shutil.rmtree(tmp_path / "r")
