"""train: smoke run that exports, exact resume, bad input; the packaged default weights."""

import json

import cv2
import numpy as np
import pytest
import torch

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.imageio import list_images, read_rgb8
from dipnet_deploy.matlab_resize import imresize
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole, score
from dipnet_deploy.train import TrainOptions, cosine_lr, train

from .conftest import EVAL, need


@pytest.fixture
def photos(tmp_path):
    directory = tmp_path / "photos"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = cv2.GaussianBlur((rng.random((72, 80, 3)) * 255).astype(np.uint8), (5, 5), 1.5)
        cv2.imwrite(str(directory / f"{i}.png"), image)
    return directory


def small(photos, **changes) -> TrainOptions:
    settings = dict(expansion=8, iters=4, batch=2, patch=16, val=photos, val_every=2, save_every=2, seed=3)
    return TrainOptions(**(settings | changes))


def test_smoke_train_checkpoint_exports(photos, tmp_path, invoke):
    out = tmp_path / "ckpt.pth"
    code, stdout, err = invoke("train", "--data", photos, "--val", photos, "--iters", "3", "--batch", "2",
                               "--patch", "16", "--expansion", "8", "--val-every", "3", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["iters"] == 3
    # the reported validation figure is the saved EMA weights' Y-PSNR on --val, recomputed here
    ema = load_checkpoint(out).model
    pairs = [make_pair(read_rgb8(path)[0], 2) for path in list_images(photos)]
    expected = np.mean([score(run_torch_whole(ema, lr), hr, 2)["psnr_y"] for hr, lr in pairs])
    assert summary["val_psnr_y"] == pytest.approx(expected, abs=1e-6)
    checkpoint = torch.load(out, weights_only=True)
    assert {"params", "params_ema", "iter", "config", "optimizer"} <= set(checkpoint)
    code, _, err = invoke("export", "--checkpoint", out, "--height", "40", "--width", "40", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert load_checkpoint(out).source == "params_ema"


def test_resume_continues_exactly(photos, tmp_path):
    straight = train(photos, tmp_path / "a.pth", small(photos), warn=lambda m: None)

    def stop_after_two(iterations, _description, _total):  # the progress contract: it wraps the loop
        for iteration in iterations:
            if iteration == 3:
                raise KeyboardInterrupt  # the run is killed right after its checkpoint at 2
            yield iteration

    with pytest.raises(KeyboardInterrupt):
        train(photos, tmp_path / "b.pth", small(photos), progress=stop_after_two, warn=lambda m: None)
    assert torch.load(tmp_path / "b.pth", weights_only=True)["iter"] == 2
    resumed = train(photos, tmp_path / "b.pth", small(photos, resume=tmp_path / "b.pth"), warn=lambda m: None)
    a = torch.load(straight.out, weights_only=True)
    b = torch.load(resumed.out, weights_only=True)
    assert a["iter"] == b["iter"] == 4
    # everything a resumed run carries: weights, EMA weights, Adam's moments and step, the curve
    for part in ("params", "params_ema"):
        assert set(a[part]) == set(b[part])
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert not all(torch.equal(a["params"][k], a["params_ema"][k]) for k in a["params"])  # EMA is its own state
    assert_same_state(a["optimizer"], b["optimizer"])
    assert_same_state(a["schedule"], b["schedule"])
    timeless = [[{k: v for k, v in entry.items() if k != "wall_seconds"} for entry in c["history"]] for c in (a, b)]
    assert [entry["iter"] for entry in timeless[0]] == [2, 4] and timeless[0] == timeless[1]


def assert_same_state(a, b, where="state"):
    """Nested dicts/lists of tensors and numbers are equal, tensors bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_cosine_schedule_and_warm_restart(photos, tmp_path, invoke):
    assert cosine_lr(0, 0, 100, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_lr(50, 0, 100, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    assert cosine_lr(100, 0, 100, 1e-3, 1e-6) == pytest.approx(1e-6)
    first = tmp_path / "first.pth"
    train(photos, first, small(photos, iters=2), warn=lambda m: None)
    second = tmp_path / "second.pth"
    code, _, err = invoke("train", "--data", photos, "--resume", first, "--restart", "--loss", "mse", "--lr", "2e-4",
                          "--iters", "6", "--batch", "2", "--patch", "16", "--expansion", "8", "--out", second)
    assert code == 0, err
    state = torch.load(second, weights_only=True)
    assert state["iter"] == 6 and state["schedule"]["cycle_start"] == 2 and state["train"]["loss"] == "mse"
    # the last step of the new cycle ran at the floor of a cosine that began at iteration 2 with 2e-4
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cosine_lr(6, 2, 6, 2e-4, 1e-6))
    code, _, err = invoke("train", "--data", photos, "--restart", "--out", tmp_path / "x.pth")
    assert code == 2 and "--restart" in err and "needs --resume" in err
    code, _, err = invoke("train", "--data", photos, "--resume", second, "--iters", "6", "--batch", "2", "--patch", "16",
                          "--expansion", "8", "--out", tmp_path / "y.pth")
    assert code == 2 and "already at iteration 6" in err


def test_bad_train_input(photos, tmp_path, invoke):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = invoke("train", "--data", empty, "--out", tmp_path / "x.pth")
    assert code == 2 and "no training images" in err and "Traceback" not in err
    code, _, err = invoke("train", "--data", photos, "--patch", "128", "--out", tmp_path / "x.pth")
    assert code == 2 and "smaller than the 128px patch" in err
    code, _, err = invoke("train", "--data", photos, "--preset", "x4-ntire", "--patch", "16", "--out", tmp_path / "x.pth")
    assert code == 2 and "ESA needs" in err
    other = tmp_path / "x4.pth"
    train(photos, other, small(photos, iters=1, preset="x4-ntire", patch=64, batch=1, val=None), warn=lambda m: None)
    good = tmp_path / "good.pth"
    train(photos, good, small(photos, iters=2), warn=lambda m: None)
    before = good.read_bytes()
    code, _, err = invoke("train", "--data", photos, "--resume", other, "--out", good, "--patch", "16",
                          "--expansion", "8")
    assert code == 2 and "checkpoint is for" in err.splitlines()[-1]
    assert good.read_bytes() == before  # the last good checkpoint is never overwritten
    (tmp_path / "afile").write_text("x")
    code, _, err = invoke("train", "--data", photos, "--out", tmp_path / "afile" / "c.pth")
    assert code == 2 and "cannot create" in err


# README / ../shared/README: bicubic x2 Y-PSNR Set5 33.66 (this port: 33.682), Set14 30.33, BSD68 29.75
BICUBIC_X2 = {"Set5": 33.682, "Set14": 30.33, "BSD68": 29.75}


@pytest.mark.parametrize("dataset", ["Set5", "Set14", "BSD68"])
def test_packaged_weights_reproduce_their_sidecar_figures(dataset):
    """The shipped x2 weights give the Set5 / Set14 / BSD68 figures their sidecar (and README) state."""
    import hashlib

    sidecar = json.loads(PACKAGED_WEIGHTS.with_suffix(".json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(PACKAGED_WEIGHTS.read_bytes()).hexdigest()
    model = load_checkpoint(PACKAGED_WEIGHTS).model
    rows, bicubic = [], []
    for path in list_images(need(EVAL / dataset)):
        hr, lr = make_pair(read_rgb8(path)[0], 2)
        rows.append(score(run_torch_whole(model, lr), hr, 2))
        bicubic.append(score(imresize(lr, 2), hr, 2)["psnr_y"])
    stated = sidecar["eval"][dataset]
    assert stated["images"] == len(rows)
    for key in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
        # the sidecar rounds to 4 decimals (measured |difference| <= 4.8e-5): ten times that half-unit
        assert np.mean([r[key] for r in rows]) == pytest.approx(stated[key], abs=5e-4), key
    assert np.mean(bicubic) == pytest.approx(BICUBIC_X2[dataset], abs=0.005 if dataset != "Set5" else 0.002)


@pytest.mark.skipif(not PACKAGED_WEIGHTS.is_file(), reason="no packaged default weights")
def test_export_without_checkpoint_uses_packaged_weights(tmp_path, invoke):
    code, out, err = invoke("export", "--height", "64", "--width", "64", "-o", tmp_path / "d.onnx", "--json")
    assert code == 0, err
    card = json.loads((tmp_path / "d.json").read_text())
    assert card["checkpoint"].endswith("dipnet_x2.pth") and card["training_form"] and card["params"] == 93_664
    sidecar = json.loads(PACKAGED_WEIGHTS.with_suffix(".json").read_text())
    assert sidecar["sha256"] == card["checkpoint_sha256"]
    assert {"Set5", "Set14", "BSD68"} <= set(sidecar["eval"]) and sidecar["iterations"] > 0
