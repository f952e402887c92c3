"""What a ranges document (``quantize``'s ranges JSON) and a model's learned ranges may hold, checked
whole against the model before anything is quantized or written.

Conventions:

- An allowlist: a field, key or value this module does not describe is refused. The top-level
  ``seal`` string (``fileio.SEAL_KEY``) is accepted and ignored.
- Numbers are judged as the quantizer uses them, in float32: finite, within +-``MAGNITUDE_LIMIT``,
  and every scale (an activation range / 255, an int8 weight scale) either zero-width or at least
  ``MIN_SCALE``, so that what derives from them (the product of two scales, levels x scale) stays a
  finite, nonzero float32. Equalization scales lie in [1, ``equalize.MAX_SCALE``], as
  ``equalize`` makes them.
- Counts come from the model: a range is two numbers, the tensors, quantization points, channel
  spaces and weights named are the model's, a per-channel vector has its tensor's channel count,
  a weight shape is its initializer's.
- JSON is read from at most ``MAX_RANGES_BYTES`` (a file) or ``MAX_LEARNED_BYTES`` (the ONNX
  metadata); nesting too deep for Python's parser and integers too long to convert are refused as
  unparsable, and nothing is descended into beyond the depth this schema expects. The file size
  bounds the lists the model does not count (calibration files, skipped images).
- A refusal is ``InputError(path, problem)``, one line: keys from the document appear quoted and
  cut short, values only as numbers or as their JSON kind.

A valid document is used exactly as written: the checks return the document's own numbers
(Python floats), never their float32 roundings.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx

from dipnet_deploy.equalize import MAX_SCALE, channel_spaces
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import SEAL_KEY, sha256_file
from dipnet_deploy.json_checks import (
    Invalid,
    array_of,
    bounded,
    exact_ints,
    fields_of,
    float32_number,
    is_number,
    keys_exactly,
    kind,
    quoted,
    sha256_text,
    text_field,
    within_section,
)
from dipnet_deploy.observers import OBSERVERS
from dipnet_deploy.onnx_model import sr_model_shape
from dipnet_deploy.precision import FALLBACKS, FP32_STEP
from dipnet_deploy.qat import (
    ACTIVATION_LEVELS,
    FIXED_POINTS,
    LEARNED_RANGES_KEY,
    QAT_FORMAT,
    WEIGHT_QMAX,
    onnx_point_names,
    range_owner,
)
from dipnet_deploy.range_graphs import float_tensors
from dipnet_deploy.runtime import RUNTIMES

RANGES_FORMAT = "dipnet-deploy-ranges/1"
LEARNED = "learned"  # --method: the ranges `finetune` learned, carried in the fp32 ONNX
AUTO = "auto"  # --method: max + equalization, refined for the model's output (ptq.py)
METHODS = (*OBSERVERS, AUTO, LEARNED)

# Real sizes: x2 ranges 15 KB, with `auto`'s adapted weights 160 KB, official x4 with them 0.4 MB, and
# ~150 bytes per calibration image; learned ranges 2.3 KB (x2, 35 points), 5 KB (x4, 67 points). Kept
# below safety.JSON_BYTES_LIMIT, so that a ranges file read here is one safety recognizes as ours.
MAX_RANGES_BYTES = 32 << 20
MAX_LEARNED_BYTES = 1 << 20
MAX_INTEGER_DIGITS = 39  # 10**39 > 2**128: no longer integer is finite as float32
MAX_COVERAGE_IMAGES = 1000  # generated coverage images (quantize --coverage)
MAX_PARAMETERS = 64  # `parameters` of a calibration method (auto's has 10)
MAGNITUDE_LIMIT = 1e18  # any range bound, weight (levels x scale) or bias value
MIN_SCALE = 1e-18  # a bias scale is activation x weight scale: >= 1e-36, still a normal float32


def _activation_range(low, high, what: str, strict: bool) -> tuple[float, float]:
    """[low, high] of one quantized tensor: finite float32 within +-MAGNITUDE_LIMIT, min <= max (min < max
    when ``strict``), and, widened to hold 0 as the quantizer does, zero-width or at least
    ``ACTIVATION_LEVELS`` x ``MIN_SCALE`` wide."""
    low, high = float32_number(low, f"{what}: min"), float32_number(high, f"{what}: max")
    low32, high32 = np.float32(low), np.float32(high)
    if max(abs(low32), abs(high32)) > MAGNITUDE_LIMIT:
        raise Invalid(f"{what}: range [{low:g}, {high:g}] reaches beyond +-{MAGNITUDE_LIMIT:g}")
    if not (low32 < high32 if strict else low32 <= high32):
        raise Invalid(f"{what}: range [{low:g}, {high:g}] does not have min {'<' if strict else '<='} max")
    width = float(max(high32, 0)) - float(min(low32, 0))
    if 0 < width < ACTIVATION_LEVELS * MIN_SCALE:
        raise Invalid(f"{what}: range [{low:g}, {high:g}] is too narrow for a nonzero float32 quantization step")
    return low, high


def _describe(entry) -> str:
    if isinstance(entry, dict):
        return "an object of " + ", ".join(f"{quoted(key)}: {kind(value)}" for key, value in list(entry.items())[:4])
    return kind(entry)


def _tensor_ranges(tensors, needed: list[str]) -> None:
    """Exactly the ``needed`` tensors (the first is the image input), each ``{"min": x, "max": y}``."""
    keys_exactly(tensors, needed, "field 'tensors'", "range", "tensor")
    for name in needed:
        entry = tensors[name]
        if not (isinstance(entry, dict) and set(entry) == {"min", "max"} and all(map(is_number, entry.values()))):
            raise Invalid(f"tensor {name!r}: min and max must be numbers, an object of those two (got {_describe(entry)})")
        _activation_range(entry["min"], entry["max"], f"tensor {name!r}", strict=False)
    problem = flat_input_problem(tensors[needed[0]]["min"], tensors[needed[0]]["max"])
    if problem:
        raise Invalid(problem)


def flat_input_problem(low: float, high: float) -> str | None:
    """What is wrong with an image input range of one value (calibration images that are all flat), or None."""
    if np.float32(low) == np.float32(high):
        return f"the input range is [{low}, {high}]: calibrated on flat images only"
    return None


def _points(points, model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Learned point ranges (``qat`` names): exactly the model's learnable points, each [min, max], min < max."""
    learnable = {range_owner(name) for name in onnx_point_names(model.graph).values()} - set(FIXED_POINTS)
    keys_exactly(points, sorted(learnable), "field 'points'", "range", "learnable quantization point")
    return {name: _activation_range(*array_of(bounds, 2, f"point {name!r}"), f"point {name!r}", strict=True)
            for name, bounds in points.items()}


