"""compare: exact tiling, ESA deviation, both protocols, the report, bad input."""

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.compare import METRICS, CompareOptions, compare
from dipnet_deploy.config import PRESETS
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import read_rgb8, to_uint8_rgb
from dipnet_deploy.matlab_resize import imresize
from dipnet_deploy.quantize import quantize
from dipnet_deploy.runtime import ort_options
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole, score, to_input
from dipnet_deploy.tiling import TiledRunner, receptive_field

from .conftest import CALIBRATION, EVAL, OFFICIAL_X4, need, reference_score

PACKAGED_X2 = Path(__file__).resolve().parents[1] / "dipnet_deploy" / "weights" / "dipnet_x2.pth"


def test_receptive_field_of_the_x2_preset(x2_pair):
    assert receptive_field(onnx.load(str(x2_pair[0]))).radius == 15  # 15 chained 3x3 convs
    assert receptive_field(onnx.load(str(x2_pair[0]))).local


def test_receptive_field_of_the_esa_preset_is_global(official_x4, tmp_path):
    x4 = export(load_checkpoint(official_x4), tmp_path / "x4.onnx", ExportOptions(64, 64)).onnx_path
    assert not receptive_field(onnx.load(str(x4))).local


def reach_model() -> DIPNet:
    """An x2 DIPNet that sees its whole receptive field at full weight (random weights fade out after ~5 px).

    Every conv copies input channel (o mod in) to output channel o through one corner tap: (-1, -1) for
    even o, (+1, +1) for odd o. Channel o < 12 keeps its index (and so its direction) from conv_1 to the
    upsampler, so each HR pixel reads the LR pixel exactly 15 px up-left (even sub-pixel columns) or
    down-right (odd ones) with weight 1; the residual paths add shorter reaches. All weights >= 0, so
    LeakyRelu is the identity and nothing cancels.
    """
    model = DIPNet(PRESETS["x2"])
    with torch.no_grad():
        for weight in model.parameters():
            weight.zero_()
            out_channels, in_channels, kh, kw = weight.shape
            for o in range(out_channels):
                tap = (0, 0) if o % 2 == 0 else (kh - 1, kw - 1)
                weight[o, o % in_channels, tap[0], tap[1]] = 1.0
    return model.eval()


@pytest.fixture(scope="module")
def reach_onnx(tmp_path_factory):
    work = tmp_path_factory.mktemp("reach")
    torch.save(reach_model().state_dict(), work / "reach.pth")
    return export(load_checkpoint(work / "reach.pth"), work / "reach.onnx", ExportOptions(64, 96)).onnx_path


def test_halo_of_the_receptive_field_is_exact_and_one_less_is_not(reach_onnx):
    assert receptive_field(onnx.load(str(reach_onnx))).radius == 15
    x = to_input((np.random.default_rng(2).random((150, 230, 3)) * 255).astype(np.uint8))  # 12-16 tiles
    with torch.no_grad():
        whole = reach_model()(torch.from_numpy(x)).numpy()  # values up to ~17
    default = TiledRunner(str(reach_onnx))
    assert default.halo >= 15
    for halo in (None, 15):  # the default, and exactly the radius
        tiled, tiles = TiledRunner(str(reach_onnx), halo=halo).run(x)
        assert tiles > 4 and np.abs(tiled - whole).max() <= 1e-5, halo  # measured 0.0
    tiled, _ = TiledRunner(str(reach_onnx), halo=14).run(x)
    assert np.abs(tiled - whole).max() > 0.5  # measured 0.996: the pixel 15 px away is lost at each seam


class BoxRunner(TiledRunner):
    """TiledRunner's tiling around a known model: a (2R+1)^2 box sum (zero padding, as a conv) then nearest x2."""

    def __init__(self, tile_h: int, tile_w: int, radius: int, halo: int):  # no ONNX: the model is forward()
        self.tile_h, self.tile_w, self.scale, self.radius, self.halo = tile_h, tile_w, 2, radius, halo

    def forward(self, tile: np.ndarray) -> np.ndarray:
        return box_x2(tile, self.radius)


def box_x2(x: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (radius, radius), (radius, radius)))
    height, width = x.shape[2:]
    total = sum(padded[:, :, dy:dy + height, dx:dx + width]
                for dy in range(2 * radius + 1) for dx in range(2 * radius + 1))
    return total.repeat(2, axis=2).repeat(2, axis=3)


@pytest.mark.parametrize("height, width", [(20, 28), (21, 29), (47, 28), (20, 75), (58, 83)])
def test_tiling_of_a_box_filter_is_exact_with_halo_radius_only(height, width):
    radius, tile_h, tile_w = 3, 20, 28
    x = np.random.default_rng(height * width).integers(0, 256, (1, 3, height, width)).astype(np.float32)
    whole = box_x2(x, radius)  # integer sums: exact in float32
    for halo in (radius, radius + 2):
        tiled, tiles = BoxRunner(tile_h, tile_w, radius, halo).run(x)
        assert np.array_equal(tiled, whole), (halo, tiles)
    tiled, tiles = BoxRunner(tile_h, tile_w, radius, radius - 1).run(x)
    assert np.array_equal(tiled, whole) == (tiles == 1), tiles  # any seam loses the pixel R away


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


