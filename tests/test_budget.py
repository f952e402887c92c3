"""quantize --max-drop: the search's record against an independent scoring, the no-op and replay byte for
byte, the fp32 end, and bad input."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import onnx
import pytest

from dipnet_deploy.budget import BudgetOptions
from dipnet_deploy.compare import CompareOptions, compare
from dipnet_deploy.imageio import read_rgb8
from dipnet_deploy.metrics import psnr
from dipnet_deploy.qdq_graph import dequantize_early
from dipnet_deploy.qdq_pairs import activation_pairs, float_fallback
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.report import write_report
from dipnet_deploy.sr_protocol import make_pair
from dipnet_deploy.tiling import TiledRunner

from .conftest import exact_openvino_int8, refused, snapshot

PLAIN = QuantizeOptions(equalize=False)  # what the `models` fixture's int8 model was written with


def _val(work):
    """Sharp noise: the calibration images are blurred, so their ranges clip these and int8 loses on them."""
    folder = work / "val"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    for index in range(3):
        cv2.imwrite(str(folder / f"val{index}.png"), (rng.random((48, 64, 3)) * 255).astype(np.uint8))
    return folder


def _dim_calibration(work):
    """Low-contrast images: ranges that the validation's full-contrast noise overruns (activation clipping, which
    taking tensors out of int8 undoes, outweighs the int8 weights' error)."""
    folder = work / "dim"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    for index in range(2):
        cv2.imwrite(str(folder / f"dim{index}.png"), (110 + rng.random((48, 64, 3)) * 30).astype(np.uint8))
    return folder


def _budget(work, max_drop: float, name: str, calib: str = "calib"):
    options = QuantizeOptions(equalize=False, budget=BudgetOptions(max_drop, _val(work), repeats=1))
    folder = _dim_calibration(work) if calib == "dim" else work / calib
    result = quantize(work / "m.onnx", work / f"{name}.int8.onnx", folder, options=options)
    return result, json.loads(result.ranges_path.read_text())["mixed_precision"]


def _drops(model, work) -> np.ndarray:
    """Each validation image's PSNR-Y drop of ``model`` against the fp32 model, scored here from scratch."""
    fp32, other = TiledRunner(str(work / "m.onnx")), TiledRunner(str(model))
    drops = []
    for path in sorted((work / "val").iterdir()):
        hr, lr = make_pair(read_rgb8(path)[0], 2)
        drops.append(psnr(fp32.run_rgb8(lr)[0], hr, 2, True) - psnr(other.run_rgb8(lr)[0], hr, 2, True))
    return np.array(drops)


def test_a_budget_under_the_int8_drop_is_met_and_the_record_is_what_the_model_scores(work):
    pure, record = _budget(work, 1e3, "pure", "dim")
    int8_drop = record["steps"][0]["val_drop_db"]
    early = dequantize_early(onnx.load(str(pure.int8_path)))
    onnx.save(float_fallback(early, activation_pairs(early)), str(work / "activations_float.onnx"))
    floor = _drops(work / "activations_float.onnx", work).mean()  # the int8 weights' share alone
    assert int8_drop - floor > 1e-4  # the activations lose something: a budget between the two is to meet
    max_drop = (int8_drop + floor) / 2
    result, record = _budget(work, max_drop, "mixed", "dim")
    chosen = record["steps"][-1]
    assert not record["fp32"] and chosen["val_drop_db"] <= max_drop
    assert record["tensors"] and len(record["steps"]) == len(record["tensors"]) + 1
    assert [step["promoted"] for step in record["steps"][1:]] == [[name] for name in record["tensors"]]
    drops = _drops(result.int8_path, work)
    assert math.isclose(drops.mean(), chosen["val_drop_db"], abs_tol=1e-9)
    assert math.isclose(drops.max(), chosen["val_worst_drop_db"], abs_tol=1e-9)
    quantized = {node.input[0] for node in onnx.load(str(result.int8_path)).graph.node if node.op_type == "QuantizeLinear"}
    assert not quantized & set(record["tensors"])  # the named tensors are float in the model written
    card = json.loads(result.card_path.read_text())["mixed_precision"]
    assert card["tensors_out_of_int8"] == record["tensors"] and len(card["steps"]) == len(record["steps"])
    assert result.summary["budget"]["tensors_out_of_int8"] == len(record["tensors"])
    replay = quantize(work / "m.onnx", work / "replay.int8.onnx", ranges_path=result.ranges_path, options=PLAIN)
    assert replay.int8_path.read_bytes() == result.int8_path.read_bytes()
    comparison = compare(work / "m.onnx", result.int8_path, work / "hr", CompareOptions(latency_repeats=1))
    document = write_report(comparison, work / "report")
    assert document["int8_origin"]["mixed_precision"]["tensors_out_of_int8"] == record["tensors"]
    page = (work / "report" / "report.md").read_text()
    assert "## Quality budget" in page and all(name in page for name in record["tensors"])


