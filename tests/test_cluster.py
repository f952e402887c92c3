"""--ray: a local Ray with 2 CPUs gives the same bytes and metrics as a local run; a worker that cannot see an
input, a worker that dies, a missing Ray and Ctrl-C each behave as promised (cluster.py)."""

# ruff: noqa: F811  (the shared fixtures imported from test_safety are, by pytest's design, test parameters too)
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dipnet_deploy.cluster import RayOptions, ray_map, refuse_unreachable
from dipnet_deploy.errors import InputError

from .conftest import sigint_default, snapshot, write_images
from .test_upscale import make_video

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'dipnet-deploy[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs, as on a small node); commands find it initialised and use it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


def test_upscale_on_ray_is_byte_identical_to_a_local_run(local_ray, work, invoke):
    data = work / "media"
    write_images(data / "sub", 2, (44, 60), seed=3)
    write_images(data, 1, (70, 50), seed=4)
    make_video(data / "clip.mp4", frames=3, size=(40, 56))
    code, out, err = invoke("upscale", data, "--model", work / "m.onnx", "-o", work / "local", "--json")
    assert code == 0, err
    code, out, err = invoke("upscale", data, "--model", work / "m.onnx", "-o", work / "ray", "--ray", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["execution"], summary["workers"], summary["images"], summary["videos"], summary["frames"]) == \
           ("ray", 2, 3, 1, 6)
    local, remote = snapshot(work / "local"), snapshot(work / "ray")
    assert sorted(local) == ["clip.mp4", "img0.png", "sub/img0.png", "sub/img1.png"]
    assert remote == local  # the same bytes, video included, and no temporary file left


def test_compare_on_ray_gives_the_local_metrics(local_ray, work, invoke):
    write_images(work / "hr", 3, (36, 52), seed=5)  # replaces the two there, adds a third: 3 for 2 workers
    args = ["compare", "--fp32", work / "m.onnx", "--int8", work / "m.int8.onnx", "--data", work / "hr",
            "--repeats", "1"]
    assert invoke(*args[:1], work / "local", *args[1:])[0] == 0
    code, out, err = invoke(*args[:1], work / "ray", *args[1:], "--ray", "--ray-workers", "2", "--json")
    assert code == 0, err
    local, remote = (json.loads((work / name / "metrics.json").read_text()) for name in ("local", "ray"))
    assert remote["images"] == local["images"] and remote["mean"] == local["mean"] and local["count"] == 3
    assert remote["execution"] == {"backend": "ray", "workers": 2, "cpus_per_worker": 1, "nodes": 1, "address": "local"}
    assert "Ray cluster (2 workers on 1 node(s)); latency is measured on the machine that ran compare" in \
           (work / "ray" / "report.md").read_text()


def _echo(_state, item):
    return item


def test_an_input_a_worker_cannot_see_fails_the_run_naming_it(local_ray, tmp_path):
    """What a worker node without the shared filesystem meets: the path the driver listed is not there."""
    elsewhere = tmp_path / "only-on-the-driver.png"
    with pytest.raises(InputError) as raised:
        with ray_map(lambda: None, (), _echo, [1, 2], lambda item: [elsewhere], RayOptions()) as (_, outcomes):
            list(outcomes)
    assert raised.value.where == str(elsewhere)
    assert "cannot see this input" in raised.value.problem and "same path" in raised.value.problem


def test_a_worker_that_dies_is_retried_without_losing_or_duplicating(local_ray, tmp_path):
    marker = tmp_path / "died-once"

    def dies_once_on_item_3(_state, item):  # a local function: Ray ships it by value
        if item == 3 and not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process dies mid-task, as on a lost node or an OOM kill
        return item * 10

    with ray_map(lambda: None, (), dies_once_on_item_3, list(range(6)), lambda item: [], RayOptions()) as (count, out):
        values = sorted(outcome.value for outcome in out)
    assert marker.exists() and count == 2
    assert values == [0, 10, 20, 30, 40, 50]


