"""Crafted ranges: a ranges document given to ``quantize --ranges FILE`` and the learned ranges an ONNX carries
for ``quantize --method learned`` (metadata ``dipnet_deploy.learned_ranges``). Each is refused in one stderr line
naming the file, exit code 2, no traceback, nothing written; the tool's own documents keep working."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import onnx
import pytest
import torch

from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.errors import InputError
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.ptq import AutoOptions, point_ranges
from dipnet_deploy.qat import LEARNED_RANGES_KEY, attach_learned_ranges
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.ranges_schema import MAX_RANGES_BYTES, check_ranges_document

from .conftest import random_train_model, refused, snapshot, write_images

SIDE = 64
WEIGHT, BIAS = "conv_1.weight", "block_1.esa.conv1.bias"  # x4-ntire: [44, 3, 3, 3] and [16]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A random x4-ntire (E = 8; ESA: biased convs, MaxPool, Resize, Mul) at 64x64; its `auto` ranges
    (equalization and adapted weights and biases: every section of the schema); the same ONNX carrying learned
    ranges (its max ranges, as `export` stores a finetune's) and the ranges document `--method learned` made
    from them."""
    work = tmp_path_factory.mktemp("ranges")
    torch.save(random_train_model(PRESETS["x4-ntire"].replace(expansion=8)).state_dict(), work / "w.pth")
    fp32 = export(load_checkpoint(work / "w.pth"), work / "m.onnx", ExportOptions(SIDE, SIDE)).onnx_path
    write_images(work / "calib", 2)
    quiet = lambda _m: None  # noqa: E731
    auto = QuantizeOptions(method="auto", auto=AutoOptions(iters=2, batch=2, crop=32))
    auto_ranges = quantize(fp32, work / "auto.int8.onnx", work / "calib", None, auto, warn=quiet).ranges_path
    plain = quantize(fp32, work / "max.int8.onnx", work / "calib", None, QuantizeOptions(equalize=False), warn=quiet)
    tensors = {name: (r["min"], r["max"]) for name, r in json.loads(plain.ranges_path.read_text())["tensors"].items()}
    model = onnx.load(str(fp32))
    attach_learned_ranges(model, point_ranges(model.graph, tensors))
    onnx.save(model, str(work / "ft.onnx"))
    learned = quantize(work / "ft.onnx", options=QuantizeOptions(method="learned", equalize=False), warn=quiet)
    return {"fp32": fp32, "auto_ranges": auto_ranges, "ft": work / "ft.onnx", "learned": learned}


def _text(craft, document: dict) -> str | bytes:
    """What ``craft`` makes of ``document``: the text it returns, else the document it changed, as JSON."""
    made = craft(document)
    return json.dumps(document) if made is None else made


def _with_raw(document: dict, place, raw: str) -> str:
    """``document`` as JSON with ``raw`` (text json.dumps cannot write) where ``place`` puts a marker."""
    place(document, "@RAW@")
    return json.dumps(document).replace('"@RAW@"', raw)


def _drop(container: dict | list, key) -> None:
    del container[key]


def _levels_base64(levels: np.ndarray) -> str:
    return base64.b64encode(levels.astype(np.int8).tobytes()).decode("ascii")


def _tensor(document: dict, index: int) -> dict:
    return document["tensors"][list(document["tensors"])[index]]


def _first_space(document: dict) -> list:
    return next(iter(document["equalization"]["scales"].values()))


