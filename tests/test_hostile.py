"""Hostile and broken input: every refusal is one stderr line naming the file or option, exit 2, no traceback,
no input changed and nothing written; bad files among good ones are skipped with a warning naming them.
"""

# ruff: noqa: F811  (the shared fixtures imported from test_safety are, by pytest's design, test parameters too)
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dipnet_deploy.errors import InputError
from dipnet_deploy.imageio import read_rgb8

from .conftest import SIDE, refused, sigint_default, snapshot, write_images

# --------------------------------------------------------------------------- bad images among good ones


def _tiny_images(directory: Path) -> list[str]:
    """HR images too small to score at x2 (SSIM needs 11 px left after a 2 px border): their names."""
    rng = np.random.default_rng(2)
    names = []
    for side in (4, 5, 8, 13, 15):
        cv2.imwrite(str(directory / f"tiny{side}.png"), (rng.random((side, side, 3)) * 255).astype(np.uint8))
        names.append(f"tiny{side}.png")
    return names


def test_compare_skips_tiny_images_by_name(work, invoke):
    names = _tiny_images(work / "hr")
    code, out, err = invoke("compare", work / "report", "--fp32", work / "m.onnx", "--int8", work / "m.int8.onnx",
                            "--data", work / "hr", "--repeats", "1", "--json")
    assert code == 0, err
    assert "Traceback" not in err
    for name in names:
        assert any(name in line and "too small" in line for line in err.splitlines()), name
    assert json.loads(out.strip().splitlines()[-1])["images"] == 2


def test_train_validation_skips_tiny_images(work, invoke):
    write_images(work / "val", 1, (40, 40))
    names = _tiny_images(work / "val")
    code, _, err = invoke("train", "--data", work / "hr", "--val", work / "val", "--iters", "1", "--batch", "1",
                          "--patch", "16", "--expansion", "8", "--out", work / "t.pth")
    assert code == 0, err
    for name in names:
        assert any(name in line and "too small" in line for line in err.splitlines()), name


@pytest.mark.parametrize("folder, command", [("calib", "quantize"), ("hr", "compare")])
def test_unreadable_image_is_skipped_by_name(folder, command, work, invoke, monkeypatch):
    victim = work / folder / "img0.png"
    real_fromfile = np.fromfile

    def denied(path, *args, **kwargs):  # what a non-root user gets for a chmod 000 file
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real_fromfile(path, *args, **kwargs)

    monkeypatch.setattr("dipnet_deploy.imageio.np.fromfile", denied)
    if command == "quantize":
        args = ["quantize", "--model", work / "m.onnx", "--calib", work / "calib", "-o", work / "q.int8.onnx"]
    else:
        args = ["compare", work / "report", "--fp32", work / "m.onnx", "--int8", work / "m.int8.onnx",
                "--data", work / "hr", "--repeats", "1"]
    code, _, err = invoke(*args)
    assert code == 0, err
    assert [line for line in err.splitlines() if "warning" in line and "img0.png" in line and "Permission denied" in line]


@pytest.mark.parametrize("command", ["quantize", "compare", "upscale"])
def test_unreadable_subfolder_is_skipped_by_name(command, work, invoke, monkeypatch):
    """A subfolder that cannot be listed (chmod 000 for a non-root user) is named in a warning; the run goes on."""
    data = work / ("calib" if command == "quantize" else "hr")
    locked = data / "locked"
    write_images(locked, 1)
    real_scandir = os.scandir

    def denied(path="."):
        if not isinstance(path, int) and Path(path) == locked:  # (an int is a folder descriptor)
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    args = {"quantize": ["quantize", "--model", work / "m.onnx", "--calib", data, "-o", work / "q.int8.onnx"],
            "compare": ["compare", work / "report", "--fp32", work / "m.onnx", "--data", data, "--repeats", "1"],
            "upscale": ["upscale", data, "--model", work / "m.onnx", "-o", work / "up"]}[command]
    code, out, err = invoke(*args, "--json")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning: skipped") and str(locked) in line
            and "cannot read the folder (Permission denied)" in line], err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["images_used" if command == "quantize" else "images"] == 2, summary