def test_a_failing_input_is_skipped_by_name_and_the_run_goes_on(local_ray, work, invoke):
    (work / "hr" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = invoke("compare", work / "rep", "--fp32", work / "m.onnx", "--data", work / "hr", "--repeats",
                            "1", "--ray", "--json")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning: skipped") and "broken.png" in line]
    assert json.loads(out.strip().splitlines()[-1])["images"] == 2


def test_without_ray_installed_the_refusal_is_one_line(work, invoke, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    before = snapshot(work)
    code, _, err = invoke("upscale", work / "hr", "--model", work / "m.onnx", "-o", work / "out", "--ray")
    assert code == 2 and err.strip().splitlines() == ["dipnet-deploy: error: --ray: needs Ray: pip install "
                                                      "'dipnet-deploy[ray]'"]
    assert snapshot(work) == before and not (work / "out").exists()


@pytest.mark.parametrize("option, value, words", [("--ray-workers", "5", "room for 2"),
                                                   ("--ray-cpus-per-worker", "3", "largest: 2")])
def test_workers_the_cluster_cannot_place_are_refused(option, value, words, local_ray, work, invoke):
    """An actor Ray cannot place waits forever: refused before any work instead of hanging."""
    before = snapshot(work)
    code, _, err = invoke("upscale", work / "hr", "--model", work / "m.onnx", "-o", work / "out", "--ray", option, value)
    assert code == 2 and err.strip().splitlines() == [line for line in err.splitlines() if option in line and words in line]
    assert snapshot(work) == before and not (work / "out").exists()


def test_an_address_nothing_answers_on_is_refused_at_once():
    """Ray itself retries an unreachable head for minutes; the refusal takes one connection attempt."""
    began = time.perf_counter()
    with pytest.raises(InputError) as raised:
        refuse_unreachable("127.0.0.1:1", "--ray-address")
    assert time.perf_counter() - began < 5
    assert raised.value.where == "--ray-address" and "nothing answers at 127.0.0.1:1" in raised.value.problem
    for resolved_by_ray in ("auto", "ray://head:10001"):
        refuse_unreachable(resolved_by_ray, "--ray-address")


def test_ray_options_need_ray(work, invoke):
    code, _, err = invoke("upscale", work / "hr", "--model", work / "m.onnx", "-o", work / "out", "--ray-workers", "2")
    assert code == 2 and "need --ray" in err
    code, _, err = invoke("compare", work / "r", "--fp32", work / "m.onnx", "--data", work / "hr", "--ray",
                          "--workers", "2")
    assert code == 2 and "--ray-workers" in err


def test_ctrl_c_stops_the_cluster_work(work):
    """SIGINT to the command's process group once the work is under way: one line, exit 130, no report, and
    the Ray it started is gone."""
    write_images(work / "many", 40, (160, 200))
    command = [sys.executable, "-m", "dipnet_deploy", "compare", str(work / "report"), "--fp32", str(work / "m.onnx"),
               "--int8", str(work / "m.int8.onnx"), "--data", str(work / "many"), "--repeats", "1", "--ray"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                               preexec_fn=sigint_default)
    seen = b""
    deadline = time.perf_counter() + 90
    while b"compare:" not in seen and time.perf_counter() < deadline:  # the bar appears once Ray is up
        if select.select([process.stderr], [], [], 1.0)[0]:
            seen += os.read(process.stderr.fileno(), 4096)
    assert b"compare:" in seen, seen
    os.killpg(process.pid, signal.SIGINT)
    began = time.perf_counter()
    _, rest = process.communicate(timeout=60)
    err = (seen + rest).decode()
    assert process.returncode == 130, err
    assert time.perf_counter() - began < 20
    assert err.strip().splitlines()[-1] == "dipnet-deploy: interrupted" and "Traceback" not in err
    assert not (work / "report").exists()
    time.sleep(2)
    assert _processes_mentioning(f"_{process.pid} ") == []  # Ray's processes of that session (named by the driver's pid)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if "session_" in line and text in line + " ":
            found.append(line[:120])
    return found
