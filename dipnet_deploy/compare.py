"""Stage 5: fp32 (and int8) ONNX + HR images -> metrics, through onnxruntime (or OpenVINO: ``runtime.py``).

Protocols:
- ``sr`` (BasicSR convention): HR cropped to a multiple of the scale, LR = uint8 MATLAB
  bicubic, model run on the LR by tiles (``tiling.py``), output rounded to uint8; PSNR/SSIM on Y
  and RGB with crop_border = scale; MATLAB bicubic upscaling of the LR as the baseline.
- ``seed`` (the vendor's): the same LR resized with cv2 bilinear to the model's fixed input,
  output compared with HR resized with cv2 bilinear to the output size, full RGB, no crop,
  outputs clipped x255 as floats; cv2 bicubic of the LR to the output size as the baseline.

Memory: an HR image is held as uint8 with its LR and one uint8 output per model and bicubic; the
resizes, metrics and the report's figures work on bands and blocks (``matlab_resize``, ``metrics``,
``error_maps``). An image whose header says it would take more than ``DIPNET_MAX_MEMORY_MB``
(``compare_bytes``; with ``workers`` processes, 1/workers of it each) is skipped before decoding.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dipnet_deploy.artifacts import default_int8_path
from dipnet_deploy.budget_report import budget_entry
from dipnet_deploy.cluster import RayOptions, import_ray
from dipnet_deploy.error_maps import figure_bytes
from dipnet_deploy.errors import InputError, RunEndingError
from dipnet_deploy.fileio import sha256_file
from dipnet_deploy.imageio import (
    ImageHeader,
    check_memory,
    decode_bytes,
    list_images,
    max_memory_bytes,
    read_rgb8,
    vendor_preprocess,
)
from dipnet_deploy.matlab_resize import BAND_BYTES, imresize
from dipnet_deploy.memory_budget import share_budget
from dipnet_deploy.metrics import METRIC_WORK_BYTES, max_abs_difference, psnr, ssim
from dipnet_deploy.onnx_model import is_quantized, load_onnx, sr_model_shape
from dipnet_deploy.pool_signals import JOB_SIGNALS, end_with_parent, job_signals_blocked
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.runtime import FULL_HD_PIXELS, check_parallelism, check_runtime, reusing_output, time_interleaved
from dipnet_deploy.safety import our_json
from dipnet_deploy.sr_protocol import make_pair, score, unscorable
from dipnet_deploy.tiling import TiledRunner

METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb")
PROTOCOLS = ("sr", "seed")


@dataclass
class CompareOptions:
    """Settings of ``compare``.

    protocol: "sr" (BasicSR: MATLAB bicubic LR, Y and RGB, crop = scale, tiles) or "seed" (the vendor's
        bilinear resize to the model input, RGB, no crop); see the module docstring.
    limit: at most this many HR images (sorted by path); None: all.
    workers: local processes scoring images, each with cores / workers threads.
    latency_repeats: timed forwards per model; the latency is their median, per 1080p-equivalent frame.
    """

    protocol: str = "sr"
    limit: int | None = None
    workers: int = 1
    latency_repeats: int = 5
    runtime: str = "onnxruntime"  # one of runtime.RUNTIMES: what runs both models
    diagnose: bool = False  # per quantized activation: SQNR and the PSNR-Y regained in float (diagnose.py)
    ray: RayOptions | None = None  # score the images on a Ray cluster (cluster.py) instead of local processes


@dataclass
class ModelInfo:
    path: Path
    input_shape: list[int]
    scale: int
    sha256: str
    quantized: bool = False  # holds integer ops (info.is_quantized)
    budgeted: bool = False  # written by `quantize --max-drop` (its card says so): may hold no integer op at all


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    protocol: str = "sr"
    receptive_field: dict = field(default_factory=dict)
    int8_origin: dict | None = None  # from the int8 model card: its method and the fp32 ONNX it was made from
    diagnosis: list[dict] | None = None  # diagnose.diagnose: one entry per quantized activation
    mean: dict = field(default_factory=dict)  # metric -> model -> mean over the rows
    worst: dict = field(default_factory=dict)  # the row of the image int8 hurts most (without int8: gains least)
    worst_images: dict[str, np.ndarray] = field(default_factory=dict)  # that image: hr, bicubic, fp32, int8 (RGB)
    execution: dict = field(default_factory=dict)  # what scored the images: local, processes or a Ray cluster


def inspect_model(path: Path, role: str) -> ModelInfo:
    """A fixed-shape SR model given as ``role`` ("fp32" or "int8"), or a refusal."""
    model = load_onnx(path)
    shape, scale = sr_model_shape(model, path, f"--{role}")
    return ModelInfo(path, shape, scale, sha256_file(path), is_quantized(model), _budgeted(path))


def _budgeted(path: Path) -> bool:
    """Whether our card beside ``path`` records a quality budget's search (``budget_report.budget_entry``)."""
    card = our_json(path.with_suffix(".json"))
    return card is not None and budget_entry(card) is not None