@pytest.fixture(scope="module")
def official_x4_set5(tmp_path_factory):
    """Set5 Y-PSNR of the official x4 weights: whole-image PyTorch and the 270x480 ONNX through TiledRunner."""
    loaded = load_checkpoint(need(OFFICIAL_X4))
    fp32 = export(loaded, tmp_path_factory.mktemp("x4") / "x4.onnx", ExportOptions(270, 480)).onnx_path
    runner = TiledRunner(str(fp32))
    whole, tiled = [], []
    for path in sorted(need(EVAL / "Set5").iterdir()):
        hr, lr = make_pair(read_rgb8(path)[0], 4)
        tiled.append(score(to_uint8_rgb(runner.run(to_input(lr))[0]), hr, 4)["psnr_y"])
        whole.append(score(run_torch_whole(loaded.model, lr), hr, 4)["psnr_y"])
    return np.array(whole), np.array(tiled)


def test_official_x4_set5_y_psnr_is_the_published_figure(official_x4_set5):
    # An outside number: the official DIPNet x4 on Set5, BasicSR protocol (31.81 dB; measured 31.8068).
    assert np.mean(official_x4_set5[0]) == pytest.approx(31.81, abs=0.01)


def test_esa_official_x4_deviation_on_set5_within_0_05_db(official_x4_set5):
    whole, tiled = official_x4_set5
    # every image, not the mean of signed deviations (they cancel: measured +0.026 +0.032 -0.036 +0.005 -0.018)
    assert np.abs(tiled - whole).max() <= 0.05, tiled - whole


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """The packaged (trained) x2 at 64x96 and its int8 model from calibration/: outputs close to HR, so
    rounding, crops and baselines move the numbers (random weights saturate and hide them)."""
    work = tmp_path_factory.mktemp("trained")
    loaded = load_checkpoint(PACKAGED_X2)
    fp32 = export(loaded, work / "x2.onnx", ExportOptions(height=64, width=96)).onnx_path
    int8 = quantize(fp32, work / "x2.int8.onnx", CALIBRATION).int8_path
    return fp32, int8, loaded.model


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Crops of the shipped calibration photos, odd sizes (mod-crop), one over a 64x96 tile at x2, two under."""
    directory = tmp_path_factory.mktemp("photos")
    crops = {"a.png": ("coffee.png", 50, 100, 301, 421), "b.png": ("astronaut.png", 90, 200, 97, 128),
             "c.png": ("chelsea.png", 120, 180, 61, 91)}
    for name, (source, top, left, height, width) in crops.items():
        cv2.imwrite(str(directory / name), cv2.imread(str(CALIBRATION / source))[top:top + height, left:left + width])
    return directory


def whole_image_session(model_path) -> ort.InferenceSession:
    """The same ONNX with free H and W, run on a whole image: the reference for tiling."""
    model = onnx.load(str(model_path))
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.value_info[:]
    return ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])


def expected_sr(hr_rgb, model, int8_session, tile) -> dict:
    """BasicSR protocol by hand: mod-crop, MATLAB bicubic LR, whole-image runs (LR mirrored up to one tile
    where smaller, as documented), rounded outputs, MATLAB bicubic baseline, scikit-image metrics, crop 2."""
    hr = hr_rgb[: hr_rgb.shape[0] // 2 * 2, : hr_rgb.shape[1] // 2 * 2]
    lr = imresize(hr, 0.5)
    padded = np.pad(lr, ((0, max(0, tile[0] - lr.shape[0])), (0, max(0, tile[1] - lr.shape[1])), (0, 0)), "symmetric")
    x = padded.transpose(2, 0, 1)[None].astype(np.float32) / 255
    with torch.no_grad():
        outputs = {"fp32": model(torch.from_numpy(x)).numpy(), "int8": int8_session.run(None, {"input": x})[0]}
    images = {name: np.floor(np.clip(out[0, :, : hr.shape[0], : hr.shape[1]] * 255, 0, 255) + 0.5)
              .astype(np.uint8).transpose(1, 2, 0) for name, out in outputs.items()}
    images["bicubic"] = imresize(lr, 2)
    return {"images": images, "scores": {name: reference_score(image, hr, 2) for name, image in images.items()}}


def expected_seed(hr_rgb, model, int8_session, tile) -> dict:
    """The vendor protocol by hand: cv2 bilinear LR to the model input, float outputs (no rounding) against
    HR resized bilinear to the output, cv2 bicubic baseline, no crop."""
    hr = hr_rgb[: hr_rgb.shape[0] // 2 * 2, : hr_rgb.shape[1] // 2 * 2]
    lr = imresize(hr, 0.5)
    height, width = tile
    x = cv2.resize(lr, (width, height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)[None].astype(np.float32) / 255
    with torch.no_grad():
        outputs = {"fp32": model(torch.from_numpy(x)).numpy(), "int8": int8_session.run(None, {"input": x})[0]}
    images = {name: np.clip(out[0] * 255, 0, 255).transpose(1, 2, 0) for name, out in outputs.items()}
    images["bicubic"] = np.clip(cv2.resize(lr.astype(np.float32), (2 * width, 2 * height), interpolation=cv2.INTER_CUBIC),
                                0, 255)
    target = cv2.resize(hr_rgb, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
    return {"images": images, "scores": {name: reference_score(image, target, 0) for name, image in images.items()}}


# Largest |report - hand computation| measured on these three crops: sr PSNR 3.9e-5 dB, SSIM 1.1e-6
# (PyTorch vs onnxruntime flips a few uint8 roundings); seed (float outputs) PSNR 4.9e-7 dB, SSIM 1.2e-8.
# Tolerances are about ten times these; rounding the seed's floats or a wrong baseline moves far more.
TOLERANCES = {"sr": {"psnr": 4e-4, "ssim": 1.5e-5}, "seed": {"psnr": 5e-6, "ssim": 2e-7}}


@pytest.mark.parametrize("protocol", ["sr", "seed"])
def test_compare_report_values_are_recomputed(protocol, trained_pair, photo_dir, tmp_path, invoke):
    fp32, int8, model = trained_pair
    report = tmp_path / "report"
    code, out, err = invoke("compare", report, "--fp32", fp32, "--int8", int8, "--data", photo_dir, "--json",
                            "--protocol", protocol, "--repeats", "2")
    assert code == 0, err
    headline = json.loads(out.strip().splitlines()[-1])
    metrics = json.loads((report / "metrics.json").read_text())
    assert headline["images"] == metrics["count"] == 3 and metrics["protocol"] == protocol and metrics["scale"] == 2
    latency = metrics["latency"]
    assert headline["speedup_int8"] == round(latency["fp32"]["median_s"] / latency["int8"]["median_s"], 3)
    assert metrics["models"]["int8"]["sha256"] == hashlib.sha256(Path(int8).read_bytes()).hexdigest()
    assert [r["tiles"] for r in metrics["images"]] == ([12, 1, 1] if protocol == "sr" else [1, 1, 1])
    expected = expected_sr if protocol == "sr" else expected_seed
    int8_session = whole_image_session(int8)
    worst = {"psnr": 0.0, "ssim": 0.0}
    want_rows = []
    for row in metrics["images"]:
        want = expected(read_rgb8(row["image"])[0], model, int8_session, (64, 96))
        want_rows.append(want["scores"])
        for key in METRICS:
            for name in ("fp32", "int8", "bicubic"):
                kind = key.split("_")[0]
                worst[kind] = max(worst[kind], abs(row[key][name] - want["scores"][name][key]))
                assert row[key][name] == pytest.approx(want["scores"][name][key], abs=TOLERANCES[protocol][kind]), \
                    (row["image"], key, name)
        assert row["drop_psnr_y"] == pytest.approx(row["psnr_y"]["fp32"] - row["psnr_y"]["int8"], abs=1e-12)
        a, b = (want["images"][name].astype(np.float64) for name in ("int8", "fp32"))
        assert row["int8_vs_fp32"]["max_abs_diff"] == pytest.approx(np.abs(a - b).max(), abs=1.01 if protocol == "sr" else 1e-3)
    print(protocol, "largest |report - hand computation|:", worst)
    drops = {row["image"]: want["fp32"]["psnr_y"] - want["int8"]["psnr_y"] for row, want in zip(metrics["images"], want_rows)}
    worst_image = max(drops, key=drops.get)  # the tail beside the mean, from the hand computation
    assert headline["worst_image"] == metrics["drop_psnr_y"]["worst_image"] == worst_image
    assert headline["drop_psnr_y_worst"] == pytest.approx(drops[worst_image], abs=2 * TOLERANCES[protocol]["psnr"] + 1e-4)
    assert metrics["drop_psnr_y"]["mean"] == pytest.approx(np.mean(list(drops.values())), abs=2 * TOLERANCES[protocol]["psnr"])
    for key in METRICS:
        for name in ("fp32", "int8", "bicubic"):
            assert metrics["mean"][key][name] == pytest.approx(np.mean([w[name][key] for w in want_rows]),
                                                               abs=TOLERANCES[protocol][key.split("_")[0]])
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "largest int8 drop" in html
    for name in ("report.md", "psnr_per_image.png", "worst_crops.png", "error_heatmap.png"):
        assert (report / name).stat().st_size > 0


def test_workers_give_the_same_rows(x2_pair, hr_dir):
    fp32, int8, _ = x2_pair
    one = compare(fp32, int8, hr_dir, CompareOptions(latency_repeats=1))
    two = compare(fp32, int8, hr_dir, CompareOptions(workers=2, latency_repeats=1))
    assert [r["psnr_y"] for r in one.rows] == [r["psnr_y"] for r in two.rows]


def _mismatched(tmp_path):
    model = DIPNet(PRESETS["x2"])
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    fp32 = export(load_checkpoint(path), tmp_path / "other.onnx", ExportOptions(48, 64)).onnx_path
    return quantize(fp32, tmp_path / "other.int8.onnx", CALIBRATION).int8_path  # an int8 model, of another shape


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
