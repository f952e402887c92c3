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
import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from dipnet_deploy.equalize import MAX_SCALE, channel_spaces
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import SEAL_KEY, sha256_file
from dipnet_deploy.observers import OBSERVERS
from dipnet_deploy.onnx_model import sr_model_shape
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

RANGES_FORMAT = "dipnet-deploy-ranges/1"
LEARNED = "learned"  # --method: the ranges `finetune` learned, carried in the fp32 ONNX
AUTO = "auto"  # --method: max + equalization, refined for the model's output (ptq.py)
METHODS = (*OBSERVERS, AUTO, LEARNED)

# Real sizes: x2 ranges 15 KB, with `auto`'s adapted weights 160 KB, official x4 with them 0.4 MB, and
# ~150 bytes per calibration image; learned ranges 2.3 KB (x2, 35 points), 5 KB (x4, 67 points). Kept
# below safety.JSON_BYTES_LIMIT, so that a ranges file read here is one safety recognizes as ours.
MAX_RANGES_BYTES = 32 << 20
MAX_LEARNED_BYTES = 1 << 20
MAX_TEXT = 1 << 16  # characters of a path, a skip reason, a tool or method description
MAX_INTEGER_DIGITS = 39  # 10**39 > 2**128: no longer integer is finite as float32
MAX_COVERAGE_IMAGES = 1000  # generated coverage images (quantize --coverage)
MAX_PARAMETERS = 64  # `parameters` of a calibration method (auto's has 10)
MAGNITUDE_LIMIT = 1e18  # any range bound, weight (levels x scale) or bias value
MIN_SCALE = 1e-18  # a bias scale is activation x weight scale: >= 1e-36, still a normal float32
SHA256 = re.compile(r"[0-9a-f]{64}")


class _Invalid(Exception):
    """A problem inside a document; the entry points turn it into ``InputError(path, problem)``."""


@contextmanager
def _within_section(prefix: str) -> Iterator[None]:
    """Problems found inside the block read ``{prefix} ({problem})``."""
    try:
        yield
    except _Invalid as problem:
        raise _Invalid(f"{prefix} ({problem})") from None


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"an array of {len(value)}" if isinstance(value, list) else "an object"


def _quoted(key: str) -> str:
    """A key from the document, quoted (control characters escaped) and cut short."""
    return repr(key) if len(key) <= 80 else repr(key[:80]) + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float32(value, what: str) -> float:
    """``value`` if it is a JSON number that is finite as float32 (the document's own value, as a float)."""
    if not _is_number(value):
        raise _Invalid(f"{what} must be a number (got {_kind(value)})")
    if isinstance(value, int) and value.bit_length() > 128:  # float() of it may overflow even float64
        raise _Invalid(f"{what}: an integer of {value.bit_length()} bits is not finite as float32")
    value = float(value)
    with np.errstate(over="ignore"):  # the overflow is the finding, not a warning to print
        if not np.isfinite(np.float32(value)):
            raise _Invalid(f"{what} = {value:g} is not finite as float32")
    return value


def _bounded(value, low: float, high: float, what: str) -> float:
    number = _float32(value, what)
    if not low <= np.float32(number) <= high:
        raise _Invalid(f"{what} = {number:g} is not in [{low:g}, {high:g}]")
    return number