def int8_origin(int8: ModelInfo, fp32: ModelInfo) -> dict | None:
    """What ``quantize`` recorded in the int8 model's card: its method, whether it was made from this fp32
    model or from other (fine-tuned) weights, and a budget's tensors out of int8 (``mixed_precision``). None
    without a readable card."""
    card = our_json(int8.path.with_suffix(".json"))  # sealed by us, bounded: never a forged or huge file
    try:
        method, source_sha256 = str(card["method"]), str(card["fp32_sha256"])
    except (KeyError, TypeError):
        return None
    budget = budget_entry(card)
    return {"method": method, "fp32_onnx": str(card.get("fp32_onnx")),
            "from_this_fp32": source_sha256 == fp32.sha256, "finetuned": method == "learned",
            **({"mixed_precision": budget} if budget else {})}


def check_pair(fp32: ModelInfo, int8: ModelInfo | None) -> None:
    """Refuse an int8 model that does not match the fp32 one, then a model in the wrong role.

    The fp32 model must hold no QuantizeLinear/DequantizeLinear/QLinear* nodes and the int8 one must.
    """
    if int8 is not None and (int8.scale != fp32.scale or int8.input_shape != fp32.input_shape):
        raise InputError(int8.path, f"does not match the fp32 model: x{int8.scale} {int8.input_shape} vs "
                                    f"x{fp32.scale} {fp32.input_shape}")
    if fp32.quantized:
        raise InputError(fp32.path, "--fp32: is quantized (it has QuantizeLinear/DequantizeLinear or QLinear* nodes); "
                                    "give the fp32 model here")
    if int8 is not None and not int8.quantized and not int8.budgeted:  # a budget may take every tensor out of int8
        raise InputError(int8.path, "--int8: is not quantized (no QuantizeLinear/DequantizeLinear or QLinear* nodes); "
                                    "give the int8 model here")


# --------------------------------------------------------------------------- one image


def _float_rgb(output: np.ndarray) -> np.ndarray:
    """The seed's float output: clip(x * 255) without rounding, HxWx3."""
    return np.clip(output[0] * 255.0, 0, 255).transpose(1, 2, 0)


