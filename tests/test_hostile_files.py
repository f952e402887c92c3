"""Hostile files and faults around what the tool writes: ownership that cannot be forged, full disks,
SIGTERM and SIGKILL, names that are not UTF-8.

Every refusal: exit 2, one stderr line naming the file, no traceback, nothing of the user's touched.
"""

# ruff: noqa: F811  (the shared fixtures imported from test_safety are, by pytest's design, test parameters too)
from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dipnet_deploy import fileio, leftovers
from dipnet_deploy.fileio import checkpoint_seal, json_bytes, make_folders, removing_empty_folders, sealed_json, sha256_file
from dipnet_deploy.report import REPORT_FILES
from dipnet_deploy.safety import written_by_us

from .conftest import compare_args, refused, snapshot, write_images

# --------------------------------------------------------------------------- ownership: seals, not names


def test_json_seal_round_trips_and_any_change_breaks_it():
    data = json_bytes({"tool": "dipnet-deploy 1", "x": [1.5, None, "é"], "nested": {"a": 1e-30}})
    assert sealed_json(data)["x"] == [1.5, None, "é"]
    assert sealed_json(data.replace(b"1.5", b"2.5")) is None  # content changed, seal kept
    assert sealed_json(data.replace(b"\n  ", b"\n   ", 1)) is None  # same content, another layout
    assert sealed_json(b'{"tool": "dipnet-deploy 1", "seal": "sha256:00"}') is None
    assert sealed_json(b"[" * 100_000) is None  # deep nesting: not ours, no RecursionError


