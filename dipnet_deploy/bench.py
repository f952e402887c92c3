"""How fast a fp32/int8 model pair runs on this machine, per runtime.

Conventions: every time is seconds per 1080p-equivalent frame (one forward of the model's own fixed
input, scaled by 1920x1080 / (H x W)), the median of ``repeats`` forwards of a random image after
one warm-up, with all models of all runtimes interleaved in one loop so that the load of a shared
host hits them alike; ratios are therefore fair, absolute times are this moment's. Every session
writes its output into one buffer of its own (``runtime.reusing_output``), as a loop over video
frames would: no runtime pays for a fresh 4K output per frame. Throughput runs ``streams`` sessions
at once (each with cores / streams threads, one Python thread each: both runtimes release the GIL
during a forward), ``repeats`` forwards per stream, and counts 1080p-equivalent frames per second of
wall clock. The reference for the cross-runtime ratio is the first runtime's fp32.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dipnet_deploy.compare import check_pair, inspect_model
from dipnet_deploy.errors import InputError
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.runtime import (
    FULL_HD_PIXELS,
    check_parallelism,
    check_runtime,
    cpu_name,
    int8_sums_saturate,
    open_session,
    reusing_output,
    time_interleaved,
)


@dataclass
class BenchOptions:
    """Settings of ``bench``: runtimes (``runtime.RUNTIMES``, measured side by side; ratios are to the first
    one's fp32), repeats (timed forwards per model, median), threads and streams (below)."""

    runtimes: tuple[str, ...] = ("onnxruntime",)
    repeats: int = 5
    threads: int | None = None  # per forward for the latency; None: all cores
    streams: int | None = None  # parallel streams for the throughput; None: one per core, 0: skip


def stream_throughput(model_path: Path, runtime: str, streams: int, frames: int, shape: list[int]) -> float:
    """Forwards per second of ``streams`` concurrent sessions, each running ``frames`` forwards."""
    threads = max(1, (os.cpu_count() or 1) // streams)
    forwards = [reusing_output(open_session(model_path, runtime, threads)) for _ in range(streams)]
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    for forward in forwards:
        forward(x)
    workers = [threading.Thread(target=lambda f=forward: [f(x) for _ in range(frames)]) for forward in forwards]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return streams * frames / (time.perf_counter() - began)


def bench(fp32_path: Path, int8_path: Path, options: BenchOptions = BenchOptions(),
          progress: Progress = no_progress) -> dict:
    """Latency, int8 speed-up and throughput of the pair for each runtime; the summary dict.

    ``progress`` wraps each loop: loading the sessions, the latency rounds, the throughput runs.
    Keys: ``runtime`` (the first), ``fp32_s``, ``int8_s``, ``speedup`` of the first runtime, and
    ``runtimes.NAME`` with the same keys plus ``int8_vs_reference_fp32`` and, unless ``streams`` is
    0, ``fp32_fps`` / ``int8_fps``.
    """
    if not options.runtimes:
        raise InputError("--runtime", "no runtime given")
    for runtime in options.runtimes:
        check_runtime(runtime)
    fp32 = inspect_model(Path(fp32_path), "fp32")
    int8 = inspect_model(Path(int8_path), "int8")
    check_pair(fp32, int8)
    shape = fp32.input_shape
    check_parallelism(options.threads, "--threads")
    check_parallelism(options.streams, "--streams", shape)
    per_frame = FULL_HD_PIXELS / (shape[2] * shape[3])
    models = {"fp32": fp32.path, "int8": int8.path}
    keys = [(runtime, name) for runtime in options.runtimes for name in models]
    forwards = {key: reusing_output(open_session(models[key[1]], key[0], options.threads))
                for key in progress(keys, "load sessions", len(keys))}
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    times = time_interleaved(forwards, x, options.repeats, progress)
    forwards.clear()  # free the sessions before the throughput runs make their own
    medians = {key: float(np.median(t)) * per_frame for key, t in times.items()}
    reference = medians[(options.runtimes[0], "fp32")]
    streams = (os.cpu_count() or 1) if options.streams is None else options.streams
    measured = keys if streams else []
    fps = {key: stream_throughput(models[key[1]], key[0], streams, options.repeats, shape) / per_frame
           for key in progress(measured, f"throughput ({streams} stream(s) per model)", len(measured))}
    results = {}
    for runtime in options.runtimes:
        results[runtime] = {"fp32_s": round(medians[(runtime, "fp32")], 4), "int8_s": round(medians[(runtime, "int8")], 4),
                            "speedup": round(medians[(runtime, "fp32")] / medians[(runtime, "int8")], 3),
                            "int8_vs_reference_fp32": round(medians[(runtime, "int8")] / reference, 4)}
        results[runtime] |= {f"{name}_fps": round(fps[(runtime, name)], 3) for name in models if (runtime, name) in fps}
    first = options.runtimes[0]
    return {"runtime": first, **{k: results[first][k] for k in ("fp32_s", "int8_s", "speedup")},
            "reference": f"{first} fp32", "input_shape": shape, "repeats": options.repeats,
            "threads": options.threads or os.cpu_count(), "streams": streams, "cores": os.cpu_count(),
            "cpu": cpu_name(), "int8_exact_slow_path": int8_sums_saturate(), "runtimes": results}