# ``--ranges FILE``: crafted from the tiny model's `auto` document. Each: (craft, words of the refusal).
RANGES = {
    "nesting 100,000 deep": (lambda d: '{"format": "dipnet-deploy-ranges/1", "tensors": ' + "[" * 100_000 + "]" * 100_000
                             + "}", "nested deeper"),
    "401-digit integer": (lambda d: _tensor(d, 1).update(max=10**400), "an integer of 401 digits, beyond any float32"),
    "5,000-digit integer": (lambda d: _with_raw(d, lambda d, m: _tensor(d, 1).update(max=m), "9" * 5000),
                            "an integer of 5,000 digits"),
    "40-digit integer": (lambda d: _tensor(d, 1).update(max=-(10**39)), "an integer of 40 digits"),
    "1e39 as a 39-digit integer": (lambda d: _tensor(d, 1).update(max=10**38 * 9), "not finite as float32"),
    "extra tensor entry a string": (lambda d: d["tensors"].update(extra="wide"), "'extra' is not a tensor of this model"),
    "Infinity in an adapted shape": (lambda d: d["adapted_weights"][WEIGHT]["shape"].__setitem__(0, math.inf),
                                     "shape must be [44, 3, 3, 3]"),
    "true in the input shape": (lambda d: d.update(input_shape=[True, 3, SIDE, SIDE]), "'input_shape' must be"),
    "min -1e39": (lambda d: _tensor(d, 1).update(min=-1e39), "not finite as float32"),
    "max 1e39": (lambda d: _tensor(d, 2).update(max=1e39), "not finite as float32"),
    "NaN min": (lambda d: _tensor(d, 1).update(min=math.nan), "not finite"),
    "range beyond 1e18": (lambda d: _tensor(d, 1).update(min=-1e20), "reaches beyond"),
    "range too narrow for a step": (lambda d: _tensor(d, 2).update(min=0.0, max=1e-30), "too narrow"),
    "min > max": (lambda d: _tensor(d, 2).update(min=3.0, max=1.0), "min <= max"),
    "flat input": (lambda d: _tensor(d, 0).update(min=0.5, max=0.5), "flat images"),
    "tensor entry with a third field": (lambda d: _tensor(d, 1).update(mean=0.0), "min and max must be numbers"),
    "equalization scale 1e-45": (lambda d: _first_space(d).__setitem__(0, 1e-45), "is not in [1, 64]"),
    "equalization scale 1e6": (lambda d: _first_space(d).__setitem__(0, 1e6), "is not in [1, 64]"),
    "equalization scales one short": (lambda d: _drop(_first_space(d), -1), "equalization scales do not fit"),
    "equalization of an unknown channel space": (lambda d: d["equalization"]["scales"].update(ghost=[1.0]),
                                                 "'ghost' is not a channel space"),
    "equalization max_scale a string": (lambda d: d["equalization"].update(max_scale="64"), "max_scale must be a number"),
    "weight scale 1e38": (lambda d: d["adapted_weights"][WEIGHT]["scales"].__setitem__(0, 1e38), "is not in [1e-18"),
    "weight scale 0": (lambda d: d["adapted_weights"][WEIGHT]["scales"].__setitem__(0, 0.0), "is not in [1e-18"),
    "weight scales one short": (lambda d: _drop(d["adapted_weights"][WEIGHT]["scales"], -1), "must be an array of 44"),
    "5 levels for 1,188 weights": (lambda d: d["adapted_weights"][WEIGHT].update(levels_int8_base64=_levels_base64(
        np.ones(5))), "adapted weights do not fit"),
    "level -128": (lambda d: d["adapted_weights"][WEIGHT].update(levels_int8_base64=_levels_base64(
        np.full(44 * 27, -128))), "beyond +-127"),
    "levels not base64": (lambda d: d["adapted_weights"][WEIGHT].update(levels_int8_base64="*" * 1584),
                          "levels_int8_base64 must be"),
    "bias values one short": (lambda d: _drop(d["adapted_weights"][BIAS]["values"], -1), "must be an array of 16"),
    "bias value a string": (lambda d: d["adapted_weights"][BIAS]["values"].__setitem__(0, "0"), "must be a number"),
    "adapted weight of an unknown initializer": (lambda d: d["adapted_weights"].update(ghost=d["adapted_weights"][BIAS]),
                                                 "'ghost' is not a Conv weight or bias"),
    "unknown top-level field": (lambda d: d.update(extra=[[[]]]), "unknown field 'extra'"),
    "seal not a string": (lambda d: d.update(seal={"sha256": 1}), "'seal' must be a string"),
    "unknown method": (lambda d: d.update(method="magic"), "'method' must be one of"),
    "parameters holding an array": (lambda d: d["parameters"].update(iters=[1]), "must be a number, string, boolean"),
    "calibration file sha256 not hex": (lambda d: d["calibration_files"][0].update(sha256="x" * 64), "sha256"),
    "skipped holding a number": (lambda d: d.update(skipped=[1]), "skipped[0] must be a string"),
    "no calibration_files": (lambda d: _drop(d, "calibration_files"), "'calibration_files'"),
    "another model, named with a newline": (lambda d: d.update(model_sha256="0" * 64, model="evil\nname"),
                                            "another model"),
    "document an array": (lambda d: "[]", "not a dipnet-deploy ranges file"),
    "not UTF-8": (lambda d: b"\x80\x81{}", "not a ranges JSON ('utf-8' codec can't decode"),
    "file over the size cap": (lambda d: json.dumps(d) + " " * MAX_RANGES_BYTES, "larger than 33,554,432 bytes"),
}