def test_runtime_failure_on_one_image_skips_it_by_name(work, invoke, monkeypatch):
    """An unexpected error while scoring one image (a runtime kernel error, say) skips that image with a
    warning naming it; the others are scored."""
    from dipnet_deploy import compare as compare_module

    real, calls = compare_module.evaluate_image, []

    def fails_on_the_second(*args):  # img0.png, then img1.png: one worker takes the sorted files in order
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION :\nkernel failed")
        return real(*args)

    monkeypatch.setattr(compare_module, "evaluate_image", fails_on_the_second)
    code, out, err = invoke("compare", work / "report", "--fp32", work / "m.onnx", "--data", work / "hr",
                            "--repeats", "1", "--json")
    assert code == 0 and "Traceback" not in err, err
    warning = [line for line in err.splitlines() if "img1.png" in line]
    assert len(warning) == 1 and "failed to evaluate (RuntimeError" in warning[0], err
    assert json.loads(out.strip().splitlines()[-1])["images"] == 1


def test_pool_worker_that_cannot_start_fails_the_run_in_one_line(work):
    """A pool initializer that raises makes multiprocessing respawn workers forever (a hang): the failure is
    kept and raised by the first task instead, as an InputError that survives pickling."""
    import pickle

    from dipnet_deploy import compare as compare_module

    (work / "broken.onnx").write_bytes(b"not onnx")
    compare_module._init_pool_worker({"fp32": str(work / "broken.onnx")}, 1, "sr", 2, "onnxruntime")
    try:
        with pytest.raises(InputError) as raised:
            compare_module._pool_score(str(work / "hr" / "img0.png"))
    finally:
        compare_module._POOL_SCORER = None
        signal.signal(signal.SIGINT, signal.default_int_handler)
    error = pickle.loads(pickle.dumps(raised.value))
    assert (error.where, str(error)) == (str(work / "broken.onnx"), str(raised.value))
    assert "cannot load the --fp32 model" in error.problem


