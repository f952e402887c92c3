"""Stages 3-4: calibration images -> ranges JSON -> int8 QDQ ONNX (written by ``int8_model``)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from dipnet_deploy.artifacts import TOOL, card_header, card_path_for, default_int8_path, default_ranges_path
from dipnet_deploy.budget import BudgetOptions, budget_card, budget_summary, check_options, mixed_precision
from dipnet_deploy.calibrate import calibrate
from dipnet_deploy.equalize import MAX_SCALE
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import atomic_paths, json_bytes, refuse_unwritable, sha256_file
from dipnet_deploy.imageio import list_images, read_rgb8, silent, usable_images, vendor_preprocess
from dipnet_deploy.int8_model import quantized_conv_report, write_int8
from dipnet_deploy.model_stats import onnx_summary
from dipnet_deploy.observers import make_observer
from dipnet_deploy.onnx_model import is_quantized, load_onnx, sr_model_shape
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.ptq import AutoOptions, auto_parameters, refine, weights_entry
from dipnet_deploy.qat import image_grid_ranges, model_from_onnx, simulation_agreement, tensor_ranges
from dipnet_deploy.qdq_graph import FAST_PATH
from dipnet_deploy.ranges_schema import (
    AUTO,
    LEARNED,
    METHODS,
    RANGES_FORMAT,
    check_ranges_document,
    flat_input_problem,
    learned_points,
    read_ranges,
)
from dipnet_deploy.runtime import ORT_EXACT_INTEGER_KEY
from dipnet_deploy.safety import refuse_collisions, refuse_replacing_foreign
from dipnet_deploy.stress_set import COVERAGE_HUES, COVERAGE_SEED, coverage_images

MIN_CALIBRATION_SIDE = 32  # smaller images say nothing about 1080p frames
DEFAULT_COVERAGE = 0  # max over coverage images widens ranges more than photos can pay for (BENCHMARKS.md)
IMAGE_GRID = "input and last conv output on [0, 1] in 1/255 steps"
COVERAGE_GENERATOR = f"stress_set.coverage_images (seed {COVERAGE_SEED}, hue offsets {list(COVERAGE_HUES)})"


@dataclass
class QuantizeOptions:
    """Settings of ``quantize``.

    method: how activation ranges are chosen: an ``observers.OBSERVERS`` name ("max", "percentile",
        "entropy", "mse"), "auto" (max, then refined for the output through the ``qat`` twin: ``ptq``)
        or "learned" (the ranges a ``finetune`` checkpoint carried into the ONNX; no calibration).
    percentile: kept percentile of each tensor's values for "percentile" (in (50, 100]).
    per_channel: int8 weights per output channel (else per tensor); always symmetric.
    symmetric_activations: int8 symmetric activations (else uint8 asymmetric, the default).
    limit: at most this many calibration images (sorted by path); None: all.
    equalize: rescale channels before quantizing (``equalize.py``; the same function in float).
    auto: the refinement of "auto".
    coverage: generated stress images (``stress_set.coverage_images``: saturated flat colours, line art,
        text, gradients, UI) calibrated beside the user's, so that no range is narrower than what such
        images produce (0, the default: the user's images alone).
    budget: a quality budget (``budget.BudgetOptions``): tensors leave int8 until the drop is within it.
        With a budget, method None starts from the best pure int8 (``best_method``).
    """

    method: str | None = "max"
    percentile: float = 99.999
    per_channel: bool = True
    symmetric_activations: bool = False
    limit: int | None = None
    equalize: bool = True
    auto: AutoOptions = field(default_factory=AutoOptions)  # --method auto
    coverage: int = DEFAULT_COVERAGE
    budget: BudgetOptions | None = None


@dataclass
class QuantizeResult:
    int8_path: Path
    ranges_path: Path
    card_path: Path
    summary: dict = field(default_factory=dict)


def default_calibration_dir() -> Path:
    """The project's calibration/ set: beside the package in a checkout, else ./calibration."""
    beside_package = Path(__file__).resolve().parent.parent / "calibration"
    return beside_package if beside_package.is_dir() else Path("calibration")


def best_method(model_path: Path, budget: BudgetOptions | None) -> str:
    """The method of an unset ``--method``: max, or with a budget the best pure int8 this tool makes for the
    model: the ranges ``finetune`` learned when the ONNX carries them, else auto."""
    if budget is None:
        return "max"
    model, _ = check_fp32_model(model_path)
    return LEARNED if learned_points(model, model_path) is not None else AUTO


def check_fp32_model(path: Path) -> tuple[onnx.ModelProto, list[int]]:
    """Load an fp32 DIPNet ONNX from ``export``; refuse anything else. Returns (model, input shape)."""
    model = load_onnx(path)
    if is_quantized(model):
        raise InputError(path, "is already quantized (expected the fp32 ONNX from `dipnet-deploy export`)")
    if not any(node.op_type == "Conv" for node in model.graph.node):
        raise InputError(path, "not a DIPNet ONNX (no Conv nodes)")
    shape, _ = sr_model_shape(model, path, "--model")
    return model, shape


class VendorInputs:
    """The calibration images (files, then the in-memory coverage images), preprocessed as the seed does,
    one at a time."""

    def __init__(self, files: list[Path], height: int, width: int, coverage: list[np.ndarray] = ()):
        self.files, self.height, self.width, self.coverage = files, height, width, list(coverage)

    def __len__(self) -> int:
        return len(self.files) + len(self.coverage)

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.files:
            yield vendor_preprocess(read_rgb8(path)[0], self.height, self.width)
        for image in self.coverage:
            yield vendor_preprocess(image, self.height, self.width)


def select_images(directory: Path, limit: int | None, warn: Callable[[str], None]) -> tuple[list[Path], list[str]]:
    """Readable images under ``directory`` (sorted), an evenly spaced subset of ``limit``; and skips."""
    files = list_images(directory, warn)
    skipped: list[str] = []

    def too_small(image: np.ndarray) -> str | None:
        if min(image.shape[:2]) < MIN_CALIBRATION_SIDE:
            return f"{image.shape[1]}x{image.shape[0]} is smaller than {MIN_CALIBRATION_SIDE}px on a side"
        return None

    usable = [path for path, _ in usable_images(files, warn, too_small, skipped, say_notes=True)]
    if not usable:
        what = f"{len(files)} image file(s), none usable" if files else "no image files (png, jpg, bmp, tif, webp)"
        raise InputError(directory, f"no calibration images: {what}")
    if limit is not None and limit < len(usable):
        indices = np.unique(np.round(np.linspace(0, len(usable) - 1, limit)).astype(int))
        usable = [usable[i] for i in indices]
    return usable, skipped


def ranges_header(model_path: Path, shape: list[int], method: str, parameters: dict) -> dict:
    """The first fields of every ranges document: format, tool, the model (path, sha256, shape), method."""
    return {"format": RANGES_FORMAT, "tool": TOOL, "model": str(model_path),
            "model_sha256": sha256_file(model_path), "input_shape": shape, "method": method, "parameters": parameters}


def compute_ranges(model_path: Path, calib_dir: Path, options: QuantizeOptions,
                   progress: Progress = no_progress,
                   warn: Callable[[str], None] = print) -> dict:
    """Calibrate and return the ranges document (what the ranges JSON holds); refuse a degenerate one."""
    model, shape = check_fp32_model(model_path)
    files, skipped = select_images(calib_dir, options.limit, warn)
    height, width = shape[2], shape[3]

    auto = options.method == AUTO
    if auto and (options.symmetric_activations or not options.per_channel or not options.equalize):
        raise InputError("--method auto", "refines the ranges of per-channel int8 weights, uint8 activations and an "
                                          "equalized model: drop --per-tensor, --symmetric-activations, --no-equalize")
    if auto:
        try:  # before any calibration: the refinement needs the DIPNet behind the graph
            model_from_onnx(model)
        except (InputError, KeyError, RuntimeError):
            raise InputError(model_path, "--method auto needs a DIPNet ONNX written by `dipnet-deploy export` "
                                         "(its weights keep the module names); use --method max") from None
    observer = make_observer("max" if auto else options.method, options.percentile)
    inputs = VendorInputs(files, height, width, coverage_images(options.coverage))
    calibration = calibrate(model, inputs, observer, progress,
                            equalize=options.equalize, per_channel_weights=options.per_channel,
                            symmetric_activations=options.symmetric_activations, name=model_path)
    parameters, adapted = observer.parameters(), None
    observed_input = calibration.ranges.get(model.graph.input[0].name)
    problem = observed_input and flat_input_problem(*observed_input)  # before the image grid replaces it
    if problem:
        raise InputError(calib_dir, problem)
    if not options.symmetric_activations:  # the uint8 grid of the image is exact whatever the observer saw
        calibration.ranges |= image_grid_ranges(calibration.model.graph)
        parameters |= {"image_grid": IMAGE_GRID}
    if auto:
        refinement = refine(calibration.model, calibration.ranges, np.concatenate(list(inputs)), options.auto, progress)
        calibration.ranges |= refinement.ranges
        parameters, adapted = auto_parameters(refinement.options), weights_entry(refinement.weights)
    document = ranges_header(model_path, shape, options.method, parameters) | {
        "preprocessing": "cv2 bilinear resize to the model input, RGB, /255 (the seed's)",
        "calibration_files": [{"path": str(p), "sha256": sha256_file(p)} for p in files],
        "coverage": {"images": options.coverage, "generator": COVERAGE_GENERATOR},
        "skipped": skipped,
        "equalization": {
            "max_scale": MAX_SCALE, "per_channel_weights": options.per_channel,
            "symmetric_activations": options.symmetric_activations,
            "scales": {key: scales.tolist() for key, scales in calibration.scales.items()},
        } if options.equalize else None,
        "tensors_of": "the model with `equalization` applied" if options.equalize else "the model",
        "tensors": {name: {"min": low, "max": high} for name, (low, high) in calibration.ranges.items()},
    } | ({"adapted_weights": adapted} if adapted else {})
    check_ranges_document(document, calib_dir, model)
    return document


def learned_ranges_document(model_path: Path, options: QuantizeOptions) -> dict:
    """The ranges document of ``--method learned``: the ranges ``finetune`` learned, from the ONNX.

    No calibration: every quantized tensor gets the range learned for its quantization point
    (``qat`` names), with the weight and activation types the ranges were learned for.
    """
    model, shape = check_fp32_model(model_path)
    learned = learned_points(model, model_path)
    if learned is None:
        raise InputError(model_path, "carries no learned ranges (export a checkpoint written by "
                                     "`dipnet-deploy finetune`, or choose another --method)")
    if options.symmetric_activations or not options.per_channel or options.equalize:
        raise InputError("--method learned", "the ranges were learned for per-channel int8 weights and uint8 "
                                             "activations of the model as exported: drop --per-tensor, "
                                             "--symmetric-activations and --equalize")
    tensors = tensor_ranges(model.graph, learned)  # learned_points checked that the points are the graph's
    points = {"points": {name: list(bounds) for name, bounds in sorted(learned.items())}}
    document = ranges_header(model_path, shape, LEARNED, points) | {
        "preprocessing": None,
        "calibration_files": [],
        "skipped": [],
        "equalization": None,
        "tensors_of": "the model",
        "tensors": {name: {"min": low, "max": high} for name, (low, high) in tensors.items()},
    }
    check_ranges_document(document, model_path, model)
    return document


def agreement_image(shape: list[int]) -> tuple[Path, np.ndarray]:
    """The image for the int8-vs-simulation check: the first default calibration photo at ``shape``."""
    path = list_images(default_calibration_dir())[0]
    return path, vendor_preprocess(read_rgb8(path)[0], shape[2], shape[3])


def equalization_summary(document: dict) -> dict | None:
    """How much the activation equalization rescaled (None when it was off)."""
    if not document.get("equalization"):
        return None
    scales = np.concatenate([np.asarray(s) for s in document["equalization"]["scales"].values()] or [np.ones(0)])
    return {"channel_spaces": len(document["equalization"]["scales"]), "channels": int(scales.size),
            "rescaled_channels": int(np.sum(scales > 1)),
            "median_scale": round(float(np.median(scales)), 3) if scales.size else None}


def int8_card(output: Path, int8_path: Path, model_path: Path, ranges_path: Path, ranges_file: Path, document: dict,
              options: QuantizeOptions, padded: list[dict]) -> dict:
    """The model card of the int8 model written at ``int8_path`` (to be renamed ``output``) from ``document``
    (saved at ``ranges_file``, to be ``ranges_path``)."""
    int8 = onnx.load(str(int8_path))
    summary = onnx_summary(int8)
    mixed = document.get("mixed_precision")
    card = card_header("int8-onnx", output) | {
        "onnx_sha256": sha256_file(int8_path),
        "fp32_onnx": str(model_path),
        "fp32_sha256": document["model_sha256"],
        "ranges": str(ranges_path),
        "ranges_sha256": sha256_file(ranges_file),
        "method": document["method"],
        "parameters": document["parameters"],
        "calibration_images": len(document["calibration_files"]),
        "weights": "int8 symmetric " + ("per output channel" if options.per_channel else "per tensor") + (
            ", refined on the calibration images and pinned (adapted_weights in the ranges file)"
            if document.get("adapted_weights") else ", rounded to nearest"),
        "activations": "int8 symmetric" if options.symmetric_activations else "uint8 asymmetric",
        "equalization": equalization_summary(document),
        "format": "QDQ (onnxruntime quantize_static)",
        "onnxruntime_session_config": {ORT_EXACT_INTEGER_KEY: "1"},
        "integer_sums": "exact with VNNI; on x86-64 CPUs without it onnxruntime needs onnxruntime_session_config "
                        "(its int16 sums saturate otherwise) and OpenVINO computes this model wrong (runtime.ort_options)",
        "conv_report": quantized_conv_report(int8),
        "fast_path_padding": {"rule": FAST_PATH._asdict(), "convs": padded,
                              "note": "onnxruntime's fast integer kernel; OpenVINO sessions take it out"},
        "ops": summary["ops"],
        "input_shape": summary["inputs"],
        "output_shape": summary["outputs"],
    } | ({"mixed_precision": budget_card(mixed)} if mixed else {})
    if document["method"] == LEARNED and not (mixed and (mixed["tensors"] or mixed["fp32"])):
        fp32 = onnx.load(str(model_path))
        image_path, image = agreement_image(document["input_shape"])
        learned = {name: (float(low), float(high)) for name, (low, high) in document["parameters"]["points"].items()}
        card["simulation_agreement"] = {"image": str(image_path), **simulation_agreement(fp32, int8_path, learned, image)}
    return card


def refuse_overwrites(model_path: Path, calib_dir: Path | None, ranges_path: Path, output: Path, card_path: Path,
                      new_ranges: bool) -> None:
    """Refuse, before any work, outputs that would replace an input or each other, or cannot be written.

    The ranges file is an output when ``new_ranges`` and an input otherwise. The fp32 model's card
    (``export``'s) counts as an input: a run never replaces what an earlier stage wrote.
    """
    ranges_role = [("--ranges", ranges_path)]
    outputs = [("--output", output), ("model card", card_path)] + (ranges_role if new_ranges else [])
    inputs = [("--model", model_path), ("the --model's card", model_path.with_suffix(".json"))]
    inputs += [("calibration image", path) for path in list_images(calib_dir, silent)] if calib_dir is not None else []
    inputs += [] if new_ranges else ranges_role
    for _, path in outputs:
        refuse_unwritable(path)
    refuse_collisions(outputs, inputs)


def quantize(model_path: Path, output: Path | None = None, calib_dir: Path | None = None,
             ranges_path: Path | None = None, options: QuantizeOptions = QuantizeOptions(),
             progress: Progress = no_progress,
             warn: Callable[[str], None] = print) -> QuantizeResult:
    """Calibrate (or reuse saved ranges) and write the int8 ONNX, its ranges JSON and model card; with a
    budget (``options.budget``), the model of the fewest tensors out of int8 that keeps it (``budget``)."""
    if options.method is None:
        options = replace(options, method=best_method(Path(model_path), options.budget))
    if options.method not in METHODS:
        raise InputError("--method", f"unknown method {options.method!r} (choose from {', '.join(METHODS)})")
    learned = options.method == LEARNED
    if learned and calib_dir is not None:
        raise InputError("--calib", "--method learned takes no calibration images (the ranges come with the model)")
    if not 50 < options.percentile <= 100:  # also refuses NaN, which click's range lets through
        raise InputError("--percentile", f"{options.percentile} is not in (50, 100]")
    started = time.perf_counter()
    model_path = Path(model_path)
    check_fp32_model(model_path)
    output = Path(output) if output else default_int8_path(model_path)
    if calib_dir is None and ranges_path is None and not learned:
        raise InputError("--calib", "give a calibration directory or a saved --ranges file")
    calib_dir = Path(calib_dir) if calib_dir is not None else None
    ranges_path = Path(ranges_path) if ranges_path else default_ranges_path(output)
    card_path = card_path_for(output)
    new_ranges = calib_dir is not None or learned
    if options.budget is not None:
        check_options(options.budget)
        if not new_ranges:
            raise InputError("--max-drop", "searches from new ranges (--calib, or --method learned); a saved --ranges "
                                           "file replays the search it records")
        if not Path(options.budget.val_dir).is_dir():
            raise InputError(options.budget.val_dir, "--val: not a directory")
    refuse_overwrites(model_path, calib_dir, ranges_path, output, card_path, new_ranges)
    refuse_replacing_foreign([("int8 model", output), ("model card", card_path)] +
                             ([("ranges file", ranges_path)] if new_ranges else []))
    if learned:
        document = learned_ranges_document(model_path, options)
    elif calib_dir is not None:
        document = compute_ranges(model_path, calib_dir, options, progress, warn)
    else:
        document = read_ranges(ranges_path, model_path)
    if options.budget is not None:
        document["mixed_precision"] = mixed_precision(model_path, document, options.budget, options.per_channel,
                                                      options.symmetric_activations, progress, warn)
    # the int8 model, its card and the new ranges appear together or not at all
    with atomic_paths(output, card_path, *([ranges_path] if new_ranges else [])) as temps:
        int8_temp, card_temp = temps[:2]
        if new_ranges:
            temps[2].write_bytes(json_bytes(document))
        padded = write_int8(model_path, document, int8_temp, options.per_channel,
                            options.symmetric_activations)
        card = int8_card(output, int8_temp, model_path, ranges_path, temps[2] if new_ranges else ranges_path,
                         document, options, padded)
        card_temp.write_bytes(json_bytes(card))
    summary_line = {
        "model": str(model_path), "int8": str(output), "ranges": str(ranges_path), "card": str(card_path),
        "method": document["method"], "equalized": bool(document.get("equalization")),
        "images_used": len(document["calibration_files"]), "images_skipped": len(document.get("skipped", [])),
        "coverage_images": document.get("coverage", {}).get("images", 0),
        "int8_convs": card["conv_report"]["int8_weights"], "convs": card["conv_report"]["convs"],
        "padded_convs": len(padded),
        **({"budget": budget_summary(document["mixed_precision"])} if document.get("mixed_precision") else {}),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return QuantizeResult(output, ranges_path, card_path, summary_line)