@pytest.mark.parametrize("case", sorted(RANGES))
def test_crafted_ranges_file_refused(case, tiny, tmp_path, invoke):
    craft, words = RANGES[case]
    text = _text(craft, json.loads(tiny["auto_ranges"].read_text()))
    (tmp_path / "m.onnx").write_bytes(tiny["fp32"].read_bytes())
    bad = tmp_path / "bad.ranges.json"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(tmp_path)
    result = invoke("quantize", "--model", tmp_path / "m.onnx", "--ranges", bad, "-o", tmp_path / "q.int8.onnx")
    refused(result, str(bad), before, tmp_path)
    assert words in result[2], result[2]


def test_crafted_points_in_a_learned_ranges_file_refused(tiny, tmp_path, invoke):
    """A `--method learned` document keeps its points in ``parameters``: checked as the metadata's are."""
    document = json.loads(tiny["learned"].ranges_path.read_text())
    document["parameters"]["points"] = list(document["parameters"]["points"].items())
    bad = tmp_path / "bad.ranges.json"
    bad.write_text(json.dumps(document))
    (tmp_path / "ft.onnx").write_bytes(tiny["ft"].read_bytes())
    before = snapshot(tmp_path)
    result = invoke("quantize", "--model", tmp_path / "ft.onnx", "--ranges", bad, "-o", tmp_path / "q.int8.onnx")
    refused(result, str(bad), before, tmp_path)
    assert "field 'points' must be an object" in result[2]


@pytest.mark.parametrize("case, words", [
    ("min -1e39", "not finite as float32"),  # finite in float64; float32(-1e39) is -inf, and so is its scale
    ("max 1e39", "not finite as float32"),
    ("1e39 as a 39-digit integer", "not finite as float32"),
    ("401-digit integer", "bits is not finite as float32"),  # in memory: float() of it would raise OverflowError
    ("equalization scale 1e-45", "is not in [1, 64]"),  # a subnormal float32: weights / 1e-45 overflow
    ("weight scale 1e38", "is not in [1e-18"),  # 127 levels x 1e38 overflows float32
])
def test_numbers_beyond_float32_are_refused(case, words, tiny):
    """The float64-finite cases passed the old checks and wrote an int8 model with infinite scales; the schema
    judges every number in float32, also in a document given to it in memory."""
    document = json.loads(tiny["auto_ranges"].read_text())
    RANGES[case][0](document)
    with pytest.raises(InputError) as raised:
        check_ranges_document(document, tiny["auto_ranges"], onnx.load(str(tiny["fp32"])))
    assert words in raised.value.problem and raised.value.where == str(tiny["auto_ranges"])


def test_adapted_weights_replace_only_conv_weights_and_biases(tiny):
    """Another initializer (here the Resize's scales of an ESA, shaped [4]) would change the graph: refused."""
    model = onnx.load(str(tiny["fp32"]))
    conv_inputs = {name for node in model.graph.node if node.op_type == "Conv" for name in node.input}
    (other,) = [init for init in model.graph.initializer if init.name not in conv_inputs]
    document = json.loads(tiny["auto_ranges"].read_text())
    document["adapted_weights"][other.name] = {"shape": list(other.dims), "values": [1.0, 1.0, 1e9, 1e9]}
    with pytest.raises(InputError) as raised:
        check_ranges_document(document, tiny["auto_ranges"], model)
    assert f"{other.name!r} is not a Conv weight or bias" in raised.value.problem


def _points(document: dict) -> list[str]:
    return sorted(document["points"])


