"""train: smoke run that exports, exact resume, bad input; the packaged default weights."""

import json

import cv2
import numpy as np
import pytest
import torch

from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.cli import PACKAGED_WEIGHTS
from dipnet_deploy.train import TrainConfig, cosine_lr, train


@pytest.fixture
def photos(tmp_path):
    directory = tmp_path / "photos"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = cv2.GaussianBlur((rng.random((72, 80, 3)) * 255).astype(np.uint8), (5, 5), 1.5)
        cv2.imwrite(str(directory / f"{i}.png"), image)
    return directory


def small(photos, out, **changes):
    settings = dict(data=photos, out=out, expansion=8, iters=4, batch=2, patch=16, val=photos, val_every=2,
                    save_every=2, seed=3)
    return TrainConfig(**(settings | changes))


def test_smoke_train_checkpoint_exports(photos, tmp_path, invoke):
    out = tmp_path / "ckpt.pth"
    code, stdout, err = invoke("train", "--data", photos, "--val", photos, "--iters", "3", "--batch", "2",
                               "--patch", "16", "--expansion", "8", "--val-every", "3", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["iters"] == 3 and summary["val_psnr_y"] > 0
    checkpoint = torch.load(out, weights_only=True)
    assert {"params", "params_ema", "iter", "config", "optimizer"} <= set(checkpoint)
    code, _, err = invoke("export", "--checkpoint", out, "--height", "32", "--width", "32", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert load_checkpoint(out).source == "params_ema"


def test_resume_continues_exactly(photos, tmp_path):
    straight = train(small(photos, tmp_path / "a.pth"), warn=lambda m: None)

    def stop_after_two(iteration, _loss, _entry):
        if iteration == 2:
            raise KeyboardInterrupt  # the run is killed right after its checkpoint at 2

    with pytest.raises(KeyboardInterrupt):
        train(small(photos, tmp_path / "b.pth"), progress=stop_after_two, warn=lambda m: None)
    assert torch.load(tmp_path / "b.pth", weights_only=True)["iter"] == 2
    resumed = train(small(photos, tmp_path / "b.pth", resume=tmp_path / "b.pth"), warn=lambda m: None)
    a = torch.load(straight.out, weights_only=True)
    b = torch.load(resumed.out, weights_only=True)
    assert a["iter"] == b["iter"] == 4
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key


def test_cosine_schedule_and_warm_restart(photos, tmp_path, invoke):
    assert cosine_lr(0, 0, 100, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_lr(50, 0, 100, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    assert cosine_lr(100, 0, 100, 1e-3, 1e-6) == pytest.approx(1e-6)
    first = tmp_path / "first.pth"
    train(small(photos, first, iters=2), warn=lambda m: None)
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
    train(small(photos, other, iters=1, preset="x4-ntire", patch=64, batch=1, val=None), warn=lambda m: None)
    good = tmp_path / "good.pth"
    train(small(photos, good, iters=2), warn=lambda m: None)
    before = good.read_bytes()
    code, _, err = invoke("train", "--data", photos, "--resume", other, "--out", good, "--patch", "16",
                          "--expansion", "8")
    assert code == 2 and "checkpoint is for" in err.splitlines()[-1]
    assert good.read_bytes() == before  # the last good checkpoint is never overwritten
    (tmp_path / "afile").write_text("x")
    code, _, err = invoke("train", "--data", photos, "--out", tmp_path / "afile" / "c.pth")
    assert code == 2 and "cannot create" in err


@pytest.mark.skipif(not PACKAGED_WEIGHTS.is_file(), reason="no packaged default weights")
def test_export_without_checkpoint_uses_packaged_weights(tmp_path, invoke):
    code, out, err = invoke("export", "--height", "64", "--width", "64", "-o", tmp_path / "d.onnx", "--json")
    assert code == 0, err
    card = json.loads((tmp_path / "d.json").read_text())
    assert card["checkpoint"].endswith("dipnet_x2.pth") and card["training_form"] and card["params"] == 93_664
    sidecar = json.loads(PACKAGED_WEIGHTS.with_suffix(".json").read_text())
    assert sidecar["sha256"] == card["checkpoint_sha256"]
    assert {"Set5", "Set14", "BSD68"} <= set(sidecar["eval"]) and sidecar["iterations"] > 0