def test_a_budget_int8_already_keeps_gives_the_plain_model_byte_for_byte(work):
    result, record = _budget(work, 1e3, "noop")
    assert record["tensors"] == [] and len(record["steps"]) == 1
    assert result.int8_path.read_bytes() == (work / "m.int8.onnx").read_bytes()


def test_a_budget_of_zero_ends_at_a_model_that_keeps_it(work):
    result, record = _budget(work, 0.0, "zero")
    assert record["steps"][-1]["val_drop_db"] <= 0
    if record["fp32"]:  # every activation out of int8 was not enough: the fp32 model itself
        assert result.int8_path.read_bytes() == (work / "m.onnx").read_bytes()
    else:
        assert _drops(result.int8_path, work).mean() <= 0


@pytest.mark.parametrize("args, names", [
    (["--max-drop", "-1"], "--max-drop"),
    (["--max-drop", "nan"], "--max-drop"),
    (["--max-drop", "inf"], "--max-drop"),
    (["--max-drop", "0.1"], "--max-drop and --val"),
    (["--max-drop", "0.1", "--val", "{empty}"], "empty"),
    (["--max-drop", "0.1", "--val", "{calib}"], "calibration image"),
    (["--max-drop", "0.1", "--val", "{val}", "--ranges", "{ranges}"], "--max-drop"),
])
def test_bad_budget_input_is_one_line_and_writes_nothing(args, names, work, invoke):
    (work / "empty").mkdir()
    _val(work)
    folders = {"empty": work / "empty", "calib": work / "calib", "val": work / "val", "ranges": work / "m.ranges.json"}
    args = [arg.format(**folders) for arg in args]
    calib = [] if "--ranges" in args else ["--calib", str(work / "calib")]
    before = snapshot(work)
    refused(invoke("quantize", "--model", work / "m.onnx", *calib, "-o", work / "b.int8.onnx", "--no-equalize", "--method", "max",
                   *args), names, before, work)


def test_a_crafted_mixed_precision_entry_is_refused_in_one_line(work, invoke):
    result, _ = _budget(work, 1e3, "crafted")
    document = json.loads(result.ranges_path.read_text())
    for entry, words in [({"tensors": ["not_a_tensor"]}, "not a quantized tensor"),
                         ({"fallback": "int4"}, "fallback"), ({"fp32": "yes"}, "fp32")]:
        crafted = work / "crafted.json"
        crafted.write_text(json.dumps(document | {"mixed_precision": document["mixed_precision"] | entry}))
        before = snapshot(work)
        refused(invoke("quantize", "--model", work / "m.onnx", "--ranges", crafted, "-o", work / "c2.int8.onnx",
                       "--no-equalize"), words, before, work)


@exact_openvino_int8
def test_uint16_fallback_writes_16_bit_pairs_that_both_runtimes_run_and_replays_byte_for_byte(work):
    import openvino as ov

    options = QuantizeOptions(equalize=False, budget=BudgetOptions(0.0, _val(work), fallback="uint16", repeats=1))
    result = quantize(work / "m.onnx", work / "u16.int8.onnx", _dim_calibration(work), options=options)
    record = json.loads(result.ranges_path.read_text())["mixed_precision"]
    assert record["fallback"] == "uint16" and record["tensors"]
    model = onnx.load(str(result.int8_path))
    if not record["fp32"]:
        initializers = {init.name: init for init in model.graph.initializer}
        sixteen = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"
                   and initializers[node.input[2]].data_type == onnx.TensorProto.UINT16}
        assert sixteen == set(record["tensors"]) and model.opset_import[0].version == 21
        # onnxruntime's output is what the record scored; OpenVINO reads the same file to within float rounding
        hr, lr = make_pair(read_rgb8(sorted((work / "val").iterdir())[0])[0], 2)
        x = lr[:40, :40].transpose(2, 0, 1)[None].astype(np.float32) / 255
        ort_out = TiledRunner(str(result.int8_path)).forward(x)
        ov_out = ov.Core().compile_model(str(result.int8_path), "CPU")({0: x})[0]
        assert np.abs(ov_out - ort_out).max() < 0.02
    replay = quantize(work / "m.onnx", work / "u16r.int8.onnx", ranges_path=result.ranges_path, options=PLAIN)
    assert replay.int8_path.read_bytes() == result.int8_path.read_bytes()
