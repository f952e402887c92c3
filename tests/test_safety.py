"""Data safety: nothing of the user's is ever overwritten or deleted, and outputs appear as a set or not at all.

Each refusal is checked the same way (``refused``): exit code 2, exactly one stderr line naming the
file or option, no traceback, no input changed and nothing new left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dipnet_deploy.imageio import list_images
from dipnet_deploy.report import REPORT_FILES

from .conftest import SIDE, compare_args, refused, snapshot, write_images

# --------------------------------------------------------------------------- compare's report folder


def test_report_refuses_a_foreign_folder(work, invoke):
    notes = work / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (notes / "index.html").write_text("my page")
    before = snapshot(work)
    refused(invoke(*compare_args(work, notes)), str(notes), before, work)


def test_report_into_the_current_folder_refused(work, invoke, monkeypatch):
    monkeypatch.chdir(work)
    before = snapshot(work)
    refused(invoke(*compare_args(work, ".")), ".", before, work)


def test_report_into_the_data_folder_refused(work, invoke):
    before = snapshot(work)
    refused(invoke(*compare_args(work, work / "hr", work / "hr")), str(work / "hr"), before, work)


def test_report_file_that_is_an_input_refused(work, invoke):
    report = work / "report"
    assert invoke(*compare_args(work, report))[0] == 0
    (report / "index.html").write_bytes((work / "m.onnx").read_bytes())  # the user keeps a model there
    before = snapshot(work)
    args = compare_args(work, report)
    args[args.index("--fp32") + 1] = str(report / "index.html")
    refused(invoke(*args), "index.html", before, work)


def test_report_update_replaces_only_our_files(work, invoke):
    report = work / "report"
    code, _, err = invoke(*compare_args(work, report))
    assert code == 0, err
    assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_FILES)
    (report / "notes.txt").write_text("keep me")
    (report / "extra").mkdir()
    (report / "extra" / "model.onnx").write_bytes(b"keep me too")
    first = snapshot(report)
    code, _, err = invoke(*compare_args(work, report))
    assert code == 0, err
    second = snapshot(report)
    assert second["notes.txt"] == first["notes.txt"] and second["extra/model.onnx"] == first["extra/model.onnx"]
    assert sorted(second) == sorted(first)  # no staging folder or temporary file left
    assert json.loads((report / "metrics.json").read_text())["count"] == 2


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_report_into_a_new_or_empty_folder(state, work, invoke):
    report = work / "deep" / "report"
    if state == "empty":
        report.mkdir(parents=True)
    code, _, err = invoke(*compare_args(work, report))
    assert code == 0, err
    assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_FILES)


@pytest.mark.parametrize("state", ["missing", "previous report"])
def test_failed_report_leaves_the_folder_as_it_was(state, work, invoke, monkeypatch):
    report = work / "report"
    if state == "previous report":
        assert invoke(*compare_args(work, report))[0] == 0
    before = snapshot(work)

    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dipnet_deploy.report._heatmap", broken)
    assert invoke(*compare_args(work, report))[0] != 0
    assert snapshot(work) == before
    assert report.exists() == (state == "previous report")
    if report.exists():
        assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_FILES)


KILLED_MID_REPORT = """
import os, signal, sys
import dipnet_deploy.report as report
report._heatmap = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
from dipnet_deploy.cli import run
sys.argv = ["dipnet-deploy", *sys.argv[1:]]
run()
"""


def test_staging_folder_of_a_killed_run_is_not_foreign(work, invoke):
    """A run killed (SIGKILL) mid-report leaves its hidden staging folder: the next run removes that leftover
    (it is in the leftovers journal) and takes the folder; a folder merely named like one is the user's."""
    import subprocess
    import sys

    report = work / "report"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_REPORT, *compare_args(work, report)], capture_output=True)
    assert killed.returncode == -9
    assert [p.name[:15] for p in report.iterdir()] == [".dipnet-report-"]
    code, _, err = invoke(*compare_args(work, report))
    assert code == 0, err
    assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_FILES)

    mine = work / "other" / ".dipnet-report-notes"
    mine.mkdir(parents=True)
    (mine / "psnr_per_image.png").write_text("named like a report file, but mine")
    before = snapshot(work)
    refused(invoke(*compare_args(work, work / "other")), str(work / "other"), before, work)


# --------------------------------------------------------------------------- data listings skip our reports