def test_checkpoint_seal_covers_every_weight():
    payload = {"params": {"w": torch.ones(3)}, "iter": 5, "config": {"upscale": 2}}
    seal = checkpoint_seal(payload)
    assert checkpoint_seal({**payload, "iter": 6}) != seal
    assert checkpoint_seal({**payload, "params": {"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}}) != seal
    assert checkpoint_seal({**payload, "params": {"v": torch.ones(3)}}) != seal
    assert checkpoint_seal({**payload, "params": {"w": torch.ones(3, dtype=torch.float64)}}) != seal


def test_forged_metrics_json_does_not_make_a_folder_ours(work, invoke):
    """The audit's data loss: the user's index.html beside a one-field metrics.json was replaced."""
    folder = work / "mine"
    folder.mkdir()
    (folder / "index.html").write_text("<p>my own page</p>")
    (folder / "metrics.json").write_text(json.dumps({"schema": "dipnet-deploy-metrics/1"}))
    before = snapshot(work)
    refused(invoke(*compare_args(work, folder)), str(folder), before, work)


def test_our_metrics_json_copied_beside_a_users_page_does_not_replace_it(work, invoke):
    report = work / "report"
    assert invoke(*compare_args(work, report))[0] == 0
    folder = work / "mine"
    folder.mkdir()
    shutil.copy(report / "metrics.json", folder / "metrics.json")  # a complete, sealed document of ours
    (folder / "index.html").write_text("<p>my own page</p>")
    before = snapshot(work)
    refused(invoke(*compare_args(work, folder)), "index.html", before, work)


def test_a_report_file_edited_by_the_user_is_not_replaced(work, invoke):
    report = work / "report"
    assert invoke(*compare_args(work, report))[0] == 0
    with open(report / "report.md", "a") as handle:
        handle.write("\nmy notes on this run\n")
    before = snapshot(work)
    refused(invoke(*compare_args(work, report)), "report.md", before, work)
    (report / "report.md").unlink()  # a deleted report file is simply made again
    assert invoke(*compare_args(work, report))[0] == 0
    recorded = json.loads((report / "metrics.json").read_text())["files"]
    assert recorded == {name: sha256_file(report / name) for name in REPORT_FILES[:-1]}


def test_diagnosis_chart_is_no_file_of_the_report(work, invoke, monkeypatch):
    """The diagnosis chart was written into the staging folder under a name outside REPORT_FILES."""
    made = []
    real = Path.write_bytes

    def watched(self, data):
        made.append(self.name)
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", watched)
    code, _, err = invoke(*compare_args(work, work / "report"), "--diagnose")
    assert code == 0, err
    assert set(made) <= set(REPORT_FILES) and "diagnosis.png" not in os.listdir(work / "report")
    assert "data:image/png;base64," in (work / "report" / "index.html").read_text().split("Diagnosis", 1)[1]


def _forged_card(work: Path) -> None:
    card = {"tool": "dipnet-deploy 0.1.0", "stage": "fp32-onnx", "onnx": str(work / "m.onnx"),
            "onnx_sha256": sha256_file(work / "m.onnx")}
    (work / "m.json").write_text(json.dumps(card, indent=2) + "\n")


def test_forged_card_does_not_make_a_model_ours(work, invoke):
    _forged_card(work)  # a card naming the user's ONNX by its sha256, but not sealed
    assert not written_by_us(work / "m.onnx") and not written_by_us(work / "m.json")
    before = snapshot(work)
    refused(invoke("export", "--checkpoint", work / "w.pth", "--height", "40", "--width", "40", "-o", work / "m.onnx"),
            "m.", before, work)


def test_our_own_outputs_are_still_replaced(work, invoke):
    assert written_by_us(work / "m.onnx") and written_by_us(work / "m.int8.onnx") and written_by_us(work / "m.ranges.json")
    code, _, err = invoke("quantize", "--model", work / "m.onnx", "--calib", work / "calib", "--no-equalize")
    assert code == 0, err


def test_checkpoint_with_the_four_keys_is_not_ours(work, invoke):
    """Any dict with params/iter/config/schedule used to count as a train checkpoint of ours."""
    out = work / "t.pth"
    torch.save({"params": {}, "iter": 0, "config": {}, "schedule": {}, "mine": "keep"}, out)
    assert not written_by_us(out)
    before = snapshot(work)
    refused(invoke("train", "--data", work / "hr", "--iters", "1", "--batch", "1", "--patch", "16", "--expansion", "8",
                   "--out", out), "t.pth", before, work)
    code, _, err = invoke("train", "--data", work / "hr", "--iters", "1", "--batch", "1", "--patch", "16",
                          "--expansion", "8", "--out", work / "ours.pth")
    assert code == 0, err
    assert written_by_us(work / "ours.pth")  # sealed: the next run may replace it
    data = torch.load(work / "ours.pth", weights_only=True)
    data["params"]["conv_1.weight"].add_(1e-3)  # the same file with other weights: no longer what we wrote
    torch.save(data, work / "edited.pth")
    assert not written_by_us(work / "edited.pth")


# --------------------------------------------------------------------------- full disk


def _run(args: list, limit_bytes: int | None = None, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a child process; ``limit_bytes`` caps the size of any file it writes (RLIMIT_FSIZE: the kernel
    fails the write with EFBIG, a full disk without privileges)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "dipnet_deploy", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit, env={**os.environ, **(env or {})}, **kwargs)


def _one_line_refusal(done: subprocess.CompletedProcess, words: str) -> None:
    lines = [line for line in done.stderr.strip().splitlines() if "%|" not in line and line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("dipnet-deploy: error: ") and words in lines[0], done.stderr


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".dipnet-report-")]


def _commands(work: Path, out: Path) -> dict[str, list]:
    return {
        "export": ["export", "--checkpoint", work / "w.pth", "--height", "40", "--width", "40", "-o", out / "e.onnx"],
        "quantize": ["quantize", "--model", work / "m.onnx", "--calib", work / "calib", "-o", out / "q.int8.onnx",
                     "--ranges", out / "q.ranges.json"],
        "compare": [*compare_args(work, out / "report")],
        "upscale": ["upscale", work / "hr", "--model", work / "m.int8.onnx", "-o", out / "up"],
        "upscale a video": ["upscale", _clip(work / "clip.mp4", 60), "--model", work / "m.int8.onnx", "-o", out / "up"],
    }


def _clip(path: Path, frames: int) -> Path:
    from dipnet_deploy.video import write_clip

    from .test_upscale import FPS, smooth_image

    if not path.exists():
        write_clip(path, [smooth_image(48, 64, seed) for seed in range(frames)], FPS)
    return path


@pytest.mark.parametrize("command", ["export", "quantize", "compare", "upscale", "upscale a video"])
def test_full_disk_is_one_line(command, work, tmp_path_factory):
    out, scratch = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("scratch")
    args = _commands(work, out)[command]
    before = snapshot(work)
    done = _run(args, limit_bytes=4096, env={"TMPDIR": str(scratch)})
    _one_line_refusal(done, "cannot write")
    assert snapshot(work) == before
    assert not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("command", ["export", "quantize", "compare", "upscale", "upscale a video"])
def test_full_tmpfs_is_one_line(command, work, tmp_path):
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    try:
        (out / "filler").write_bytes(b"\0" * (196 << 10))  # what is left (4 KiB) holds no output
        done = _run(_commands(work, out)[command])
        _one_line_refusal(done, "No space left on device")
        assert sorted(p.name for p in out.rglob("*")) == ["filler"]
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


# --------------------------------------------------------------------------- SIGTERM and SIGKILL


# the CLI, with calibration stalled while its scratch folder exists (as on a very large graph), so that a
# signal lands there every time
STALLED_CLI = """
import sys, time
import onnxruntime as ort
real = ort.InferenceSession
def stalled(*args, **kwargs):
    if len(args) > 1 and getattr(args[1], "optimized_model_filepath", ""):
        print("stalled", flush=True)
        time.sleep(300)
    return real(*args, **kwargs)
ort.InferenceSession = stalled
from dipnet_deploy.cli import run
sys.argv = ["dipnet-deploy", *sys.argv[1:]]
run()
"""


def _stalled_quantize(work: Path, tmp: Path, env: dict) -> subprocess.Popen:
    args = ["quantize", "--model", work / "m.onnx", "--calib", work / "calib", "-o", tmp / "out" / "s.int8.onnx"]
    process = subprocess.Popen([sys.executable, "-c", STALLED_CLI, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert process.stdout.readline().strip() == "stalled"
    return process


def _start(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dipnet_deploy", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def _wait_for(condition, within: float = 120.0) -> None:
    end = time.monotonic() + within
    while not condition():
        assert time.monotonic() < end, "the run never reached the point to signal"
        time.sleep(0.05)


def test_sigterm_cleans_up_like_ctrl_c(work, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = _stalled_quantize(work, tmp_path, {"TMPDIR": str(scratch)})
    assert any(scratch.glob("dipnet-calib-*"))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "dipnet-deploy: terminated"
    assert not list(scratch.glob("dipnet-*"))  # the scratch folder went with it
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_sigterm_during_a_video_leaves_no_temporary(tmp_path, work):
    clip = _clip(tmp_path / "clip.mp4", 400)
    out = tmp_path / "up"
    process = _start(["upscale", clip, "--model", work / "m.int8.onnx", "-o", out], {})
    _wait_for(lambda: out.exists() and any(p.name.endswith(".tmp") for p in out.iterdir()))
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert not out.exists() or not list(out.iterdir())


def test_next_run_removes_what_a_killed_run_left_and_only_that(work, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    process = _stalled_quantize(work, tmp_path, env)
    process.kill()  # SIGKILL: no clean-up runs
    process.communicate(timeout=60)
    left = list(scratch.glob("dipnet-calib-*"))
    assert left
    decoy = scratch / "dipnet-calib-decoy"  # our name, not our folder: never removed
    decoy.mkdir()
    (decoy / "optimized.onnx").write_text("the user's")
    user_temp = work / ".m.onnx.abc123.tmp"
    user_temp.write_text("the user's, named like a temporary of ours")
    done = _run(["info", work / "m.onnx"], env=env)
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in left)
    assert decoy.exists() and user_temp.exists()


def test_a_live_runs_temporaries_are_never_swept(tmp_path):
    """A concurrent run (alive) keeps its files; a record whose process is gone is settled."""
    state = Path(os.environ["DIPNET_STATE_DIR"])
    live = tmp_path / ".out.live.tmp"
    child = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from dipnet_deploy import "
                            "leftovers; p = Path(sys.argv[1]); p.write_text('x'); leftovers.record(p)",
                            str(tmp_path / ".out.dead.tmp")], env=os.environ)
    assert child.returncode == 0
    live.write_text("being written")
    leftovers.record(live)  # this process: alive
    try:
        leftovers.sweep()
        assert live.exists() and not (tmp_path / ".out.dead.tmp").exists()
        assert len([p for p in state.iterdir() if p.name.startswith(f"{os.getpid()}-")]) >= 1
    finally:
        leftovers.forget(live)


# --------------------------------------------------------------------------- SIGHUP, SIGQUIT, a long forward


# every Python process started with this on its path (pool workers too) leaves a file named by its pid in
# $DIPNET_TEST_MARKS as it starts a forward: the moment to send a signal
FORWARD_MARK = """
import os
import onnxruntime
real = onnxruntime.InferenceSession.run
def run(self, *args, **kwargs):
    open(os.path.join(os.environ["DIPNET_TEST_MARKS"], str(os.getpid())), "w").close()
    return real(self, *args, **kwargs)
onnxruntime.InferenceSession.run = run
"""


def _marking_forwards(tmp_path: Path) -> tuple[dict, Path]:
    """The environment under which every process marks its forwards (``FORWARD_MARK``), and the marks' folder."""
    site, marks = tmp_path / "site", tmp_path / "marks"
    site.mkdir()
    marks.mkdir()
    (site / "sitecustomize.py").write_text(FORWARD_MARK)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "DIPNET_TEST_MARKS": str(marks)}, marks


def _slow_model(path: Path, side: int = 1024, width: int = 32, depth: int = 100) -> Path:
    """A valid x2 model whose forward takes some 20 s on one thread (``depth`` 3x3 Convs of ``width`` channels
    at ``side`` x ``side``), in a 4 MB file; onnxruntime can stop between its nodes."""
    from onnx import helper, numpy_helper

    def weight(name: str, shape: list[int]):  # keeps the values near 1 through the chain
        return numpy_helper.from_array(np.full(shape, 1 / (9 * shape[1]), np.float32), name)

    nodes, weights, previous = [], [], "input"
    for i, (cin, cout) in enumerate([(3, width)] + [(width, width)] * (depth - 2) + [(width, 12)]):
        name = "pre" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [name], pads=[1, 1, 1, 1]))
        weights.append(weight(f"w{i}", [cout, cin, 3, 3]))
        previous = name
    return _graph(path, side, nodes, weights)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM], ids=lambda s: s.name)
