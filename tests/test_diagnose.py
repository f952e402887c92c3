"""compare --diagnose: float fallback of one tensor, SQNR, the report's diagnosis against hand computations."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.diagnose import signal_to_noise
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.qat import onnx_point_names
from dipnet_deploy.qdq_pairs import activation_pairs, float_fallback
from dipnet_deploy.quantize import quantize

from .conftest import CALIBRATION

SCALES = {"x": (0.02, 3), "y": (0.05, 128)}  # input and conv output: (scale, uint8 zero point)
WEIGHT = np.array([[[[0.5, -0.25], [0.125, 1.0]]]], np.float32)


def tiny_qdq(without: str | None = None) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(2x2, int8 weight) -> y -> Q/DQ -> Relu, built by hand; ``without`` leaves
    the pair of "x" or "y" out, as a model written without it would be."""
    nodes, inits = [], [numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
                        numpy_helper.from_array(np.array(1 / 127, np.float32), "w_scale"),
                        numpy_helper.from_array(np.round(WEIGHT * 127).astype(np.int8), "w_q")]
    nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"]))

    def pair(name: str) -> str:
        if name == without:
            return name
        scale, zero_point = SCALES[name]
        inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                      numpy_helper.from_array(np.array(zero_point, np.uint8), f"{name}_zp")])
        nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_zp"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_dq"]))
        return f"{name}_dq"

    nodes.append(helper.make_node("Conv", [pair("x"), "w"], ["y"]))
    nodes.append(helper.make_node("Relu", [pair("y")], ["out"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("tensor", ["x", "y"])
def test_float_fallback_equals_the_model_built_without_that_pair(tensor):
    model = tiny_qdq()
    pairs = {pair.tensor: pair for pair in activation_pairs(model)}
    assert sorted(pairs) == ["x", "y"] and pairs["y"].producer == "Conv" and pairs["x"].producer == "graph input"
    assert pairs["y"].float_range() == pytest.approx([0.05 * -128, 0.05 * 127])
    fallback, by_hand = float_fallback(model, [pairs[tensor]]), tiny_qdq(without=tensor)
    # the conv is float now: it reads its weight dequantized ahead, the same values the DQ made
    assert [n.op_type for n in fallback.graph.node] == [n.op_type for n in by_hand.graph.node][1:]
    conv = next(node for node in fallback.graph.node if node.op_type == "Conv")
    weight = next(init for init in fallback.graph.initializer if init.name == conv.input[1])
    np.testing.assert_array_equal(numpy_helper.to_array(weight),
                                  np.round(WEIGHT * 127).astype(np.float32) * np.float32(1 / 127))
    x = np.random.default_rng(0).normal(1.0, 1.5, (1, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(fallback, x), run(by_hand, x))
    assert not np.array_equal(run(fallback, x), run(model, x))


def test_sqnr_is_the_rounding_noise_computed_by_hand():
    """Input: its own rounding. Conv output: rounding of the input carried through the conv plus its own,
    against the same conv (same int8 weight) on the float input."""
    model = tiny_qdq()
    x = np.random.default_rng(1).uniform(-0.1, 5.5, (1, 1, 6, 6)).astype(np.float64)
    quantize = lambda v, name: (np.clip(np.round(v / SCALES[name][0]) + SCALES[name][1], 0, 255)  # noqa: E731
                                - SCALES[name][1]) * SCALES[name][0]
    weight = np.round(WEIGHT[0, 0].astype(np.float64) * 127) / 127
    conv = lambda v: np.array([[np.sum(v[i:i + 2, j:j + 2] * weight) for j in range(5)] for i in range(5)])  # noqa: E731
    sqnr = lambda exact, approx: 10 * np.log10(np.sum(exact**2) / np.sum((exact - approx) ** 2))  # noqa: E731
    plain = x[0, 0]
    expected = {"x": sqnr(plain, quantize(plain, "x")), "y": sqnr(conv(plain), quantize(conv(quantize(plain, "x")), "y"))}
    measured = signal_to_noise(model, activation_pairs(model), [x.astype(np.float32)])
    assert measured == {name: pytest.approx(value, abs=1e-3) for name, value in expected.items()}


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """compare --diagnose of the packaged x2 (40x48 input) on two calibration crops."""
    import cv2

    work = tmp_path_factory.mktemp("diag")
    fp32 = export(load_checkpoint(PACKAGED_WEIGHTS), work / "x2.onnx", ExportOptions(height=40, width=48)).onnx_path
    int8 = quantize(fp32, work / "x2.int8.onnx", CALIBRATION).int8_path
    data = work / "hr"
    data.mkdir()
    for name in ("coffee.png", "astronaut.png"):
        cv2.imwrite(str(data / name), cv2.imread(str(CALIBRATION / name))[100:180, 150:246])
    return work, fp32, int8, data


def test_diagnosis_in_the_report_matches_a_compare_of_each_fallback_model(diagnosed, invoke):
    work, fp32, int8, data = diagnosed
    code, out, err = invoke("compare", work / "report", "--fp32", fp32, "--int8", int8, "--data", data,
                            "--repeats", 1, "--diagnose", "--json")
    assert code == 0, err
    metrics = json.loads((work / "report" / "metrics.json").read_text())
    diagnosis = metrics["int8_diagnosis"]
    model = onnx.load(str(int8))
    # one entry per tensor the QDQ quantizer quantizes (named from the fp32 graph, independently)
    assert sorted(e["tensor"] for e in diagnosis) == sorted(onnx_point_names(onnx.load(str(fp32)).graph))
    gains = [entry["psnr_y_gain_db"] for entry in diagnosis]
    assert gains == sorted(gains, reverse=True) and gains[0] > 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["costliest_tensor"] == diagnosis[0]["tensor"]
    assert "<h2>Diagnosis</h2>" in (work / "report" / "index.html").read_text()
    # the top entry's gain, recomputed by a plain compare of the model without that pair
    pair = next(p for p in activation_pairs(model) if p.tensor == diagnosis[0]["tensor"])
    onnx.save(float_fallback(model, [pair]), str(work / "fallback.onnx"))
    code, out, err = invoke("compare", work / "plain", "--fp32", fp32, "--int8", work / "fallback.onnx",
                            "--data", data, "--repeats", 1, "--json")
    assert code == 0, err
    recomputed = json.loads(out.strip().splitlines()[-1])["psnr_y_int8"] - metrics["mean"]["psnr_y"]["int8"]
    assert diagnosis[0]["psnr_y_gain_db"] == pytest.approx(recomputed, abs=2e-4)  # the summary rounds to 1e-4
    for entry in diagnosis:  # the image is on the 1/255 grid already: its int8 copy is exact up to float rounding
        assert entry["sqnr_db"] is None or (entry["sqnr_db"] > 100 if entry["tensor"] == "input"
                                            else 15 < entry["sqnr_db"] < 60), entry


def test_diagnose_without_int8_is_one_line(diagnosed, invoke, tmp_path):
    _, fp32, _, data = diagnosed
    alone = tmp_path / "alone.onnx"  # no int8 model beside it for compare to pick up
    alone.write_bytes(fp32.read_bytes())
    code, out, err = invoke("compare", tmp_path / "r", "--fp32", alone, "--data", data, "--diagnose")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--diagnose" in err and "int8" in err
    assert not (tmp_path / "r").exists()
