"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent, and fail instead when
DIPNET_REQUIRE_SHARED=1 (what CI sets in .ci/run), so a missing data folder never passes quietly."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dipnet_deploy.archs.dipnet_train_arch import build_train_model
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import read_rgb8, vendor_preprocess
from dipnet_deploy.metrics import psnr
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.range_graphs import float_tensors, values_model
from dipnet_deploy.runtime import int8_sums_saturate, ort_options

SHARED = Path(os.environ.get("DIPNET_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
OFFICIAL_X4 = SHARED / "weights" / "dipnet_official_x4.pth"
EVAL = SHARED / "data" / "eval"
TRAIN = SHARED / "data" / "train"


CALIBRATION = Path(__file__).resolve().parents[1] / "calibration"  # shipped with the project: never skipped
# OpenVINO refuses our int8 models on a CPU whose int8 sums saturate (runtime.refuse_saturating_int8, tested
# there by simulating such a CPU): its int8 results can only be checked on a CPU with VNNI
exact_openvino_int8 = pytest.mark.skipif(int8_sums_saturate(), reason="this CPU has no VNNI: OpenVINO refuses int8")


def need(path: Path) -> Path:
    """``path`` under ../shared, or skip; with DIPNET_REQUIRE_SHARED=1 (CI) a missing path fails instead."""
    if not path.exists():
        reason = f"{path} is absent (../shared beside the project holds the data and weights)"
        if os.environ.get("DIPNET_REQUIRE_SHARED") == "1":
            pytest.fail(f"DIPNET_REQUIRE_SHARED=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def sigint_default() -> None:
    """``preexec_fn`` for a command a test interrupts: SIGINT back to its default. A test run started in the
    background (``cmd &``) ignores SIGINT, and Python only turns SIGINT into KeyboardInterrupt when it was
    not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def image_folder(tmp_path_factory, name: str, paths: list[Path]) -> Path:
    """A fresh folder ``name`` holding copies of ``paths`` (a module's calibration or training subset)."""
    directory = tmp_path_factory.mktemp(name)
    for path in paths:
        shutil.copy(path, directory / path.name)
    return directory


def reference_score(sr: np.ndarray, hr: np.ndarray, crop: int) -> dict[str, float]:
    """PSNR/SSIM on Y (BT.601 from scikit-image's rgb2ycbcr) and RGB, border crop, all from scikit-image.

    Independent of ``dipnet_deploy.metrics``: the reference the project's ``score`` must reproduce.
    """
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    window = (slice(crop, -crop), slice(crop, -crop)) if crop else (slice(None), slice(None))
    a, b = np.asarray(sr, np.float64)[window], np.asarray(hr, np.float64)[window]
    ya, yb = rgb2ycbcr(a / 255.0)[..., 0], rgb2ycbcr(b / 255.0)[..., 0]
    options = dict(data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    return {
        "psnr_y": peak_signal_noise_ratio(yb, ya, data_range=255),
        "ssim_y": structural_similarity(ya, yb, **options),
        "psnr_rgb": peak_signal_noise_ratio(b, a, data_range=255),
        "ssim_rgb": structural_similarity(a, b, channel_axis=2, **options),
    }


@pytest.fixture(autouse=True, scope="session")
def private_leftovers_journal(tmp_path_factory):
    """Every run of the test session (in-process and the commands it starts) keeps its leftovers journal in a
    folder of its own, never the user's ``~/.local/state``."""
    os.environ["DIPNET_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    os.environ.pop("DIPNET_STATE_DIR", None)


@pytest.fixture
def official_x4() -> Path:
    return need(OFFICIAL_X4)


def random_train_model(config, seed: int = 0, std: float = 0.05):
    """A training-form DIPNet with non-trivial random weights (default init is too tame)."""
    torch.manual_seed(seed)
    model = build_train_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model.eval()


@pytest.fixture
def x2_training_checkpoint(tmp_path) -> Path:
    """A BasicSR-layout training-form x2 checkpoint (random weights, E = 40)."""
    model = random_train_model(PRESETS["x2"].replace(expansion=40))
    path = tmp_path / "x2_train.pth"
    torch.save({"params": model.state_dict(), "params_ema": model.state_dict(), "iter": 1}, path)
    return path


@pytest.fixture
def invoke(capsys, monkeypatch):
    """Run the console entry point in-process; return (exit code, stdout, stderr)."""
    from dipnet_deploy.cli import run

    def call(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["dipnet-deploy", *map(str, args)])
        capsys.readouterr()
        try:
            run()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return call


def whole_image_ranges(model_path, files, height, width, per_channel=False):
    """Independent reference: every tensor as a real output, min/max in numpy (per tensor or per channel)."""
    model = onnx.load(str(model_path))
    names = float_tensors(model)
    session = ort.InferenceSession(values_model(model, names).SerializeToString(), providers=["CPUExecutionProvider"])
    axes = (0, 2, 3) if per_channel else None
    low, high = {}, {}
    for path in files:
        x = vendor_preprocess(read_rgb8(path)[0], height, width)
        for name, value in zip(names, session.run(names, {"input": x})):
            low[name] = np.minimum(low[name], value.min(axis=axes)) if name in low else value.min(axis=axes)
            high[name] = np.maximum(high[name], value.max(axis=axes)) if name in high else value.max(axis=axes)
    if per_channel:
        return low, high
    return {name: (float(low[name]), float(high[name])) for name in names}


def int8_fidelity(fp32: Path, int8: Path, images: list[Path], height: int, width: int) -> float:
    """Mean PSNR (dB) of the int8 output against the fp32 output, seed preprocessing to ``height`` x ``width``."""
    sessions = [ort.InferenceSession(str(p), ort_options(), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    scores = []
    for path in images:
        x = vendor_preprocess(read_rgb8(path)[0], height, width)
        reference, quantized = (np.clip(s.run(None, {"input": x})[0][0] * 255, 0, 255).transpose(1, 2, 0) for s in sessions)
        scores.append(psnr(quantized, reference))
    return float(np.mean(scores))


@pytest.fixture(autouse=True)
def _fresh_resize_weights():
    """Every test builds the band weights ``imresize`` uses (``matlab_resize.axis_weights``) itself: a cache
    filled by an earlier test (or, in a mutation run, by an earlier mutant in the same process) would hide a
    change to the kernel."""
    from dipnet_deploy.matlab_resize import axis_weights

    axis_weights.cache_clear()


def resize_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """The reference for ``matlab_resize``: the dense [out_length, in_length] float64 matrix of MATLAB's bicubic
    along one axis, built from the kernel on its own (as the former whole-image ``imresize`` built it, nothing of
    the package's used): cubic with a = -0.5, stretched by 1/scale when shrinking, centres at
    ``x / scale + 0.5 * (1 - 1 / scale)``, taps mirrored symmetrically, each row normalized, taps falling on the
    same input summed in tap order."""
    def cubic(x: np.ndarray) -> np.ndarray:
        absx = np.abs(x)
        absx2, absx3 = absx**2, absx**3
        near = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
        far = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
        return near + far

    kernel_width = 4.0
    antialias = scale < 1
    if antialias:
        kernel_width /= scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(np.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    distance = u[:, None] - indices
    weights = scale * cubic(scale * distance) if antialias else cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    columns = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), columns.ravel()), weights.ravel())
    return matrix


# --------------------------------------------------------------------------- tiny models and folders shared by modules

SIDE = 40  # model input side: small, and above twice the halo (16 px) so compare can tile it


def write_images(directory: Path, count: int, size: tuple[int, int] = (48, 64), seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = directory / f"img{i}.png"
        cv2.imwrite(str(path), cv2.GaussianBlur((rng.random((*size, 3)) * 255).astype(np.uint8), (5, 5), 2))
        paths.append(path)
    return paths


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def refused(result: tuple[int, str, str], names: str, before: dict, root: Path) -> None:
    """Exit 2, one stderr line naming ``names`` (progress bars aside), no traceback, ``root`` exactly as ``before``."""
    code, _, err = result
    lines = [line for line in err.strip().splitlines() if "%|" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dipnet-deploy: error: "), err
    assert "Traceback" not in err
    assert names in lines[0], lines[0]
    assert snapshot(root) == before


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny x2 checkpoint, its fp32 and int8 ONNX (32x32 input), calibration and HR folders."""
    work = tmp_path_factory.mktemp("safety")
    checkpoint = work / "w.pth"
    torch.save(random_train_model(PRESETS["x2"].replace(expansion=8), std=0.05).state_dict(), checkpoint)
    fp32 = export(load_checkpoint(checkpoint), work / "m.onnx", ExportOptions(SIDE, SIDE)).onnx_path
    write_images(work / "calib", 2)
    int8 = quantize(fp32, work / "m.int8.onnx", work / "calib", options=QuantizeOptions(equalize=False)).int8_path
    write_images(work / "hr", 2, (40, 56), seed=1)
    return {"checkpoint": checkpoint, "fp32": fp32, "int8": int8, "calib": work / "calib", "hr": work / "hr"}


@pytest.fixture
def work(models, tmp_path) -> Path:
    """A private copy of the models and folders (tests may try to damage them); w.json is the checkpoint too."""
    for name in ("w.pth", "m.onnx", "m.json", "m.int8.onnx", "m.int8.json", "m.ranges.json"):
        (tmp_path / name).write_bytes((models["fp32"].parent / name).read_bytes())
    (tmp_path / "w.json").write_bytes((tmp_path / "w.pth").read_bytes())
    for folder in ("calib", "hr"):
        (tmp_path / folder).mkdir()
        for path in models[folder].iterdir():
            (tmp_path / folder / path.name).write_bytes(path.read_bytes())
    return tmp_path


def compare_args(work: Path, report: Path | str, data: Path | None = None) -> list[str]:
    return ["compare", str(report), "--fp32", str(work / "m.onnx"), "--int8", str(work / "m.int8.onnx"),
            "--data", str(data or work / "hr"), "--repeats", "1"]


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