def evaluate_image(hr_rgb: np.ndarray, runners: dict[str, TiledRunner], protocol: str, scale: int) -> dict:
    """Metrics of one HR image for each model (and bicubic); also returns the images made."""
    if protocol == "sr":
        hr, lr = make_pair(hr_rgb, scale)
        outputs, tiles = {}, 0
        for name, runner in runners.items():
            outputs[name], tiles = runner.run_rgb8(lr)  # uint8, tile by tile: no float copy of the image
        outputs["bicubic"] = imresize(lr, scale)
        metrics = {name: score(image, hr, scale) for name, image in outputs.items()}
    else:
        _, lr = make_pair(hr_rgb, scale)
        any_runner = next(iter(runners.values()))
        height, width = any_runner.tile_h, any_runner.tile_w
        model_input = vendor_preprocess(lr, height, width)
        hr = cv2.resize(hr_rgb, (width * scale, height * scale), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        outputs = {name: _float_rgb(runner.forward(model_input)) for name, runner in runners.items()}
        outputs["bicubic"] = np.clip(cv2.resize(lr.astype(np.float32), (width * scale, height * scale),
                                                interpolation=cv2.INTER_CUBIC), 0, 255)
        metrics = {name: {"psnr_y": psnr(image, hr, 0, True), "ssim_y": ssim(image, hr, 0, True),
                          "psnr_rgb": psnr(image, hr), "ssim_rgb": ssim(image, hr)} for name, image in outputs.items()}
        tiles = 1
    row = {key: {name: metrics[name][key] for name in metrics} for key in METRICS}
    row["tiles"] = tiles
    row["hr_size"] = [int(hr.shape[1]), int(hr.shape[0])]
    row["lr_size"] = [int(lr.shape[1]), int(lr.shape[0])]
    if "int8" in outputs:
        a, b = outputs["int8"], outputs["fp32"]
        row["int8_vs_fp32"] = {"psnr_rgb": psnr(a, b), "max_abs_diff": max_abs_difference(a, b)}
        row["drop_psnr_y"] = row["psnr_y"]["fp32"] - row["psnr_y"]["int8"]
    return {"row": row, "images": {"hr": hr, **outputs}}


# What ``report.write_report`` takes per pixel of the worst image beyond its pictures and ``error_maps.figure_bytes``
# (its figures are computed in bands and drawn from a reduced map). Measured (peak resident memory of the report
# over what was resident before it, int8 and fp32): 73 MiB at 6.25 MP, 64 at 25 MP, 84 at 49 MP: some 0.3 B/px
# (72 before, for the whole-image float64 copies).
REPORT_BYTES_PER_PIXEL = 1
REPORT_BYTES = 64 << 20  # matplotlib's own


def compare_bytes(header: ImageHeader, runners: dict[str, TiledRunner], protocol: str, scale: int) -> int:
    """Peak bytes reading and scoring the HR image of ``header`` takes (``evaluate_image``), or the report's
    figures of it should it be the worst image, whichever is larger: decoding it, then the HR, its LR, one
    uint8 output per model and bicubic, and the resizes' bands or the metrics' blocks; for the report the HR,
    the outputs and bicubic, with the bands and the drawn map of ``error_maps``. What the models
    fix whatever the image (their sessions, a tile's buffers; in ``seed`` the outputs at the model's size,
    their metrics and figures) is not counted."""
    pixels = header.pixels
    held = 3 * pixels + 3 * pixels // scale**2
    work = 6 * BAND_BYTES * scale  # matlab_resize's bands (the LR, bicubic)
    if protocol != "sr":
        return max(decode_bytes(header), held + work)
    pictures = 3 * pixels * (len(runners) + 2)  # what the report gets: HR, every output, bicubic
    scoring = held + 3 * pixels * (len(runners) + 1) + max(METRIC_WORK_BYTES, work)
    figures = figure_bytes(header.height, header.width)
    report = pictures + REPORT_BYTES_PER_PIXEL * pixels + figures + REPORT_BYTES
    return max(decode_bytes(header), scoring, report)


def memory_check(runners: dict[str, TiledRunner], protocol: str, scale: int) -> Callable[[ImageHeader], None]:
    """``read_rgb8``'s check for scoring with ``runners``: refuse an HR image over the memory budget."""
    models = ", ".join(runners)
    return lambda header: check_memory(header, compare_bytes(header, runners, protocol, scale),
                                       f"score it x{scale} ({models} and bicubic) and draw it in the report")


# --------------------------------------------------------------------------- workers


@dataclass
class Scorer:
    """One worker's sessions and protocol: what scores an HR image (``score_file``)."""

    runners: dict[str, TiledRunner]
    protocol: str
    scale: int


def make_scorer(model_paths: dict[str, str], threads: int, protocol: str, scale: int, runtime: str) -> Scorer:
    runners = {}
    for name, path in model_paths.items():
        try:
            runners[name] = TiledRunner(path, threads, runtime=runtime)
        except InputError:  # already one line naming the model (too small to tile, no memory for it)
            raise
        except Exception as error:  # a runtime's own exception types: one line naming the model
            raise InputError(path, f"{runtime} cannot load the --{name} model ({type(error).__name__}: {error})") from None
    return Scorer(runners, protocol, scale)


def score_file(scorer: Scorer, path: str) -> tuple[str, dict | None, str | None]:
    """Score one HR image: (path, row, None), or (path, None, why it was skipped)."""
    try:
        hr, notes = read_rgb8(path, memory_check(scorer.runners, scorer.protocol, scorer.scale))
    except InputError as error:
        return path, None, f"skipped {error}"
    if problem := unscorable(hr, scorer.scale):
        return path, None, f"skipped {path}: {problem}"
    try:
        row = evaluate_image(hr, scorer.runners, scorer.protocol, scorer.scale)["row"]
    except RunEndingError:  # no memory for the model: no other image would fare better
        raise
    except Exception as error:  # one image the runtime fails on (memory, a kernel error) must not end the run
        return path, None, f"skipped {path}: failed to evaluate ({type(error).__name__}: {error})"
    row["image"], row["notes"] = path, notes
    return path, row, None


_POOL_SCORER: Scorer | InputError | None = None  # a pool process's scorer: an initializer can only leave a global
def _init_pool_worker(model_paths: dict[str, str], threads: int, protocol: str, scale: int, runtime: str,
                      workers: int = 1) -> None:
    """``make_scorer`` in a pool process of ``workers`` (``JOB_SIGNALS`` reach it blocked: the parent handles them;
    it ends with the parent: ``end_with_parent``). The workers share the memory budget: each refuses an image
    over its 1/``workers`` share (``memory_budget.share_budget``).

    A failure is kept for ``_pool_score`` to raise: an initializer that raises makes the pool respawn
    workers forever, and the run would hang.
    """
    global _POOL_SCORER
    share_budget(workers)
    end_with_parent()
    for number in JOB_SIGNALS:  # ignored, not only blocked: a worker's runtime threads may unblock them (measured)
        signal.signal(number, signal.SIG_IGN)
    try:
        _POOL_SCORER = make_scorer(model_paths, threads, protocol, scale, runtime)
    except InputError as error:
        _POOL_SCORER = error


def _pool_score(path: str) -> tuple[str, dict | None, str | None]:
    if isinstance(_POOL_SCORER, InputError):
        raise _POOL_SCORER
    return score_file(_POOL_SCORER, path)


def measure_latency(runners: dict[str, TiledRunner], repeats: int) -> dict:
    """Median seconds of one forward of the model's own input, per 1080p-equivalent frame."""
    if not runners:
        return {}
    first = next(iter(runners.values()))
    x = np.random.default_rng(0).random((1, 3, first.tile_h, first.tile_w), dtype=np.float32)
    times = time_interleaved({name: reusing_output(runner.session) for name, runner in runners.items()}, x, repeats)
    per_frame = FULL_HD_PIXELS / (first.tile_h * first.tile_w)
    latency: dict = {name: {"median_s": float(np.median(t)), "per_1080p_frame_s": float(np.median(t) * per_frame),
                            "repeats": repeats} for name, t in times.items()}
    latency["runtime"] = first.runtime
    if "int8" in latency:
        latency["speedup_int8"] = latency["fp32"]["median_s"] / latency["int8"]["median_s"]
    return latency


def default_int8_for(fp32_path: Path) -> Path | None:
    """The int8 model `quantize` writes beside ``fp32_path`` by default, when it exists."""
    candidate = default_int8_path(Path(fp32_path))
    return candidate if candidate.is_file() else None


def compare(fp32_path: Path, int8_path: Path | None, data_dir: Path, options: CompareOptions = CompareOptions(),
            progress: Progress = no_progress, warn: Callable[[str], None] = print) -> Comparison:
    """Score ``fp32_path`` (and ``int8_path``, and bicubic) on the HR images under ``data_dir``.

    Returns everything the report shows: one row per usable image (PSNR/SSIM on Y and RGB in dB and
    [0, 1], per model; int8's drop and fidelity), their means, the worst image's row and pictures,
    the latency of one forward per 1080p-equivalent frame on this machine, and with ``diagnose``
    the per-tensor diagnosis. ``progress`` wraps the loops over images and tensors; ``warn``
    gets one line per skipped image or conversion note. Raises InputError for unusable models,
    options or data.
    """
    if options.protocol not in PROTOCOLS:
        raise InputError("--protocol", f"unknown protocol {options.protocol!r}")
    if options.diagnose and not int8_path:
        raise InputError("--diagnose", "needs an int8 model (--int8)")
    check_runtime(options.runtime)
    max_memory_bytes()  # DIPNET_MAX_MEMORY_MB refused at once when it is no number of MiB
    if options.ray is not None:
        import_ray()  # before any work: refuse at once without the extra
    fp32 = inspect_model(Path(fp32_path), "fp32")
    int8 = inspect_model(Path(int8_path), "int8") if int8_path else None
    check_pair(fp32, int8)
    check_parallelism(options.workers, "--workers", fp32.input_shape, sessions_each=2 if int8 else 1)
    files = list_images(data_dir, warn)
    if not files:
        raise InputError(data_dir, "no image files (png, jpg, bmp, tif, webp)")
    if options.limit:
        files = files[: options.limit]
    model_paths = {"fp32": str(fp32.path), **({"int8": str(int8.path)} if int8 else {})}
    comparison = Comparison(protocol=options.protocol, models={"fp32": fp32, **({"int8": int8} if int8 else {})},
                            int8_origin=int8_origin(int8, fp32) if int8 else None)
    scorer_args = (model_paths, options.protocol, fp32.scale, options.runtime)
    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        outcomes, comparison.execution, local = _scorings(files, scorer_args, options, stack)
        for path, row, problem in progress(outcomes, "compare", len(files)):
            if problem:
                comparison.skipped.append(problem)
                warn(f"warning: {problem}")
            else:
                for note in row["notes"]:
                    warn(f"note: {path}: {note}")
                results[path] = row
    if not results:
        last = comparison.skipped[-1].removeprefix("skipped ") if comparison.skipped else "none scored"
        raise InputError(data_dir, f"no usable HR images ({len(files)} file(s), all skipped; last: {last})")
    comparison.rows = [results[str(p)] for p in files if str(p) in results]
    # latency: on this machine, with all its cores (the local scorer has them)
    runners = (local or make_scorer(model_paths, os.cpu_count() or 1, *scorer_args[1:])).runners
    field_ = next(iter(runners.values())).field
    comparison.receptive_field = {"radius": field_.radius, "local": field_.local,
                                  "halo": next(iter(runners.values())).halo}
    comparison.latency = measure_latency(runners, options.latency_repeats)
    comparison.mean, comparison.worst = means(comparison.rows), worst_image(comparison)
    check = memory_check(runners, options.protocol, fp32.scale)
    if options.diagnose:  # before the worst image's pictures are made: never both in memory
        from dipnet_deploy.diagnose import diagnose

        evaluate = functools.partial(evaluate_image, protocol=options.protocol, scale=fp32.scale)
        comparison.diagnosis = diagnose(int8.path, comparison.rows, options.protocol, fp32.scale,
                                        evaluate, options.runtime, progress, check)
    # rows keep only numbers: its pictures again, for the report
    worst_hr, _ = read_rgb8(comparison.worst["image"], check)
    comparison.worst_images = evaluate_image(worst_hr, runners, options.protocol, fp32.scale)["images"]
    return comparison


def _scorings(files: list[Path], scorer_args: tuple, options: CompareOptions,
              stack: contextlib.ExitStack) -> tuple[Iterable, dict, Scorer | None]:
    """The (path, row, problem) of every file, in any order, from this process, a local process pool
    or a Ray cluster; a description of what ran them; the scorer when it is this process's.
    ``stack`` owns the workers."""
    model_paths, protocol, scale, runtime = scorer_args
    paths = list(map(str, files))
    if options.ray is not None:
        from dipnet_deploy.cluster import cluster_description, ray_map

        count, outcomes = stack.enter_context(ray_map(
            make_scorer, (model_paths, options.ray.cpus_per_worker, protocol, scale, runtime), score_file, paths,
            lambda path: [path], options.ray))
        execution = cluster_description(options.ray, count)
        return (outcome.value if outcome.error is None else (outcome.item, None, f"skipped {outcome.error}")
                for outcome in outcomes), execution, None
    workers = max(1, min(options.workers, len(files)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    execution = {"backend": "local" if workers == 1 else "processes", "workers": workers}
    if workers == 1:
        scorer = make_scorer(model_paths, threads, protocol, scale, runtime)
        return (score_file(scorer, path) for path in paths), execution, scorer
    with job_signals_blocked():
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_pool_worker, (model_paths, threads, protocol,
                                                                                      scale, runtime, workers))
    # every result is in when the stack closes, unless an error or Ctrl-C stops the run: then stop at once
    stack.callback(pool.join)
    stack.callback(pool.terminate)
    return pool.imap_unordered(_pool_score, paths), execution, None


def means(rows: list[dict]) -> dict:
    names = rows[0]["psnr_y"].keys()
    return {key: {name: float(np.mean([r[key][name] for r in rows])) for name in names} for key in METRICS}


def worst_image(comparison: Comparison) -> dict:
    key = "drop_psnr_y" if "int8" in comparison.models else "psnr_y"
    if key == "drop_psnr_y":
        return max(comparison.rows, key=lambda r: r["drop_psnr_y"])
    return min(comparison.rows, key=lambda r: r["psnr_y"]["fp32"] - r["psnr_y"]["bicubic"])