def test_report_inside_data_is_not_read_back(work, invoke):
    report = work / "hr" / "report"
    assert invoke(*compare_args(work, report))[0] == 0
    assert [p.name for p in list_images(work / "hr")] == ["img0.png", "img1.png"]
    code, out, err = invoke(*compare_args(work, report), "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["images"] == 2


def test_report_folder_given_as_data_refused(work, invoke):
    report = work / "report"
    assert invoke(*compare_args(work, report))[0] == 0
    before = snapshot(work)
    refused(invoke(*compare_args(work, work / "other", report)), str(report), before, work)


def test_foreign_metrics_json_is_data(tmp_path):
    write_images(tmp_path / "shots", 1)
    (tmp_path / "shots" / "metrics.json").write_text('{"schema": "someone-else/1"}')
    assert [p.name for p in list_images(tmp_path)] == ["img0.png"]


# --------------------------------------------------------------------------- outputs that are inputs


def _link(work: Path, name: str, target: str, hard: bool = False) -> str:
    (os.link if hard else os.symlink)(work / target, work / name)
    return str(work / name)


# (case id, argv builder, text the error line must contain); paths are relative to the test's folder
COLLISIONS = [
    ("export output is the checkpoint",
     lambda w: ["export", "--checkpoint", w / "w.pth", "--output", w / "w.pth"], "w.pth"),
    ("export output ends in .json (card = output)",
     lambda w: ["export", "--checkpoint", w / "w.pth", "--output", w / "new.json"], "new.json"),
    ("export card is the checkpoint",
     lambda w: ["export", "--checkpoint", w / "w.json", "--output", w / "w.onnx"], "w.json"),
    ("export output is a link to the checkpoint",
     lambda w: ["export", "--checkpoint", w / "w.pth", "--output", _link(w, "l.onnx", "w.pth")], "l.onnx"),
    ("export output is a hard link to the checkpoint",
     lambda w: ["export", "--checkpoint", w / "w.pth", "--output", _link(w, "h.onnx", "w.pth", hard=True)], "h.onnx"),
    ("export output through ../ is the checkpoint",
     lambda w: ["export", "--checkpoint", w / "w.pth", "--output", w / "hr" / ".." / "w.pth"], "w.pth"),
    ("quantize output is the model",
     lambda w: ["quantize", "--model", w / "m.onnx", "--calib", w / "calib", "--output", w / "m.onnx"], "--output"),
    ("quantize ranges is the model",
     lambda w: ["quantize", "--model", w / "m.onnx", "--calib", w / "calib", "--ranges", w / "m.onnx",
                "--output", w / "q.onnx"], "--ranges"),
    ("quantize ranges is the output",
     lambda w: ["quantize", "--model", w / "m.onnx", "--calib", w / "calib", "--ranges", w / "x.onnx",
                "--output", w / "x.onnx"], "x.onnx"),
    ("quantize card is the fp32 card",
     lambda w: ["quantize", "--model", w / "m.onnx", "--calib", w / "calib", "--output", w / "m.int8"], "m.json"),
    ("quantize output is a calibration image",
     lambda w: ["quantize", "--model", w / "m.onnx", "--calib", w / "calib", "--output", w / "calib" / "img0.png"],
     "img0.png"),
    ("quantize output is the reused ranges",
     lambda w: ["quantize", "--model", w / "m.onnx", "--ranges", w / "m.ranges.json", "--output",
                w / "m.ranges.json"], "m.ranges.json"),
    ("quantize output is a link to the model",
     lambda w: ["quantize", "--model", w / "m.onnx", "--calib", w / "calib", "--output",
                _link(w, "q.int8.onnx", "m.onnx")], "q.int8.onnx"),
    ("train out is a data image",
     lambda w: ["train", "--data", w / "hr", "--out", w / "hr" / "img1.png", "--iters", "1"], "img1.png"),
    ("train out is a validation image",
     lambda w: ["train", "--data", w / "calib", "--val", w / "hr", "--out", w / "hr" / "img0.png", "--iters", "1",
                "--patch", "32"], "img0.png"),
]


@pytest.mark.parametrize("build, names", [c[1:] for c in COLLISIONS], ids=[c[0] for c in COLLISIONS])
def test_output_that_is_an_input_is_refused(build, names, work, invoke):
    args = build(work)
    before = snapshot(work)
    refused(invoke(*args), names, before, work)


# --------------------------------------------------------------------------- a run's files appear together


def test_failed_quantize_writes_none_of_its_files(work, invoke, monkeypatch):
    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt

    before = snapshot(work)
    monkeypatch.setattr("dipnet_deploy.quantize.quantized_conv_report", broken)  # after int8 and ranges are made
    assert invoke("quantize", "--model", work / "m.onnx", "--calib", work / "calib", "--output",
                  work / "n.int8.onnx")[0] != 0
    assert snapshot(work) == before


def test_failed_export_writes_neither_model_nor_card(work, invoke, monkeypatch):
    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt

    before = snapshot(work)
    monkeypatch.setattr("dipnet_deploy.export.json_bytes", broken)  # after the ONNX temp is written
    assert invoke("export", "--checkpoint", work / "w.pth", "--output", work / "n.onnx", "--height", SIDE,
                  "--width", SIDE)[0] != 0
    assert snapshot(work) == before


def test_quantize_set_is_consistent(work, invoke):
    code, _, err = invoke("quantize", "--model", work / "m.onnx", "--calib", work / "calib", "--output",
                          work / "n.int8.onnx", "--no-equalize")
    assert code == 0, err
    card = json.loads((work / "n.int8.json").read_text())
    assert card["onnx_sha256"] == hashlib.sha256((work / "n.int8.onnx").read_bytes()).hexdigest()
    assert card["ranges_sha256"] == hashlib.sha256((work / "n.ranges.json").read_bytes()).hexdigest()
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_a_folder_removed_during_the_run_is_one_write_error(tmp_path):
    """The output folder deleted while the temporary was being written: one WriteError naming the output."""
    from dipnet_deploy.errors import WriteError
    from dipnet_deploy.fileio import atomic_path

    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(WriteError, match="removed or renamed during the run"):
        with atomic_path(folder / "a.png") as temp:
            temp.write_bytes(b"x")
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
    assert not folder.exists()