# ``--method learned``: crafted from the metadata document {"format", "points"} the tiny ONNX carries. A craft
# returns the text of the entry, or None (the document it changed).
LEARNED = {
    "malformed JSON": (lambda d: '{"format": "dipnet-deploy-qat/1", "points": {', "are not JSON we can read (Expecting"),
    "a range of three numbers": (lambda d: d["points"].update({_points(d)[0]: [0.0, 1.0, 2.0]}), "must be an array of 2"),
    "a million-number range": (lambda d: d["points"].update({_points(d)[0]: [0.5] * 1_000_000}), "larger than 1,048,576 bytes"),
    "a range of strings": (lambda d: d["points"].update({_points(d)[0]: ["0", "1"]}), "must be a number (got a string)"),
    "min -1e39": (lambda d: d["points"][_points(d)[0]].__setitem__(0, -1e39), "not finite as float32"),
    "max 1e39": (lambda d: d["points"][_points(d)[0]].__setitem__(1, 1e39), "not finite as float32"),
    "401-digit integer": (lambda d: d["points"][_points(d)[0]].__setitem__(1, 10**400), "integer of 401 digits"),
    "Infinity": (lambda d: d["points"][_points(d)[0]].__setitem__(1, math.inf), "not finite as float32"),
    "range beyond 1e18": (lambda d: d["points"][_points(d)[0]].__setitem__(0, -1e19), "reaches beyond"),
    "min equal to max": (lambda d: d["points"].update({_points(d)[0]: [0.5, 0.5]}), "min < max"),
    "no points": (lambda d: _drop(d, "points"), "has no field 'points'"),
    "points a list": (lambda d: d.update(points=list(d["points"].items())), "field 'points' must be an object"),
    "points empty": (lambda d: d.update(points={}), "no range for learnable quantization point"),
    "an unknown point": (lambda d: d["points"].update(ghost=[0.0, 1.0]), "'ghost' is not a learnable quantization point"),
    "a fixed point": (lambda d: d["points"].update(input=[0.0, 1.0]), "'input' is not a learnable quantization point"),
    "the document an array": (lambda d: json.dumps([d]), "the document must be an object"),
    "another format": (lambda d: d.update(format="dipnet-deploy-qat/9"), "'format' must be"),
    "an unknown field": (lambda d: d.update(note="x"), "unknown field 'note'"),
    "nesting 100,000 deep": (lambda d: '{"points": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
}


@pytest.mark.parametrize("case", sorted(LEARNED))
def test_crafted_learned_ranges_refused(case, tiny, tmp_path, invoke):
    craft, words = LEARNED[case]
    model = onnx.load(str(tiny["ft"]))
    (entry,) = [entry for entry in model.metadata_props if entry.key == LEARNED_RANGES_KEY]
    entry.value = _text(craft, json.loads(entry.value))
    path = tmp_path / "ft.onnx"
    onnx.save(model, str(path))
    before = snapshot(tmp_path)
    result = invoke("quantize", "--model", path, "--method", "learned")
    refused(result, str(path), before, tmp_path)
    assert words in result[2], result[2]


def test_the_tools_own_documents_pass_with_or_without_a_seal(tiny):
    """What `auto` and `learned` wrote passes the schema whole; a top-level ``seal`` string is accepted and ignored."""
    for ranges_path, model_path in ((tiny["auto_ranges"], tiny["fp32"]), (tiny["learned"].ranges_path, tiny["ft"])):
        model = onnx.load(str(model_path))
        document = json.loads(ranges_path.read_text())
        for seal in ({}, {"seal": "sha256:" + "0" * 64}):
            check_ranges_document({key: value for key, value in document.items() if key != "seal"} | seal,
                                  ranges_path, model)


def test_learned_ranges_reuse_is_byte_identical(tiny, tmp_path, invoke):
    """The learned path reads its points through the schema, and so does a reuse of its ranges file: same bytes."""
    code, _, err = invoke("quantize", "--model", tiny["ft"], "--ranges", tiny["learned"].ranges_path,
                          "-o", tmp_path / "again.int8.onnx")
    assert code == 0, err
    assert (tmp_path / "again.int8.onnx").read_bytes() == tiny["learned"].int8_path.read_bytes()
    card = json.loads((tmp_path / "again.int8.json").read_text())
    assert card["simulation_agreement"] == json.loads(tiny["learned"].card_path.read_text())["simulation_agreement"]