def _text(value, what: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _Invalid(f"{what} must be a string of at most {MAX_TEXT:,} characters (got {_kind(value)})")


def _array(value, count: int | None, what: str) -> list:
    """``value`` as a JSON array of ``count`` items (None: any number)."""
    if not isinstance(value, list) or count is not None and len(value) != count:
        raise _Invalid(f"{what} must be an array{f' of {count}' if count is not None else ''} (got {_kind(value)})")
    return value


def _fields(value, what: str, required: Collection[str], optional: Collection[str] = ()) -> dict:
    """``value`` as a JSON object with every ``required`` field and none beyond ``optional``."""
    if not isinstance(value, dict):
        raise _Invalid(f"{what} must be an object (got {_kind(value)})")
    missing = [key for key in required if key not in value]
    if missing:
        raise _Invalid(f"{what} has no field {missing[0]!r}")
    unknown = next((key for key in value if key not in required and key not in optional), None)
    if unknown is not None:
        raise _Invalid(f"{what} has an unknown field {_quoted(unknown)}")
    return value


def _keys_exactly(value, expected: Collection[str], what: str, item: str, noun: str) -> dict:
    """``value`` (``what``) as a JSON object keyed by exactly the names ``expected``: each a ``noun`` of the
    model, its value an ``item``."""
    if not isinstance(value, dict):
        raise _Invalid(f"{what} must be an object (got {_kind(value)})")
    missing = [name for name in expected if name not in value]
    if missing:
        raise _Invalid(f"no {item} for {noun} {missing[0]!r} ({len(missing)} of {len(expected)} missing)")
    known = set(expected)  # a crafted object may hold millions of keys: one set lookup each, up to the first stranger
    unknown = next((name for name in value if name not in known), None)
    if unknown is not None:
        raise _Invalid(f"{_quoted(unknown)} is not a {noun} of this model")
    return value


def _exactly(value, expected: list[int], what: str) -> None:
    """``value`` must be the integers ``expected`` (a shape): no floats, booleans or infinities."""
    if not (isinstance(value, list) and all(type(n) is int for n in value) and value == expected):
        raise _Invalid(f"{what} must be {expected}")


def _sha256(value, what: str) -> None:
    if not (isinstance(value, str) and SHA256.fullmatch(value)):
        raise _Invalid(f"{what} must be a sha256 in 64 lowercase hex digits")


def _activation_range(low, high, what: str, strict: bool) -> tuple[float, float]:
    """[low, high] of one quantized tensor: finite float32 within +-MAGNITUDE_LIMIT, min <= max (min < max
    when ``strict``), and, widened to hold 0 as the quantizer does, zero-width or at least
    ``ACTIVATION_LEVELS`` x ``MIN_SCALE`` wide."""
    low, high = _float32(low, f"{what}: min"), _float32(high, f"{what}: max")
    low32, high32 = np.float32(low), np.float32(high)
    if max(abs(low32), abs(high32)) > MAGNITUDE_LIMIT:
        raise _Invalid(f"{what}: range [{low:g}, {high:g}] reaches beyond +-{MAGNITUDE_LIMIT:g}")
    if not (low32 < high32 if strict else low32 <= high32):
        raise _Invalid(f"{what}: range [{low:g}, {high:g}] does not have min {'<' if strict else '<='} max")
    width = float(max(high32, 0)) - float(min(low32, 0))
    if 0 < width < ACTIVATION_LEVELS * MIN_SCALE:
        raise _Invalid(f"{what}: range [{low:g}, {high:g}] is too narrow for a nonzero float32 quantization step")
    return low, high


def _describe(entry) -> str:
    if isinstance(entry, dict):
        return "an object of " + ", ".join(f"{_quoted(key)}: {_kind(value)}" for key, value in list(entry.items())[:4])
    return _kind(entry)


def _tensor_ranges(tensors, needed: list[str]) -> None:
    """Exactly the ``needed`` tensors (the first is the image input), each ``{"min": x, "max": y}``."""
    _keys_exactly(tensors, needed, "field 'tensors'", "range", "tensor")
    for name in needed:
        entry = tensors[name]
        if not (isinstance(entry, dict) and set(entry) == {"min", "max"} and all(map(_is_number, entry.values()))):
            raise _Invalid(f"tensor {name!r}: min and max must be numbers, an object of those two (got {_describe(entry)})")
        _activation_range(entry["min"], entry["max"], f"tensor {name!r}", strict=False)
    problem = flat_input_problem(tensors[needed[0]]["min"], tensors[needed[0]]["max"])
    if problem:
        raise _Invalid(problem)


def flat_input_problem(low: float, high: float) -> str | None:
    """What is wrong with an image input range of one value (calibration images that are all flat), or None."""
    if np.float32(low) == np.float32(high):
        return f"the input range is [{low}, {high}]: calibrated on flat images only"
    return None


def _points(points, model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Learned point ranges (``qat`` names): exactly the model's learnable points, each [min, max], min < max."""
    learnable = {range_owner(name) for name in onnx_point_names(model.graph).values()} - set(FIXED_POINTS)
    _keys_exactly(points, sorted(learnable), "field 'points'", "range", "learnable quantization point")
    return {name: _activation_range(*_array(bounds, 2, f"point {name!r}"), f"point {name!r}", strict=True)
            for name, bounds in points.items()}


def _parameters(parameters, method: str, model: onnx.ModelProto) -> None:
    """``learned``: the points its ranges came from; any other method: its settings, JSON scalars."""
    if method == LEARNED:
        _points(_fields(parameters, "field 'parameters'", ("points",))["points"], model)
        return
    if not isinstance(parameters, dict) or len(parameters) > MAX_PARAMETERS:
        raise _Invalid(f"field 'parameters' must be an object of at most {MAX_PARAMETERS} settings")
    for key, value in parameters.items():
        what = f"parameter {_quoted(key)}"
        if isinstance(value, (list, dict)):
            raise _Invalid(f"{what} must be a number, string, boolean or null (got {_kind(value)})")
        if isinstance(value, str):
            _text(value, what)
        elif _is_number(value):
            _float32(value, what)


def _equalization(equalization, model: onnx.ModelProto) -> None:
    """What ``compute_ranges`` records: the channel scales, per channel space of the model, in [1, MAX_SCALE]."""
    _fields(equalization, "field 'equalization'", ("max_scale", "per_channel_weights", "symmetric_activations", "scales"))
    _bounded(equalization["max_scale"], 1.0, MAX_SCALE, "equalization max_scale")
    for key in ("per_channel_weights", "symmetric_activations"):
        if not isinstance(equalization[key], bool):
            raise _Invalid(f"equalization {key} must be true or false (got {_kind(equalization[key])})")
    channels = {space.key: space.channels for space in channel_spaces(model)}
    with _within_section("its equalization scales do not fit this model's channel spaces"):
        scales = _keys_exactly(equalization["scales"], channels, "field 'scales'", "scales", "channel space")
        for key, count in channels.items():
            for index, scale in enumerate(_array(scales[key], count, f"the scales of {key!r}")):
                _bounded(scale, 1.0, MAX_SCALE, f"{key!r}[{index}]")


def _nested(values, shape: list[int], what: str) -> None:
    """``values``: nested arrays of exactly ``shape`` (the initializer's, so as deep as its rank) of numbers."""
    if not shape:
        _bounded(values, -MAGNITUDE_LIMIT, MAGNITUDE_LIMIT, what)
        return
    for index, item in enumerate(_array(values, shape[0], what)):
        _nested(item, shape[1:], f"{what}[{index}]")


def _levels(text, count: int, what: str) -> None:
    """``count`` int8 levels in [-WEIGHT_QMAX, WEIGHT_QMAX], base64 (its length checked before decoding)."""
    problem = f"{what}: levels_int8_base64 must be the base64 of {count} int8 levels"
    if not isinstance(text, str) or len(text) != 4 * math.ceil(count / 3):
        raise _Invalid(problem)
    try:
        levels = np.frombuffer(base64.b64decode(text, validate=True), np.int8)
    except ValueError:  # binascii.Error
        raise _Invalid(problem) from None
    if levels.size != count:
        raise _Invalid(problem)
    if np.any(levels < -WEIGHT_QMAX):
        raise _Invalid(f"{what}: a level beyond +-{WEIGHT_QMAX}")


def _adapted_weights(entry, model: onnx.ModelProto) -> None:
    """``ptq.weights_entry``'s layout: a Conv weight (rank 4) as int8 levels and per-output-channel scales,
    a Conv bias as its values; each named and shaped as the model's initializer. No other initializer
    (a Resize's scales, say) may be replaced: that would change the graph, not its weights."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    adaptable = {name for node in convs for name in node.input[1:]}
    shapes = {init.name: list(init.dims) for init in model.graph.initializer if init.name in adaptable}
    with _within_section("its adapted weights do not fit this model"):
        if not isinstance(entry, dict):
            raise _Invalid(f"must be an object (got {_kind(entry)})")
        for name, item in entry.items():
            if name not in shapes:
                raise _Invalid(f"{_quoted(name)} is not a Conv weight or bias of this model")
            shape, what = shapes[name], _quoted(name)
            if len(shape) == 4:
                _fields(item, what, ("shape", "scales", "levels_int8_base64"))
                _exactly(item["shape"], shape, f"{what} shape")
                for index, scale in enumerate(_array(item["scales"], shape[0], f"{what} scales")):
                    _bounded(scale, MIN_SCALE, MAGNITUDE_LIMIT / WEIGHT_QMAX, f"{what} scales[{index}]")
                _levels(item["levels_int8_base64"], math.prod(shape), what)
            else:
                _fields(item, what, ("shape", "values"))
                _exactly(item["shape"], shape, f"{what} shape")
                _nested(item["values"], shape, f"{what} values")


def _document(document, model: onnx.ModelProto, where: Path) -> None:
    required = ("format", "model_sha256", "input_shape", "method", "parameters", "calibration_files", "tensors")
    optional = ("tool", "model", "preprocessing", "skipped", "coverage", "equalization", "tensors_of", "adapted_weights",
                SEAL_KEY)
    _fields(document, "the ranges document", required, optional)
    if document["format"] != RANGES_FORMAT:
        raise _Invalid(f"field 'format' must be {RANGES_FORMAT!r}")
    _sha256(document["model_sha256"], "field 'model_sha256'")
    _exactly(document["input_shape"], sr_model_shape(model, where, "--model")[0], "field 'input_shape'")
    if document["method"] not in METHODS:
        raise _Invalid(f"field 'method' must be one of {', '.join(METHODS)}")
    _parameters(document["parameters"], document["method"], model)
    for index, item in enumerate(_array(document["calibration_files"], None, "field 'calibration_files'")):
        _fields(item, f"calibration_files[{index}]", ("path", "sha256"))
        _text(item["path"], f"calibration_files[{index}] path")
        _sha256(item["sha256"], f"calibration_files[{index}] sha256")
    if "coverage" in document:
        _fields(document["coverage"], "field 'coverage'", ("images", "generator"))
        _bounded(document["coverage"]["images"], 0, MAX_COVERAGE_IMAGES, "coverage images")
        _text(document["coverage"]["generator"], "coverage generator")
    for index, item in enumerate(_array(document.get("skipped", []), None, "field 'skipped'")):
        _text(item, f"skipped[{index}]")
    for key in ("tool", "model", "preprocessing", "tensors_of", SEAL_KEY):
        if key in document and not (key == "preprocessing" and document[key] is None):  # None: no calibration
            _text(document[key], f"field {key!r}")
    if document.get("equalization") is not None:
        _equalization(document["equalization"], model)
    _tensor_ranges(document["tensors"], float_tensors(model))
    if document.get("adapted_weights") is not None:
        _adapted_weights(document["adapted_weights"], model)


def check_ranges_document(document: dict, path: Path, model: onnx.ModelProto) -> None:
    """Refuse, in one line naming ``path``, a ranges document that is not exactly what this schema allows
    for ``model`` (the fp32 model it describes, before equalization)."""
    try:
        _document(document, model, path)
    except _Invalid as problem:
        raise InputError(path, str(problem)) from None


def _integer(digits: str) -> int:
    """A JSON integer, refused past ``MAX_INTEGER_DIGITS`` (before Python's own 4,300-digit refusal,
    whose message advises programmers)."""
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _Invalid(f"an integer of {len(digits.lstrip('-')):,} digits, beyond any float32")
    return int(digits)


def _parse(data: bytes | str, limit: int):
    """The JSON value in ``data``; ``limit`` bytes (or characters) at most."""
    if len(data) > limit:
        raise _Invalid(f"larger than {limit:,} bytes, the most read (ours are far smaller)")
    try:
        return json.loads(data, parse_int=_integer)
    except RecursionError:
        raise _Invalid("nested deeper than the JSON parser allows") from None
    except ValueError as error:  # also bytes that are no Unicode text
        raise _Invalid(str(error)) from None


def read_ranges(path: Path, model_path: Path) -> dict:
    """Load a saved ranges JSON, check it belongs to ``model_path`` and fits it whole."""
    if not path.is_file():
        raise InputError(path, "no such ranges file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RANGES_BYTES + 1)  # never more than the cap, whatever the file's size
    except OSError as error:
        raise InputError(path, f"cannot read ({error.strerror})") from None
    try:
        document = _parse(data, MAX_RANGES_BYTES)
    except _Invalid as problem:
        raise InputError(path, f"not a ranges JSON ({problem})") from None
    if not isinstance(document, dict) or document.get("format") != RANGES_FORMAT or "tensors" not in document:
        raise InputError(path, f"not a dipnet-deploy ranges file (format {RANGES_FORMAT})")
    if document.get("model_sha256") != sha256_file(model_path):
        made_for = document.get("model")
        named = f" ({_quoted(made_for)})" if isinstance(made_for, str) else ""
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
    except _Invalid as problem:
        raise InputError(model_path, f"{where} are not JSON we can read ({problem})") from None
    try:
        _fields(document, "the document", ("format", "points"), (SEAL_KEY,))
        if document["format"] != QAT_FORMAT:
            raise _Invalid(f"field 'format' must be {QAT_FORMAT!r}")
        if SEAL_KEY in document:
            _text(document[SEAL_KEY], f"field {SEAL_KEY!r}")
        return _points(document["points"], model)
    except _Invalid as problem:
        raise InputError(model_path, f"{where}: {problem}") from None