def _parameters(parameters, method: str, model: onnx.ModelProto) -> None:
    """``learned``: the points its ranges came from; any other method: its settings, JSON scalars."""
    if method == LEARNED:
        _points(fields_of(parameters, "field 'parameters'", ("points",))["points"], model)
        return
    if not isinstance(parameters, dict) or len(parameters) > MAX_PARAMETERS:
        raise Invalid(f"field 'parameters' must be an object of at most {MAX_PARAMETERS} settings")
    for key, value in parameters.items():
        what = f"parameter {quoted(key)}"
        if isinstance(value, (list, dict)):
            raise Invalid(f"{what} must be a number, string, boolean or null (got {kind(value)})")
        if isinstance(value, str):
            text_field(value, what)
        elif is_number(value):
            float32_number(value, what)


def _equalization(equalization, model: onnx.ModelProto) -> None:
    """What ``compute_ranges`` records: the channel scales, per channel space of the model, in [1, MAX_SCALE]."""
    fields_of(equalization, "field 'equalization'", ("max_scale", "per_channel_weights", "symmetric_activations", "scales"))
    bounded(equalization["max_scale"], 1.0, MAX_SCALE, "equalization max_scale")
    for key in ("per_channel_weights", "symmetric_activations"):
        if not isinstance(equalization[key], bool):
            raise Invalid(f"equalization {key} must be true or false (got {kind(equalization[key])})")
    channels = {space.key: space.channels for space in channel_spaces(model)}
    with within_section("its equalization scales do not fit this model's channel spaces"):
        scales = keys_exactly(equalization["scales"], channels, "field 'scales'", "scales", "channel space")
        for key, count in channels.items():
            for index, scale in enumerate(array_of(scales[key], count, f"the scales of {key!r}")):
                bounded(scale, 1.0, MAX_SCALE, f"{key!r}[{index}]")


