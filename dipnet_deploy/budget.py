"""The quality budget of ``quantize --max-drop``: the fastest model whose PSNR-Y drop stays within it.

Conventions: the drop of a model is the mean, over the validation images, of PSNR-Y(fp32) − PSNR-Y(model)
in dB, scored with the sr protocol (``sr_protocol``: HR cropped to the scale, MATLAB-bicubic LR, uint8
output, Y channel, crop = scale) through onnxruntime, against the fp32 ONNX the user brought; the worst
image's drop is kept beside it. Latency is seconds per 1080p-equivalent frame on the chosen runtime, the
median of ``repeats`` forwards interleaved with the pure int8 model's (the same drift hits both).

The search (``search``): the pure int8 model first; if its drop is over the budget, every activation
Q/DQ pair is tried out of int8 alone (``qdq_pairs.float_fallback``) and ranked by the drop it regains per
latency it costs, both measured; the pairs are then taken out in that order, one step at a time, each
step measured again, until the drop is within the budget. When every activation is out of int8 and the
drop is still over, the last step is the fp32 model itself: the search always ends.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import scratch_dir, sha256_file
from dipnet_deploy.imageio import ImageHeader, check_memory, decode_bytes, list_images, read_rgb8
from dipnet_deploy.int8_model import promoted_model, qdq_model, write_runtime_form
from dipnet_deploy.metrics import psnr
from dipnet_deploy.onnx_model import sr_model_shape
from dipnet_deploy.precision import FALLBACKS, FP32_STEP
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.qdq_pairs import activation_pairs
from dipnet_deploy.runtime import FULL_HD_PIXELS, check_runtime, cpu_name, open_session, reusing_output, time_interleaved
from dipnet_deploy.sr_protocol import make_pair, unscorable
from dipnet_deploy.tiling import TiledRunner

MAX_VAL_IMAGES = 64  # each is scored once per candidate: more only costs time


@dataclass(frozen=True)
class BudgetOptions:
    """Settings of ``quantize --max-drop``.

    max_drop: the largest mean PSNR-Y drop (dB) accepted on the ``val_dir`` images.
    val_dir: HR validation images of the user's (never the calibration images).
    fallback: what a tensor taken out of int8 becomes (``FALLBACKS``).
    runtime: the runtime whose latency ranks the candidates (``runtime.RUNTIMES``).
    repeats: timed forwards per latency (median, interleaved with the pure int8 model's).
    """

    max_drop: float
    val_dir: Path
    fallback: str = "float"
    runtime: str = "onnxruntime"
    repeats: int = 5


def check_options(options: BudgetOptions) -> None:
    """Refuse, before any work, a budget that is not a finite number >= 0, an unknown fallback or runtime."""
    if not np.isfinite(options.max_drop) or options.max_drop < 0:
        raise InputError("--max-drop", f"{options.max_drop} is not a finite drop in dB >= 0")
    if options.fallback not in FALLBACKS:
        raise InputError("--fallback", f"unknown fallback {options.fallback!r} (choose from {', '.join(FALLBACKS)})")
    if not 1 <= options.repeats <= 1000:
        raise InputError("--repeats", f"{options.repeats} is not in [1, 1000]")
    check_runtime(options.runtime)


def validation_pairs(val_dir: Path, scale: int, calibration: list[Path],
                     warn: Callable[[str], None]) -> tuple[list[Path], list[tuple[np.ndarray, np.ndarray]]]:
    """The images of ``val_dir`` and their (HR, LR) pairs, all held at once within the memory budget
    (``imageio.max_memory_bytes``); refuse none, too many, one that cannot be read or scored, or one that
    is also a calibration image (the same file, or the same bytes under another name)."""
    files = list_images(val_dir, warn)
    if not files:
        raise InputError(val_dir, "no validation images (png, jpg, bmp, tif, webp)")
    if len(files) > MAX_VAL_IMAGES:
        raise InputError(val_dir, f"{len(files)} validation images; at most {MAX_VAL_IMAGES} (each is scored once "
                                  "per step of the search)")
    calibration_hashes = {sha256_file(path) for path in calibration}
    calibration_files = {path.resolve() for path in calibration}
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    held = 0
    for path in files:
        if path.resolve() in calibration_files or sha256_file(path) in calibration_hashes:
            raise InputError(path, "is also a calibration image: validation must be images the ranges never saw")

        def within_budget(header: ImageHeader, held: int = held) -> None:  # decoding it beside those held
            check_memory(header, held + decode_bytes(header) + 3 * header.pixels // scale**2,
                         "hold it (and its LR) beside the validation images before it")
        hr, _ = read_rgb8(path, within_budget)
        if problem := unscorable(hr, scale):
            raise InputError(path, problem)
        pairs.append(make_pair(hr, scale))
        held += sum(image.nbytes for image in pairs[-1])
    return files, pairs


def psnr_y(model_path: Path, pairs: list[tuple[np.ndarray, np.ndarray]], scale: int,
           progress: Progress = no_progress, description: str = "validation images") -> np.ndarray:
    """PSNR-Y (dB) of ``model_path``'s output for each (HR, LR) pair, through onnxruntime."""
    runner = TiledRunner(str(model_path))
    return np.array([psnr(runner.run_rgb8(lr)[0], hr, scale, y_channel=True)
                     for hr, lr in progress(pairs, description, len(pairs))])


class LatencyProbe:
    """Latency of models against one reference model (its session opened once), on ``runtime``: seconds per
    1080p-equivalent frame, the median of ``repeats`` forwards of a random image, interleaved with the
    reference's (the same drift hits both)."""

    def __init__(self, reference_path: Path, runtime: str, repeats: int):
        self.runtime, self.repeats = runtime, repeats
        self.reference = reusing_output(open_session(reference_path, runtime))
        shape = [int(d.dim_value) for d in onnx.load(str(reference_path)).graph.input[0].type.tensor_type.shape.dim]
        self.x = np.random.default_rng(0).random(shape, dtype=np.float32)
        self.per_frame = FULL_HD_PIXELS / (shape[2] * shape[3])

    def measure(self, model_path: Path) -> tuple[float, float]:
        """(seconds per 1080p-equivalent frame of ``model_path``, its ratio to the reference's)."""
        try:
            session = open_session(model_path, self.runtime)
        except InputError:
            raise
        except Exception as error:  # a runtime's own exception types: it cannot run this mixed form at all
            raise InputError(f"--runtime {self.runtime}", f"cannot run the model with tensors out of int8 "
                                                          f"({type(error).__name__}: {error})".replace("\n", " ")) from None
        forwards = {"model": reusing_output(session), "reference": self.reference}
        times = time_interleaved(forwards, self.x, self.repeats)
        model, reference = float(np.median(times["model"])), float(np.median(times["reference"]))
        return model * self.per_frame, model / reference


@dataclass
class _Bench:
    """What the search measures against: the validation pairs, the fp32 model's scores, the pure int8 model."""

    pairs: list[tuple[np.ndarray, np.ndarray]]
    scale: int
    fp32_psnr: np.ndarray
    int8_latency_s: float
    latency: LatencyProbe

    def step(self, model_path: Path, promoted: list[str]) -> dict:
        drops = self.fp32_psnr - psnr_y(model_path, self.pairs, self.scale)
        latency, ratio = self.latency.measure(model_path)
        return {"promoted": promoted, "val_drop_db": float(np.mean(drops)), "val_worst_drop_db": float(np.max(drops)),
                "latency_1080p_s": self.int8_latency_s * ratio, "latency_vs_int8": ratio, "measured_latency_s": latency}


Promote = Callable[[list[str]], onnx.ModelProto]  # the QDQ model with these activation tensors out of int8


def _ranked(bench: _Bench, promote: Promote, tensors: list[str], base: dict, work: Path,
            write: Callable[[onnx.ModelProto, Path], None], progress: Progress) -> list[str]:
    """``tensors``, best drop regained per latency cost first, each measured out of int8 alone."""
    tried = []
    for name in progress(tensors, "budget: each tensor alone", len(tensors)):
        path = work / "candidate.onnx"
        write(promote([name]), path)
        tried.append((name, bench.step(path, [name])))
    floor = 0.01  # a cost measured at or under 1% of the int8 latency is noise: ranked by gain alone

    def merit(item: tuple[str, dict]) -> tuple[bool, float]:
        gain = base["val_drop_db"] - item[1]["val_drop_db"]
        return gain <= 0, -gain / max(item[1]["latency_vs_int8"] - 1, floor)

    return [name for name, _ in sorted(tried, key=merit)]


def search(promote: Promote, tensors: list[str], int8_path: Path, fp32_path: Path,
           pairs: list[tuple[np.ndarray, np.ndarray]], scale: int, options: BudgetOptions,
           write: Callable[[onnx.ModelProto, Path], None], progress: Progress = no_progress) -> dict:
    """Walk from the pure int8 model (``int8_path``, ``write`` of ``promote([])``) towards fp32 until the drop on
    ``pairs`` is within ``options.max_drop``, taking the activation ``tensors`` out of int8 (``promote``) one
    step at a time; the record of the walk (the ranges document's ``mixed_precision``): ``tensors`` (those
    taken out), ``fp32`` (true when even all of them out was not enough: the model is then the fp32 one) and
    every measured step. ``write(model, path)`` writes a model in the form the int8 model is written.
    """
    fp32_psnr = psnr_y(fp32_path, pairs, scale, progress, "validation images (fp32)")
    probe = LatencyProbe(int8_path, options.runtime, options.repeats)
    fp32_latency, fp32_ratio = probe.measure(fp32_path)
    bench = _Bench(pairs, scale, fp32_psnr, fp32_latency / fp32_ratio, probe)
    steps = [bench.step(int8_path, [])]
    record = {"fallback": options.fallback, "max_drop_db": options.max_drop, "tensors": [], "fp32": False,
              "runtime": options.runtime, "measured_on": f"{platform.machine()} {cpu_name()}",
              "fp32_latency_1080p_s": fp32_latency, "steps": steps}
    if steps[0]["val_drop_db"] <= options.max_drop:
        return record
    with scratch_dir("dipnet-budget-") as scratch:
        work = Path(scratch)
        chosen: list[str] = []
        ranked = _ranked(bench, promote, tensors, steps[0], work, write, progress)
        for name in progress(ranked, "budget: steps", len(ranked)):
            chosen.append(name)
            write(promote(chosen), work / "step.onnx")
            steps.append(bench.step(work / "step.onnx", [name]))
            if steps[-1]["val_drop_db"] <= options.max_drop:
                record["tensors"] = chosen
                return record
    record["tensors"], record["fp32"] = chosen, True
    steps.append({"promoted": [FP32_STEP], "val_drop_db": 0.0, "val_worst_drop_db": 0.0,
                  "latency_1080p_s": fp32_latency, "latency_vs_int8": fp32_ratio, "measured_latency_s": fp32_latency})
    return record


def mixed_precision(model_path: Path, document: dict, options: BudgetOptions, per_channel: bool,
                    symmetric_activations: bool, progress: Progress = no_progress,
                    warn: Callable[[str], None] = print) -> dict:
    """The ``mixed_precision`` entry of ``document`` (the ranges of the fp32 ONNX ``model_path``) for the budget
    ``options``: ``search``'s record, with the validation images it was measured on."""
    _, scale = sr_model_shape(onnx.load(str(model_path)), model_path, "--model")
    calibration = [Path(item["path"]) for item in document["calibration_files"]]
    files, pairs = validation_pairs(options.val_dir, scale, calibration, warn)
    qdq = qdq_model(model_path, document, per_channel, symmetric_activations)

    def promote(tensors: list[str]) -> onnx.ModelProto:
        return promoted_model(model_path, document, per_channel, symmetric_activations, options.fallback, tensors, qdq)

    with scratch_dir("dipnet-budget-") as scratch:
        int8_path = Path(scratch) / "int8.onnx"
        write_runtime_form(qdq, int8_path)
        record = search(promote, [pair.tensor for pair in activation_pairs(qdq)], int8_path, model_path, pairs, scale,
                        options, write_runtime_form, progress)
    return record | {"val": [{"path": str(path), "sha256": sha256_file(path)} for path in files]}


def budget_card(record: dict) -> dict:
    """The model card's account of a budget's search (``record``: the ranges document's ``mixed_precision``)."""
    chosen = record["steps"][-1]
    return {
        "max_drop_db": record["max_drop_db"], "fallback": record["fallback"],
        "tensors_out_of_int8": record["tensors"], "fp32": record["fp32"],
        "val_images": len(record["val"]), "val_drop_db": chosen["val_drop_db"],
        "val_worst_drop_db": chosen["val_worst_drop_db"], "latency_1080p_s": chosen["latency_1080p_s"],
        "fp32_latency_1080p_s": record["fp32_latency_1080p_s"], "runtime": record["runtime"],
        "measured_on": record["measured_on"],
        "steps": [[", ".join(step["promoted"]) or "pure int8", round(step["val_drop_db"], 4),
                   round(step["latency_1080p_s"], 4)] for step in record["steps"]],
        "steps_columns": ["taken out of int8", "val drop (dB)", "latency per 1080p frame (s)"],
        "note": "the CPU runtimes run a tensor out of int8 in float, and the convolutions on both sides of it: "
                "latencies are this machine's, not an accelerator's",
    }


def budget_summary(record: dict) -> dict:
    """The quantize summary's fields for a budget's search."""
    chosen = record["steps"][-1]
    return {"max_drop_db": record["max_drop_db"], "tensors_out_of_int8": len(record["tensors"]),
            "fp32": record["fp32"], "val_drop_db": round(chosen["val_drop_db"], 4),
            "val_worst_drop_db": round(chosen["val_worst_drop_db"], 4),
            "latency_1080p_s": round(chosen["latency_1080p_s"], 4),
            "int8_latency_1080p_s": round(record["steps"][0]["latency_1080p_s"], 4),
            "fp32_latency_1080p_s": round(record["fp32_latency_1080p_s"], 4), "steps": len(record["steps"])}