def test_a_terminating_signal_during_a_long_forward_ends_the_run_at_once(signum, work, tmp_path):
    """Python runs a signal handler between bytecodes only; the forward runs beside the waiting main thread,
    which stops it (onnxruntime's RunOptions.terminate) instead of waiting for it to end. SIGUSR1 and SIGALRM,
    whose default also ends a process, clean up as SIGTERM does (the audit found them leaving the temporary)."""
    env, marks = _marking_forwards(tmp_path)
    model = _slow_model(tmp_path / "slow.onnx")
    out = tmp_path / "up"
    process = _start(["upscale", work / "hr" / "img0.png", "--model", model, "-o", out, "--threads", "1"], env)
    _wait_for(lambda: any(marks.iterdir()))
    time.sleep(0.5)
    sent = time.monotonic()
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum and "Traceback" not in err, err
    assert time.monotonic() - sent < 8, "the run waited for the forward to end"
    assert not out.exists()


SIGNAL_IN_THREAD_START = """
import sys, threading, time
from pathlib import Path
from dipnet_deploy.runtime import interruptible

start = threading.Thread.start
def start_then_signal(thread):  # the signal's exception, raised while start() waits for the new thread
    start(thread)
    raise KeyboardInterrupt
threading.Thread.start = start_then_signal

def forward():
    time.sleep(0.5)  # stands for a runtime's forward: the thread is out of Python while it runs
    Path(sys.argv[1]).write_text("the forward ended")
try:
    interruptible(forward, lambda: print("stopped", flush=True))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_signal_while_the_forward_thread_starts_still_stops_and_waits_for_it(tmp_path):
    """CI caught a SIGTERM that came while Thread.start() waited for the forward's thread: the forward was
    neither stopped nor waited for, and Python exited under it (the thread taking the GIL back through
    onnxruntime's C++ frames aborted the process, exit -6, one run in 15)."""
    mark = tmp_path / "ended"
    done = subprocess.run([sys.executable, "-c", SIGNAL_IN_THREAD_START, str(mark)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 130 and done.stdout.split() == ["stopped"], done.stderr
    assert mark.read_text() == "the forward ended"  # the process did not end while the forward ran


@pytest.mark.parametrize("signum, to_job", [(signal.SIGHUP, False), (signal.SIGQUIT, True)],
                         ids=["SIGHUP to the parent", "SIGQUIT to the job"])
def test_sighup_and_sigquit_stop_compare_and_its_workers_cleanly(signum, to_job, work, tmp_path):
    """SIGHUP to the parent (as the audit sent it), SIGQUIT to every process of the job (as Ctrl-\\ sends it):
    the parent cleans up and exits 128 + the signal, its pool workers go, and nothing prints a traceback."""
    env, marks = _marking_forwards(tmp_path)
    report = tmp_path / "report"
    process = subprocess.Popen(
        [sys.executable, "-m", "dipnet_deploy", "compare", report, "--fp32", _slow_model(tmp_path / "slow.onnx"),
         "--data", work / "hr", "--workers", "2", "--repeats", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **env}, start_new_session=True)
    _wait_for(lambda: len(list(marks.iterdir())) >= 2)  # both workers are inside a forward
    workers = [int(mark.name) for mark in marks.iterdir()]
    (os.killpg if to_job else os.kill)(process.pid, signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(f"terminated ({signum.name})"), err
    _wait_for(lambda: not any(map(_alive, workers)), within=10)
    assert not report.exists()


@pytest.mark.parametrize("command, signum", [("compare", signal.SIGHUP), ("upscale", signal.SIGTERM)],
                         ids=["compare SIGHUP", "upscale SIGTERM"])
def test_a_terminating_signal_to_a_ray_run_ends_it_and_its_ray_cleanly(command, signum, work, tmp_path):
    """SIGHUP or SIGTERM to the parent of a --ray run once the work is under way: one line, 128 + the signal, no
    output, and the local Ray it started gone. The audit found SIGTERM ending it with exit 1 after a C++ stack of
    several lines (ray.init replaces the driver's handlers), and SIGHUP with 130 "interrupted" (Ray's wait turns
    the handler's exception into a KeyboardInterrupt of its own)."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'dipnet-deploy[ray]'")
    from .test_cluster import _processes_mentioning  # (that module needs Ray to import)

    write_images(work / "many", 40, (160, 200))
    out = tmp_path / "out"
    args = {"compare": compare_args(work, out, work / "many"),
            "upscale": ["upscale", work / "many", "--model", work / "m.onnx", "-o", out]}[command]
    process = subprocess.Popen([sys.executable, "-m", "dipnet_deploy", *map(str, args), "--ray"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, env=os.environ)
    seen, deadline = b"", time.monotonic() + 120
    while f"{command}:".encode() not in seen and time.monotonic() < deadline:  # the bar appears once Ray is up
        if select.select([process.stderr], [], [], 1.0)[0]:
            seen += os.read(process.stderr.fileno(), 4096)
    assert f"{command}:".encode() in seen, seen
    os.kill(process.pid, signum)
    _, rest = process.communicate(timeout=60)
    err = (seen + rest).decode(errors="replace")
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    name = "" if signum == signal.SIGTERM else f" ({signum.name})"
    assert process.returncode == 128 + signum and lines == [f"dipnet-deploy: terminated{name}"], err
    assert not out.exists()
    _wait_for(lambda: not _processes_mentioning(f"_{process.pid} "), within=15)  # Ray's, named by the driver's pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_compare_ends_its_workers_at_once_and_silently(work, tmp_path):
    """kill -9 of a `compare --workers 2` while both workers are inside a forward: no clean-up of the parent runs,
    yet the workers end with it (PR_SET_PDEATHSIG), at once and without a word; they would otherwise finish their
    forward of some 20 s and fail to hand the result back, with a BrokenPipeError traceback."""
    env, marks = _marking_forwards(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "dipnet_deploy", "compare", tmp_path / "report", "--fp32", _slow_model(tmp_path / "slow.onnx"),
         "--data", work / "hr", "--workers", "2", "--repeats", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **env}, start_new_session=True)
    try:
        _wait_for(lambda: len(list(marks.iterdir())) >= 2)  # both workers are inside a forward
        workers = [int(mark.name) for mark in marks.iterdir()]
        assert process.pid not in workers
        process.kill()
        began = time.monotonic()
        _, err = process.communicate(timeout=120)  # the workers share its stderr: read to its end, when they are gone
        assert process.returncode == -signal.SIGKILL
        assert time.monotonic() - began < 10, "the workers finished their forward"
        assert "Traceback" not in err and "Error" not in err, err
        _wait_for(lambda: not any(map(_alive, workers)), within=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever a failure left of the job


# --------------------------------------------------------------------------- folders a failed run made


def test_only_the_empty_folders_a_run_made_are_removed(tmp_path):
    """At the end of the block, failed or not: a folder that was there before stays, and so does a folder the
    block made that now holds a file."""
    before = tmp_path / "before"
    before.mkdir()
    with pytest.raises(KeyboardInterrupt), removing_empty_folders():
        make_folders(before / "made" / "deeper")
        make_folders(tmp_path / "holds")
        (tmp_path / "holds" / "user.txt").write_text("mine")
        make_folders(before)  # there already: not ours
        raise KeyboardInterrupt
    assert before.is_dir() and not list(before.iterdir())
    assert (tmp_path / "holds" / "user.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_failed_train_or_finetune_leaves_no_folder_it_made(command, work, invoke, monkeypatch):
    """--resume is read after --out's folder is made: a bad one ends the run there."""
    kept = work / "kept"
    kept.mkdir()
    out = kept / "new" / "deeper" / "last.pth"
    (work / "bad.pth").write_text("not a checkpoint")
    made = []
    real = fileio.make_folders
    monkeypatch.setattr(fileio, "make_folders", lambda folder: made.append(Path(folder)) or real(folder))
    args = ["--data", work / "hr", "--out", out, "--resume", work / "bad.pth"]
    args = ["train", *args] if command == "train" else ["finetune", "--checkpoint", work / "w.pth", *args, "--no-compile"]
    code, _, err = invoke(*args)
    assert code == 2 and "bad.pth" in err and "Traceback" not in err, err
    assert out.parent in made  # the folders were made, then removed
    assert kept.is_dir() and not list(kept.iterdir())


def test_sigterm_during_train_removes_the_folders_it_made(work, tmp_path):
    out = tmp_path / "runs" / "x2" / "last.pth"
    process = _start(["train", "--data", work / "hr", "--out", out, "--iters", "100000", "--save-every", "100000",
                      "--val-every", "100000", "--batch", "1", "--patch", "32", "--threads", "1"], {})
    _wait_for(lambda: out.parent.exists())
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- names that are not UTF-8


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_report_on_an_image_whose_name_is_not_utf8(work, invoke):
    source = work / "hr" / "img0.png"
    odd = os.path.join(os.fsencode(work / "hr"), b"caf\xe9-\xff.png")
    os.rename(source, odd)
    code, out, err = invoke(*compare_args(work, work / "report"), "--json")
    assert code == 0, err
    assert "Traceback" not in err
    json.loads(out.strip().splitlines()[-1])
    page = (work / "report" / "index.html").read_text(encoding="utf-8")
    assert "caf\ufffd-\ufffd.png" in page


# --------------------------------------------------------------------------- paths no file can have


def test_a_loop_of_links_and_an_overlong_name_are_one_line(work, invoke, tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    before = snapshot(work)
    for output in (tmp_path / "loop1", tmp_path / ("a" * 300 + ".onnx")):
        code, _, err = invoke("export", "--checkpoint", work / "w.pth", "--height", "40", "--width", "40", "-o", output)
        lines = [line for line in err.strip().splitlines() if line.startswith("dipnet-deploy:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert len(lines[0]) < 2100  # a crafted name is cut, never echoed whole
    code, _, err = invoke("upscale", work / "hr", "--model", work / "m.int8.onnx", "-o", tmp_path / "loop1" / "up")
    assert code == 2 and "Traceback" not in err and "symbolic links" in err, err
    assert snapshot(work) == before


def test_collisions_look_each_path_up_once(monkeypatch, tmp_path):
    """upscale plans thousands of outputs against thousands of inputs: pairwise checks were quadratic."""
    from dipnet_deploy import safety

    inputs = [("an input", tmp_path / f"in{i}.png") for i in range(500)]
    for _, path in inputs[:250]:
        path.write_bytes(b"x")
    outputs = [("an output", tmp_path / "out" / f"in{i}.png") for i in range(500)]
    calls = []
    real = safety.os.stat
    monkeypatch.setattr(safety.os, "stat", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    safety.refuse_collisions(outputs, inputs)
    assert len(calls) < 5 * (len(inputs) + len(outputs))  # linear (pairwise: 250,000 and more)
    with pytest.raises(Exception, match="same file as an input"):
        safety.refuse_collisions([("an output", tmp_path / "." / "in3.png")], inputs)


# --------------------------------------------------------------------------- graphs that cost more than they weigh


def _graph(path: Path, side: int, nodes: list, initializers: list) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes + [helper.make_node("DepthToSpace", ["pre"], ["output"], blocksize=2)], "crafted",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2 * side, 2 * side])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _weight(name: str, shape: list[int]):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.full(shape, 0.01, np.float32), name)


@pytest.mark.parametrize("case, words", [
    ("pool_window", "work"), ("group", "group"), ("output_size", "image size limit")])
def test_small_graphs_asking_for_unbounded_work_or_memory_are_refused(case, words, work, invoke, tmp_path):
    """A few KB of ONNX declaring a 1001x1001 MaxPool window, a Conv group its input cannot have, or a 12,000 px
    output: refused from the declarations, before any session runs."""
    from onnx import helper

    conv = helper.make_node("Conv", ["pooled" if case == "pool_window" else "input", "w"], ["pre"],
                            pads=[1, 1, 1, 1], group=3 if case == "group" else 1)
    side = 6000 if case == "output_size" else 64
    nodes = [conv]
    if case == "pool_window":
        nodes.insert(0, helper.make_node("MaxPool", ["input"], ["pooled"], kernel_shape=[1001, 1001],
                                         pads=[500, 500, 500, 500]))
    path = _graph(tmp_path / f"{case}.onnx", side, nodes, [_weight("w", [12, 3, 3, 3])])
    for command in (["upscale", work / "hr", "--model", path, "-o", tmp_path / "up"],
                    ["quantize", "--model", path, "--calib", work / "calib", "-o", tmp_path / "q.int8.onnx"]):
        code, _, err = invoke(*command)
        lines = [line for line in err.strip().splitlines() if line.startswith("dipnet-deploy:")]
        assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "up").exists() and not (tmp_path / "q.int8.onnx").exists()