def _nested(values, shape: list[int], what: str) -> None:
    """``values``: nested arrays of exactly ``shape`` (the initializer's, so as deep as its rank) of numbers."""
    if not shape:
        bounded(values, -MAGNITUDE_LIMIT, MAGNITUDE_LIMIT, what)
        return
    for index, item in enumerate(array_of(values, shape[0], what)):
        _nested(item, shape[1:], f"{what}[{index}]")


def _levels(text, count: int, what: str) -> None:
    """``count`` int8 levels in [-WEIGHT_QMAX, WEIGHT_QMAX], base64 (its length checked before decoding)."""
    problem = f"{what}: levels_int8_base64 must be the base64 of {count} int8 levels"
    if not isinstance(text, str) or len(text) != 4 * math.ceil(count / 3):
        raise Invalid(problem)
    try:
        levels = np.frombuffer(base64.b64decode(text, validate=True), np.int8)
    except ValueError:  # binascii.Error
        raise Invalid(problem) from None
    if levels.size != count:
        raise Invalid(problem)
    if np.any(levels < -WEIGHT_QMAX):
        raise Invalid(f"{what}: a level beyond +-{WEIGHT_QMAX}")


def _adapted_weights(entry, model: onnx.ModelProto) -> None:
    """``ptq.weights_entry``'s layout: a Conv weight (rank 4) as int8 levels and per-output-channel scales,
    a Conv bias as its values; each named and shaped as the model's initializer. No other initializer
    (a Resize's scales, say) may be replaced: that would change the graph, not its weights."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    adaptable = {name for node in convs for name in node.input[1:]}
    shapes = {init.name: list(init.dims) for init in model.graph.initializer if init.name in adaptable}
    with within_section("its adapted weights do not fit this model"):
        if not isinstance(entry, dict):
            raise Invalid(f"must be an object (got {kind(entry)})")
        for name, item in entry.items():
            if name not in shapes:
                raise Invalid(f"{quoted(name)} is not a Conv weight or bias of this model")
            shape, what = shapes[name], quoted(name)
            if len(shape) == 4:
                fields_of(item, what, ("shape", "scales", "levels_int8_base64"))
                exact_ints(item["shape"], shape, f"{what} shape")
                for index, scale in enumerate(array_of(item["scales"], shape[0], f"{what} scales")):
                    bounded(scale, MIN_SCALE, MAGNITUDE_LIMIT / WEIGHT_QMAX, f"{what} scales[{index}]")
                _levels(item["levels_int8_base64"], math.prod(shape), what)
            else:
                fields_of(item, what, ("shape", "values"))
                exact_ints(item["shape"], shape, f"{what} shape")
                _nested(item["values"], shape, f"{what} values")


def _step(step, index: int, tensors: Collection[str]) -> None:
    what = f"mixed_precision steps[{index}]"
    fields_of(step, what, ("promoted", "val_drop_db", "val_worst_drop_db", "latency_1080p_s", "latency_vs_int8",
                           "measured_latency_s"))
    for name in array_of(step["promoted"], None, f"{what} promoted"):
        if name not in tensors and name != FP32_STEP:
            raise Invalid(f"{what}: {quoted(str(name))} is not a quantized tensor of this model")
    for key in ("val_drop_db", "val_worst_drop_db"):
        bounded(step[key], -MAGNITUDE_LIMIT, MAGNITUDE_LIMIT, f"{what} {key}")
    for key in ("latency_1080p_s", "latency_vs_int8", "measured_latency_s"):
        bounded(step[key], 0, MAGNITUDE_LIMIT, f"{what} {key}")


def _mixed_precision(entry, tensors: Collection[str]) -> None:
    """The budget's search (``budget.search``): the tensors taken out of int8 must be quantized tensors of the
    model, each once; the steps and validation images are a record, checked for their form."""
    fields_of(entry, "field 'mixed_precision'", ("fallback", "max_drop_db", "tensors", "fp32", "runtime", "measured_on",
                                                 "fp32_latency_1080p_s", "steps", "val"))
    if entry["fallback"] not in FALLBACKS:
        raise Invalid(f"mixed_precision fallback must be one of {', '.join(FALLBACKS)}")
    bounded(entry["max_drop_db"], 0, MAGNITUDE_LIMIT, "mixed_precision max_drop_db")
    chosen = array_of(entry["tensors"], None, "mixed_precision tensors")
    for name in chosen:
        if name not in tensors:
            raise Invalid(f"mixed_precision tensors: {quoted(str(name))} is not a quantized tensor of this model")
    if len(set(chosen)) != len(chosen):
        raise Invalid("mixed_precision tensors: a tensor is named twice")
    if not isinstance(entry["fp32"], bool):
        raise Invalid(f"mixed_precision fp32 must be true or false (got {kind(entry['fp32'])})")
    if entry["runtime"] not in RUNTIMES:
        raise Invalid(f"mixed_precision runtime must be one of {', '.join(RUNTIMES)}")
    text_field(entry["measured_on"], "mixed_precision measured_on")
    bounded(entry["fp32_latency_1080p_s"], 0, MAGNITUDE_LIMIT, "mixed_precision fp32_latency_1080p_s")
    for index, step in enumerate(array_of(entry["steps"], None, "mixed_precision steps")[:2 * len(tensors) + 2]):
        _step(step, index, tensors)
    if len(entry["steps"]) > 2 * len(tensors) + 2:
        raise Invalid("mixed_precision steps: more steps than a search over this model's tensors takes")
    for index, item in enumerate(array_of(entry["val"], None, "mixed_precision val")):
        fields_of(item, f"mixed_precision val[{index}]", ("path", "sha256"))
        text_field(item["path"], f"mixed_precision val[{index}] path")
        sha256_text(item["sha256"], f"mixed_precision val[{index}] sha256")


def _document(document, model: onnx.ModelProto, where: Path) -> None:
    required = ("format", "model_sha256", "input_shape", "method", "parameters", "calibration_files", "tensors")
    optional = ("tool", "model", "preprocessing", "skipped", "coverage", "equalization", "tensors_of", "adapted_weights",
                "mixed_precision", SEAL_KEY)
    fields_of(document, "the ranges document", required, optional)
    if document["format"] != RANGES_FORMAT:
        raise Invalid(f"field 'format' must be {RANGES_FORMAT!r}")
    sha256_text(document["model_sha256"], "field 'model_sha256'")
    exact_ints(document["input_shape"], sr_model_shape(model, where, "--model")[0], "field 'input_shape'")
    if document["method"] not in METHODS:
        raise Invalid(f"field 'method' must be one of {', '.join(METHODS)}")
    _parameters(document["parameters"], document["method"], model)
    for index, item in enumerate(array_of(document["calibration_files"], None, "field 'calibration_files'")):
        fields_of(item, f"calibration_files[{index}]", ("path", "sha256"))
        text_field(item["path"], f"calibration_files[{index}] path")
        sha256_text(item["sha256"], f"calibration_files[{index}] sha256")
    if "coverage" in document:
        fields_of(document["coverage"], "field 'coverage'", ("images", "generator"))
        bounded(document["coverage"]["images"], 0, MAX_COVERAGE_IMAGES, "coverage images")
        text_field(document["coverage"]["generator"], "coverage generator")
    for index, item in enumerate(array_of(document.get("skipped", []), None, "field 'skipped'")):
        text_field(item, f"skipped[{index}]")
    for key in ("tool", "model", "preprocessing", "tensors_of", SEAL_KEY):
        if key in document and not (key == "preprocessing" and document[key] is None):  # None: no calibration
            text_field(document[key], f"field {key!r}")
    if document.get("equalization") is not None:
        _equalization(document["equalization"], model)
    _tensor_ranges(document["tensors"], float_tensors(model))
    if document.get("adapted_weights") is not None:
        _adapted_weights(document["adapted_weights"], model)
    if "mixed_precision" in document:
        _mixed_precision(document["mixed_precision"], document["tensors"].keys())


def check_ranges_document(document: dict, path: Path, model: onnx.ModelProto) -> None:
    """Refuse, in one line naming ``path``, a ranges document that is not exactly what this schema allows
    for ``model`` (the fp32 model it describes, before equalization)."""
    try:
        _document(document, model, path)
    except Invalid as problem:
        raise InputError(path, str(problem)) from None


def _integer(digits: str) -> int:
    """A JSON integer, refused past ``MAX_INTEGER_DIGITS`` (before Python's own 4,300-digit refusal,
    whose message advises programmers)."""
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise Invalid(f"an integer of {len(digits.lstrip('-')):,} digits, beyond any float32")
    return int(digits)


def _parse(data: bytes | str, limit: int):
    """The JSON value in ``data``; ``limit`` bytes (or characters) at most."""
    if len(data) > limit:
        raise Invalid(f"larger than {limit:,} bytes, the most read (ours are far smaller)")
    try:
        return json.loads(data, parse_int=_integer)
    except RecursionError:
        raise Invalid("nested deeper than the JSON parser allows") from None
    except ValueError as error:  # also bytes that are no Unicode text
        raise Invalid(str(error)) from None


def read_ranges(path: Path, model_path: Path) -> dict:
    """Load a saved ranges JSON, check it belongs to ``model_path`` and fits it whole."""
    if not path.is_file():  # a FIFO or a device would block or never end
        raise InputError(path, "not a regular file" if path.exists() else "no such ranges file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RANGES_BYTES + 1)  # never more than the cap, whatever the file's size
    except OSError as error:
        raise InputError(path, f"cannot read ({error.strerror})") from None
    try:
        document = _parse(data, MAX_RANGES_BYTES)
    except Invalid as problem:
        raise InputError(path, f"not a ranges JSON ({problem})") from None
    if not isinstance(document, dict) or document.get("format") != RANGES_FORMAT or "tensors" not in document:
        raise InputError(path, f"not a dipnet-deploy ranges file (format {RANGES_FORMAT})")
    if document.get("model_sha256") != sha256_file(model_path):
        made_for = document.get("model")
        named = f" ({quoted(made_for)})" if isinstance(made_for, str) else ""
        raise InputError(path, f"ranges were computed for another model{named}, not {model_path}")
    check_ranges_document(document, path, onnx.load(str(model_path)))
    return document


def learned_points(model: onnx.ModelProto, model_path: Path) -> dict[str, tuple[float, float]] | None:
    """The point ranges ``finetune`` learned and ``export`` stored in ``model``'s metadata
    (``qat.attach_learned_ranges``), checked whole against its graph; None when it carries none. (``load_onnx``
    refused a model with a metadata key twice.)"""
    stored = next((entry.value for entry in model.metadata_props if entry.key == LEARNED_RANGES_KEY), None)
    if stored is None:
        return None
    where = f"its learned ranges (metadata {LEARNED_RANGES_KEY!r})"
    try:
        document = _parse(stored, MAX_LEARNED_BYTES)
    except Invalid as problem:
        raise InputError(model_path, f"{where} are not JSON we can read ({problem})") from None
    try:
        fields_of(document, "the document", ("format", "points"), (SEAL_KEY,))
        if document["format"] != QAT_FORMAT:
            raise Invalid(f"field 'format' must be {QAT_FORMAT!r}")
        if SEAL_KEY in document:
            text_field(document[SEAL_KEY], f"field {SEAL_KEY!r}")
        return _points(document["points"], model)
    except Invalid as problem:
        raise InputError(model_path, f"{where}: {problem}") from None