def test_five_channel_tiff_is_one_clean_refusal(tmp_path, capfd):
    import tifffile

    path = tmp_path / "five.tif"
    tifffile.imwrite(path, np.zeros((40, 40, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(InputError, match="not a readable image"):
        read_rgb8(path)
    assert capfd.readouterr().err == ""  # OpenCV's own multi-line complaint does not reach the user


# --------------------------------------------------------------------------- malformed ranges files


RANGES = {
    "string min": (lambda d, n: d["tensors"][n[0]].update(min="0"), "min and max must be numbers"),
    "tensors a list": (lambda d, n: d.update(tensors=[]), "'tensors'"),
    "tensors empty": (lambda d, n: d.update(tensors={}), "no range for tensor"),
    "missing tensor": (lambda d, n: d["tensors"].pop(n[3]), "no range for tensor"),
    "entry without min": (lambda d, n: d["tensors"][n[0]].pop("min"), "min and max must be numbers"),
    "entry a list": (lambda d, n: d["tensors"].update({n[0]: [0, 1]}), "min and max must be numbers"),
    "no calibration_files": (lambda d, n: d.pop("calibration_files"), "'calibration_files'"),
    "method null": (lambda d, n: d.update(method=None), "'method'"),
    "NaN min": (lambda d, n: d["tensors"][n[0]].update(min=float("nan")), "not finite"),
    "inf max": (lambda d, n: d["tensors"][n[2]].update(max=float("inf")), "not finite"),
    "min > max": (lambda d, n: d["tensors"][n[2]].update(min=3.0, max=1.0), "min <= max"),
    "zero-width input": (lambda d, n: d["tensors"][n[0]].update(min=0.5, max=0.5), "input range"),
    "bool max": (lambda d, n: d["tensors"][n[1]].update(max=True), "min and max must be numbers"),
    "not a dict": (lambda d, n: d.clear() or d.update(format="dipnet-deploy-ranges/1"), "ranges"),
}


@pytest.mark.parametrize("case", sorted(RANGES))
def test_malformed_ranges_refused(case, work, invoke):
    change, words = RANGES[case]
    document = json.loads((work / "m.ranges.json").read_text())
    change(document, list(document["tensors"]))
    (work / "bad.ranges.json").write_text(json.dumps(document))
    before = snapshot(work)
    result = invoke("quantize", "--model", work / "m.onnx", "--ranges", work / "bad.ranges.json",
                    "-o", work / "q.int8.onnx")
    refused(result, "bad.ranges.json", before, work)
    assert words in result[2]


def test_nan_percentile_refused(work, invoke):
    before = snapshot(work)
    refused(invoke("quantize", "--model", work / "m.onnx", "--calib", work / "calib", "--method", "percentile",
                   "--percentile", "nan", "-o", work / "q.int8.onnx"), "--percentile", before, work)


def test_flat_calibration_refused(work, invoke):
    (work / "black").mkdir()
    for i in range(2):
        cv2.imwrite(str(work / "black" / f"{i}.png"), np.zeros((48, 64, 3), np.uint8))
    before = snapshot(work)
    refused(invoke("quantize", "--model", work / "m.onnx", "--calib", work / "black", "-o", work / "q.int8.onnx"),
            "flat images", before, work)


# --------------------------------------------------------------------------- malformed checkpoints


@pytest.fixture(scope="module")
def resumable(models) -> Path:
    """A 2-iteration training checkpoint of the x2 preset (E = 8) on the module's HR images."""
    out = models["hr"].parent / "resume.pth"
    if not out.exists():
        from dipnet_deploy.train import TrainOptions, train

        train(models["hr"], out, TrainOptions(expansion=8, iters=2, batch=1, patch=16, save_every=2), warn=lambda _m: None)
    return out


RESUMES = {
    "string iter": lambda c: c.update(iter="2"),
    "bool iter": lambda c: c.update(iter=True),
    "negative iter": lambda c: c.update(iter=-1),
    "empty optimizer": lambda c: c.update(optimizer={}),
    "string config": lambda c: c.update(config="x2"),
    "no params_ema": lambda c: c.pop("params_ema"),
    "schedule None": lambda c: c.update(schedule=None),
    "string cycle_start": lambda c: c["schedule"].update(cycle_start="0"),
    "history a string": lambda c: c.update(history="x"),
    "NaN weights": lambda c: c["params"]["conv_1.weight"].fill_(float("nan")),
    "string weight": lambda c: c["params_ema"].update({"conv_1.weight": "w"}),
    "two param groups": lambda c: c["optimizer"]["param_groups"].append(dict(c["optimizer"]["param_groups"][0])),
}


@pytest.mark.parametrize("case", sorted(RESUMES))
def test_malformed_resume_refused(case, resumable, work, invoke):
    checkpoint = torch.load(resumable, weights_only=True)
    RESUMES[case](checkpoint)
    torch.save(checkpoint, work / "bad.pth")
    before = snapshot(work)
    refused(invoke("train", "--data", work / "hr", "--resume", work / "bad.pth", "--iters", "4", "--batch", "1",
                   "--patch", "16", "--expansion", "8", "--out", work / "next.pth"), "bad.pth", before, work)


CHECKPOINTS = {
    "0-dim conv_1.weight": (lambda s: s.update({"conv_1.weight": torch.tensor(1.0)}), "4-D"),
    "empty conv_1.weight": (lambda s: s.update({"conv_1.weight": torch.zeros(0, 3, 3, 3)}), "4-D"),
    "training form without block_1.c1_r": (lambda s: s.pop("block_1.c1_r.weight"), "block_1.c1_r.weight"),
    "NaN weight": (lambda s: s["block_2.c2_r.weight"].view(-1)[0].fill_(float("nan")), "NaN"),
    "inf weight": (lambda s: s["conv_2.weight"].view(-1)[3].fill_(float("inf")), "inf"),
    "string tensor": (lambda s: s.update({"conv_2.weight": "w"}), "conv_2.weight"),
}


@pytest.mark.parametrize("command", ["export", "info"])
@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_malformed_checkpoint_refused(case, command, work, invoke):
    change, words = CHECKPOINTS[case]
    state = {k: v.clone() for k, v in torch.load(work / "w.pth", weights_only=True).items()}
    change(state)
    torch.save(state, work / "bad.pth")
    before = snapshot(work)
    args = (["export", "--checkpoint", work / "bad.pth", "--height", SIDE, "--width", SIDE, "-o", work / "x.onnx"]
            if command == "export" else ["info", work / "bad.pth"])
    result = invoke(*args)
    refused(result, "bad.pth", before, work)
    assert words in result[2]


# --------------------------------------------------------------------------- ONNX files that are not what they claim


def _fp16_input(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def _no_initializer(model: onnx.ModelProto) -> onnx.ModelProto:
    del model.graph.initializer[0]
    return model


def _classifier(_model: onnx.ModelProto) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.zeros((10, 3, SIDE, SIDE), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W"], ["c"]), helper.make_node("Flatten", ["c"], ["output"])], "cls",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scale_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its output declared at the input's size (what a x1 'SR' model looks like)."""
    for dim, size in zip(model.graph.output[0].type.tensor_type.shape.dim, [1, 3, SIDE, SIDE]):
        dim.dim_value = size
    return model


ONNX_CASES = {
    "fp16 input": (_fp16_input, "float16"),
    "missing initializer": (_no_initializer, "conv_1.weight"),
    "classifier": (_classifier, "not a super-resolution"),
    "scale 1": (_scale_one, "scale 1"),
}


def _write_bad_onnx(case: str, work: Path) -> Path:
    make, _ = ONNX_CASES[case]
    path = work / "bad.onnx"
    onnx.save(make(onnx.load(str(work / "m.onnx"))), str(path))
    return path


@pytest.mark.parametrize("role", ["--model", "--fp32", "--int8"])
@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_bad_onnx_refused(case, role, work, invoke):
    bad = _write_bad_onnx(case, work)
    before = snapshot(work)
    if role == "--model":
        args = ["quantize", "--model", bad, "--calib", work / "calib", "-o", work / "q.int8.onnx"]
    else:
        paths = {"--fp32": work / "m.onnx", "--int8": work / "m.int8.onnx"} | {role: bad}
        args = ["compare", work / "report", *[x for kv in paths.items() for x in kv], "--data", work / "hr"]
    result = invoke(*args)
    refused(result, "bad.onnx", before, work)
    assert ONNX_CASES[case][1] in result[2]


def test_missing_external_data_said_so(work, invoke):
    model = onnx.load(str(work / "m.onnx"))
    onnx.save(model, str(work / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    (work / "ext.data").unlink()
    before = snapshot(work)
    result = invoke("info", work / "ext.onnx")
    refused(result, "ext.onnx", before, work)
    assert "external data" in result[2]


def test_info_recognizes_onnx_without_suffix(work, invoke):
    (work / "model").write_bytes((work / "m.onnx").read_bytes())
    code, out, err = invoke("info", work / "model", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["kind"] == "onnx"


@pytest.mark.parametrize("side", [16, 24, 32])
def test_export_refuses_inputs_compare_cannot_tile(side, work, invoke):
    before = snapshot(work)
    refused(invoke("export", "--checkpoint", work / "w.pth", "--height", side, "--width", 64, "-o", work / "s.onnx"),
            "--height/--width", before, work)


# --------------------------------------------------------------------------- roles and interrupts


@pytest.mark.parametrize("role, model", [("--fp32", "m.int8.onnx"), ("--int8", "m.onnx")])
def test_model_in_the_wrong_role_refused(role, model, work, invoke):
    paths = {"--fp32": work / "m.onnx", "--int8": work / "m.int8.onnx"} | {role: work / model}
    before = snapshot(work)
    refused(invoke("compare", work / "report", *[x for kv in paths.items() for x in kv], "--data", work / "hr"),
            role, before, work)


def test_report_location_checked_before_work(work, invoke):
    (work / "afile").write_text("x")
    before = snapshot(work)
    refused(invoke("compare", work / "afile" / "report", "--fp32", work / "m.onnx", "--data", work / "hr"),
            "afile", before, work)


def test_ctrl_c_during_parallel_compare(work):
    """SIGINT to the whole process group (what a terminal sends): one line, exit 130, workers gone, no report."""
    write_images(work / "many", 100, (200, 240))  # long enough that SIGINT lands mid-run on a fast machine
    command = [sys.executable, "-m", "dipnet_deploy", "compare", str(work / "report"), "--fp32", str(work / "m.onnx"),
               "--int8", str(work / "m.int8.onnx"), "--data", str(work / "many"), "--workers", "2", "--repeats", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                               preexec_fn=sigint_default)
    time.sleep(8)
    os.killpg(process.pid, signal.SIGINT)
    began = time.perf_counter()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert time.perf_counter() - began < 20
    lines = err.decode().strip().splitlines()
    assert lines[-1] == "dipnet-deploy: interrupted" and "Traceback" not in err.decode()
    assert not (work / "report").exists()
    assert _group_gone(process.pid, within=5.0)  # no worker outlived the command


def _group_gone(group: int, within: float) -> bool:
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------- numbers that must not reach an output


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_flat_image_is_skipped_and_json_is_strict(work, invoke):
    cv2.imwrite(str(work / "hr" / "flat.png"), np.full((48, 64, 3), 128, np.uint8))
    code, out, err = invoke("compare", work / "report", "--fp32", work / "m.onnx", "--int8", work / "m.int8.onnx",
                            "--data", work / "hr", "--repeats", "1", "--json")
    assert code == 0, err
    assert any("flat.png" in line and "flat colour" in line for line in err.splitlines()), err
    assert _strict_json(out.strip().splitlines()[-1])["images"] == 2
    assert _strict_json((work / "report" / "metrics.json").read_text())["count"] == 2


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_learning_rate_refused(value, work, invoke):
    before = snapshot(work)
    refused(invoke("train", "--data", work / "hr", "--lr", value, "--iters", "1", "--batch", "1", "--patch", "16",
                   "--out", work / "t.pth"), "--lr", before, work)


def test_json_writer_never_writes_nan_or_infinity():
    from dipnet_deploy.fileio import json_text

    text = json_text({"psnr": float("inf"), "rows": [{"ssim": float("nan")}, 1.5], "n": np.float64("-inf")}, None)
    assert _strict_json(text) == {"psnr": None, "rows": [{"ssim": None}, 1.5], "n": None}


# --------------------------------------------------------------------------- a valid checkpoint once refused


def test_rep_convs_with_different_expansions_fold_and_export_exactly(tmp_path, invoke):
    """E = out channels (c1_r 24, c2_r 24, c3_r 32): inferred per conv, folded and exported like any other."""
    import onnxruntime as ort

    from dipnet_deploy.checkpoint import load_checkpoint
    from dipnet_deploy.config import PRESETS

    from .conftest import random_train_model

    reference = random_train_model(PRESETS["x2"].replace(expansion=(24, 24, 32)), std=0.05)
    assert tuple(reference.state_dict()["block_1.c3_r.weight"].shape) == (32, 24, 3, 3)
    torch.save({"params_ema": reference.state_dict()}, tmp_path / "e.pth")
    loaded = load_checkpoint(tmp_path / "e.pth")
    assert loaded.config.expansion == (24, 24, 32) and loaded.fold_max_abs_diff < 1e-5
    code, _, err = invoke("export", "--checkpoint", tmp_path / "e.pth", "--height", SIDE, "--width", SIDE,
                          "-o", tmp_path / "e.onnx")
    assert code == 0, err
    x = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        unfolded = reference(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - unfolded).max() < 1e-4
    with pytest.raises(InputError, match="block_1.c3_r.weight"):  # an override must fit the file
        load_checkpoint(tmp_path / "e.pth", expansion=24)


# --------------------------------------------------------------------------- size bounds


def _png_bomb(path: Path, side: int, bit_depth: int, colour_type: int, channels: int) -> Path:
    """A valid all-zero PNG of side x side, compressed in a stream (a decompression bomb: tiny file, huge image)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\0" * (1 + side * channels * bit_depth // 8)  # filter byte + pixels
    rows_per_block = max(1, (8 << 20) // len(row))
    compressor, parts = zlib.compressobj(9), []
    for start in range(0, side, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, side - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory) -> dict[str, Path]:
    """A 30000x30000 gray PNG (under 1 MB), a 12000x12000 16-bit RGBA PNG, and a 4 GiB sparse file named .png."""
    folder = tmp_path_factory.mktemp("hostile")
    sparse = folder / "sparse.png"
    with open(sparse, "wb") as handle:
        handle.seek((4 << 30) - 1)
        handle.write(b"\0")
    return {"gray bomb": _png_bomb(folder / "gray.png", 30000, 8, 0, 1),
            "16-bit RGBA bomb": _png_bomb(folder / "rgba16.png", 12000, 16, 6, 4), "sparse 4 GiB": sparse}


@pytest.mark.parametrize("case, words", [("gray bomb", "megapixels"), ("16-bit RGBA bomb", "megapixels"),
                                         ("sparse 4 GiB", "MiB")])
def test_oversized_image_alone_is_refused_from_its_header(case, words, hostile_images):
    with pytest.raises(InputError, match=words) as refusal:
        read_rgb8(hostile_images[case])
    assert hostile_images[case].name in str(refusal.value) and "DIPNET_MAX_MEGAPIXELS" in str(refusal.value)


def test_oversized_images_among_good_ones_are_skipped_in_bounded_memory(hostile_images, work):
    for path in hostile_images.values():
        os.symlink(path, work / "calib" / path.name)
    command = [sys.executable, "-m", "dipnet_deploy", "quantize", "--model", str(work / "m.onnx"), "--calib",
               str(work / "calib"), "-o", str(work / "q.int8.onnx")]
    # a fresh parent, so that the peak is this command's alone (RUSAGE_CHILDREN keeps the largest child)
    measure = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "print(done.stderr, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    code, peak_kib = map(int, result.stdout.split())
    assert code == 0, result.stderr
    assert peak_kib < 1.5 * 2**20, f"peak {peak_kib / 2**20:.2f} GiB"
    for path in hostile_images.values():
        assert any(path.name in line and "warning: skipped" in line for line in result.stderr.splitlines())
    assert "Traceback" not in result.stderr


ABSURD = {
    "export --height 100000": ["export", "--checkpoint", "{w}", "--height", "100000", "-o", "{out}"],
    "export --upscale 100000": ["export", "--checkpoint", "{w}", "--upscale", "100000", "-o", "{out}"],
    "export --feature-channels 30000": ["export", "--checkpoint", "{w}", "--feature-channels", "30000", "-o", "{out}"],
    "export --mid-channels 100000": ["export", "--checkpoint", "{w}", "--mid-channels", "100000", "-o", "{out}"],
    "train --expansion 100000000": ["train", "--data", "{hr}", "--expansion", "100000000", "--out", "{out}"],
    "train --batch 100000000": ["train", "--data", "{hr}", "--batch", "100000000", "--out", "{out}"],
    "info --height 1e9": ["info", "{w}", "--height", "1e9"],
    "info --height --width 1000000000": ["info", "{w}", "--height", "1000000000", "--width", "1000000000"],
    "--max-megapixels nan": ["--max-megapixels", "nan", "info", "{w}"],
    "--max-megapixels -1": ["--max-megapixels", "-1", "info", "{w}"],
    "bench --streams 100000": ["bench", "--fp32", "{m}", "--int8", "{q}", "--streams", "100000"],
    "bench --threads 100000": ["bench", "--fp32", "{m}", "--int8", "{q}", "--threads", "100000"],
    "compare --workers 100000": ["compare", "{out}", "--fp32", "{m}", "--data", "{hr}", "--workers", "100000"],
    "upscale --threads 100000": ["upscale", "{hr}", "--model", "{m}", "-o", "{out}", "--threads", "100000"],
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_sizes_refused_before_allocating(case, work, invoke):
    option = next(word for word in case.split() if word.startswith("--"))
    args = [a.format(w=work / "w.pth", hr=work / "hr", out=work / "out.bin", m=work / "m.onnx", q=work / "m.int8.onnx")
            for a in ABSURD[case]]
    before = snapshot(work)
    refused(invoke(*args), option, before, work)


@pytest.mark.parametrize("name", ["two\nlines.pth", "carriage\rreturn.pth", "tab\tand\x1bescape.pth"])
def test_control_characters_in_a_file_name_stay_on_one_line(name, work, invoke):
    """A refusal naming a file with a newline (or other control character) in its name is still one line,
    with the character shown as an escape."""
    path = work / name
    path.write_bytes(b"not a checkpoint")
    before = snapshot(work)
    code, _, err = invoke("export", "--checkpoint", path, "-o", work / "never.onnx")
    refused((code, "", err), "not a PyTorch checkpoint", before, work)
    assert name.encode("unicode_escape").decode("ascii") in err
    path.unlink()


# --------------------------------------------------------------------------- found by the second audit (206 cases)


def _tiny_sr_model(path: Path) -> Path:
    """A valid x2 SR ONNX whose 8x8 input cannot hold a 9x9 conv's halo on both sides of a tile."""
    weight = numpy_helper.from_array(np.full((12, 3, 9, 9), 0.01, np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W"], ["c"], pads=[4, 4, 4, 4]),
         helper.make_node("DepthToSpace", ["c"], ["output"], blocksize=2, mode="CRD")], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 16, 16])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("command", ["upscale", "compare"])
def test_model_too_small_to_tile_is_one_line(command, work, invoke):
    tiny = _tiny_sr_model(work / "tiny.onnx")
    before = snapshot(work)
    args = (["upscale", work / "hr", "--model", tiny, "-o", work / "out"] if command == "upscale" else
            ["compare", work / "report", "--fp32", tiny, "--data", work / "hr", "--repeats", "1"])
    result = invoke(*args)
    refused(result, "tiny.onnx", before, work)
    assert "too small to tile" in result[2]


@pytest.mark.parametrize("args, option", [
    (["--device", "meta"], "--device"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--batch", "100000000", "--patch", "64"], "--batch"),
])
def test_finetune_options_that_cannot_train_are_refused(args, option, work, invoke):
    before = snapshot(work)
    refused(invoke("finetune", "--checkpoint", work / "w.pth", "--data", work / "hr", "--out", work / "ft.pth",
                   "--iters", "1", *args), option, before, work)


def test_train_negative_seed_refused(work, invoke):
    before = snapshot(work)
    refused(invoke("train", "--data", work / "hr", "--out", work / "t.pth", "--seed", "-1"), "--seed", before, work)


QUANTIZE_TO_Q = ["quantize", "--model", "{m}", "--calib", "{calib}", "-o", "{q}"]
EXPORT_TO_E = ["export", "--checkpoint", "{w}", "-o", "{e}", "--height", str(SIDE), "--width", str(SIDE)]
FOREIGN_AT_AN_OUTPUT = {  # (the user's file there, the command)
    "quantize card (derived)": ("q.int8.json", QUANTIZE_TO_Q),
    "quantize ranges (derived)": ("q.ranges.json", QUANTIZE_TO_Q),
    "quantize --output": ("q.int8.onnx", QUANTIZE_TO_Q),
    "quantize --ranges": ("notes.txt", [*QUANTIZE_TO_Q, "--ranges", "{work}/notes.txt"]),
    "export card (derived)": ("e.json", EXPORT_TO_E),
    "export --output": ("e.onnx", EXPORT_TO_E),
    "train --out": ("t.pth", ["train", "--data", "{hr}", "--out", "{t}", "--iters", "1", "--batch", "1", "--patch",
                              "16", "--expansion", "8"]),
}


@pytest.mark.parametrize("case", sorted(FOREIGN_AT_AN_OUTPUT))
def test_an_output_never_replaces_a_file_of_the_user(case, work, invoke):
    """Named by the user or derived by the tool, an output path holding a file dipnet-deploy did not write is
    refused; once that file is gone, the command runs, and a second run replaces its own files."""
    name, template = FOREIGN_AT_AN_OUTPUT[case]
    args = [a.format(m=work / "m.onnx", calib=work / "calib", q=work / "q.int8.onnx", w=work / "w.pth",
                     e=work / "e.onnx", hr=work / "hr", t=work / "t.pth", work=work) for a in template]
    (work / name).write_text("my notes, not anything of dipnet-deploy's")
    before = snapshot(work)
    result = invoke(*args)
    refused(result, name, before, work)
    assert "not written by dipnet-deploy" in result[2]
    (work / name).unlink()
    assert invoke(*args)[0] == 0
    assert invoke(*args)[0] == 0


def test_info_on_a_fifo_refuses_instead_of_waiting(work):
    fifo = work / "f.pth"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "dipnet_deploy", "info", str(fifo)], capture_output=True, text=True,
                          timeout=60, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 2 and done.stderr.strip() == f"dipnet-deploy: error: {fifo}: not a regular file"


@pytest.mark.parametrize("value", ["lots", "inf"])
def test_megapixel_variable_is_named_when_it_is_bad(value, work, invoke, monkeypatch):
    monkeypatch.setenv("DIPNET_MAX_MEGAPIXELS", value)
    before = snapshot(work)
    refused(invoke("info", work / "m.onnx"), "DIPNET_MAX_MEGAPIXELS", before, work)


@pytest.mark.parametrize("command", ["compare", "upscale"])
def test_fifo_and_dangling_link_in_a_folder_are_named(command, work, invoke):
    os.mkfifo(work / "hr" / "f.png")
    (work / "hr" / "d.png").symlink_to(work / "gone.png")
    args = (["compare", work / "report", "--fp32", work / "m.onnx", "--data", work / "hr", "--repeats", "1"]
            if command == "compare" else ["upscale", work / "hr", "--model", work / "m.onnx", "-o", work / "out"])
    code, _, err = invoke(*args)
    assert code == 0, err
    assert any(line == f"warning: skipped {work / 'hr' / 'f.png'}: not a regular file" for line in err.splitlines()), err
    assert any(line == f"warning: skipped {work / 'hr' / 'd.png'}: a link to nothing" for line in err.splitlines()), err


def test_absurd_repeats_refused(work, invoke):
    before = snapshot(work)
    refused(invoke("bench", "--fp32", work / "m.onnx", "--int8", work / "m.int8.onnx", "--repeats", str(10**22)),
            "--repeats", before, work)


def test_a_fifo_given_as_ranges_to_reuse_is_not_a_regular_file(work, invoke):
    """The audit found a FIFO (reading it would wait) called "no such ranges file"."""
    fifo = work / "r.json"
    os.mkfifo(fifo)
    before = snapshot(work)
    refused(invoke("quantize", "--model", work / "m.onnx", "--ranges", fifo, "-o", work / "out" / "q.int8.onnx"),
            f"{fifo}: not a regular file", before, work)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
@pytest.mark.parametrize("args", [["info", "{m}"], ["info", "{m}", "--json"], ["--version"], ["--help"]],
                         ids=lambda args: " ".join(args))
def test_standard_output_on_a_full_device_is_named(args, work):
    """`info > /dev/full`: the audit found "an output: cannot write", and --help or --version a traceback."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "dipnet_deploy", *(a.format(m=work / "m.onnx") for a in args)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                              env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "dipnet-deploy: error: standard output: cannot write (No space left on device)"], done.stderr


@pytest.mark.parametrize("how", ["env", "option"])
@pytest.mark.parametrize("value, words", [
    ("5_0", "not a positive number of MiB"), ("\u0665\u0660", "not a positive number of MiB"),  # Arabic-Indic 50
    (" 50", "not a positive number of MiB"), ("1e-300", "not a positive number of MiB"),
    ("0.5", "below the least accepted, 1 MiB"),
])
def test_a_budget_is_plain_ascii_digits_and_at_least_one_mib(value, words, how, work, invoke, monkeypatch):
    """Python's float() took 5_0, other scripts' digits and spaces; a budget of 1e-300 MiB refused every image
    as "about 0 MiB over the 0 MiB budget". Refused as the option (or variable) is read, naming it."""
    if how == "env":
        monkeypatch.setenv("DIPNET_MAX_MEMORY_MB", value)
    else:
        monkeypatch.delenv("DIPNET_MAX_MEMORY_MB", raising=False)
    before = snapshot(work)
    name = "DIPNET_MAX_MEMORY_MB" if how == "env" else "--max-memory-mb"
    result = invoke(*([] if how == "env" else ["--max-memory-mb", value]), "upscale", work / "hr", "--model",
                    work / "m.onnx", "-o", work / "out")
    refused(result, name, before, work)
    assert words in result[2], result[2]
