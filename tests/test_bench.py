"""bench (summary keys and their arithmetic, runtimes side by side) and compare through OpenVINO."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.compare import CompareOptions, compare, means
from dipnet_deploy.errors import InputError
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.runtime import cpu_name, int8_sums_saturate, open_session, reusing_output

from .conftest import exact_openvino_int8


@pytest.fixture(scope="module")
def pair(x2_pair):  # noqa: F811
    """fp32 + int8 x2 models (random weights, 64x96 input: ``test_compare``'s pair)."""
    return x2_pair[0], x2_pair[1]


def test_bench_json_keys_and_arithmetic(pair, invoke):
    fp32, int8 = pair
    code, out, err = invoke("bench", "--fp32", fp32, "--int8", int8, "--repeats", "2", "--streams", "2", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["runtime"] == "onnxruntime" and summary["streams"] == 2
    assert summary["fp32_s"] > 0 and summary["int8_s"] > 0
    assert summary["speedup"] == pytest.approx(summary["fp32_s"] / summary["int8_s"], rel=2e-3)
    entry = summary["runtimes"]["onnxruntime"]
    assert entry["int8_vs_reference_fp32"] == pytest.approx(summary["int8_s"] / summary["fp32_s"], abs=1e-4)
    assert entry["fp32_fps"] > 0 and entry["int8_fps"] > 0
    # the CPU is named beside its figures, and whether its int8 sums take onnxruntime's exact slow path
    assert summary["cpu"] == cpu_name() and summary["int8_exact_slow_path"] is int8_sums_saturate()
    assert ("has no VNNI" in out) is int8_sums_saturate()
    code, out, _ = invoke("bench", "--fp32", fp32, "--int8", int8, "--repeats", "1", "--streams", "0", "--json")
    assert code == 0 and "int8_fps" not in json.loads(out.strip().splitlines()[-1])["runtimes"]["onnxruntime"]


def test_bench_refuses_mismatched_pair(x2_pair, tmp_path, invoke):  # noqa: F811
    fp32, _, train_model = x2_pair
    torch.save(train_model.state_dict(), tmp_path / "x2.pth")
    other = export(load_checkpoint(tmp_path / "x2.pth"), tmp_path / "x.onnx", ExportOptions(40, 64)).onnx_path
    code, _, err = invoke("bench", "--fp32", fp32, "--int8", other)
    assert code == 2 and "does not match the fp32 model" in err and "Traceback" not in err


@exact_openvino_int8
def test_bench_runtimes_side_by_side(pair, invoke):
    pytest.importorskip("openvino")
    fp32, int8 = pair
    code, out, err = invoke("bench", "--fp32", fp32, "--int8", int8, "--runtime", "onnxruntime", "--runtime", "openvino",
                            "--repeats", "1", "--streams", "0", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    openvino = summary["runtimes"]["openvino"]
    assert openvino["int8_vs_reference_fp32"] == pytest.approx(openvino["int8_s"] / summary["fp32_s"], abs=1e-3)


@exact_openvino_int8
def test_compare_through_openvino_agrees_with_onnxruntime(pair, hr_dir):  # noqa: F811
    pytest.importorskip("openvino")
    fp32, int8 = pair
    results = {runtime: compare(fp32, int8, hr_dir, CompareOptions(latency_repeats=1, runtime=runtime))
               for runtime in ("onnxruntime", "openvino")}
    assert results["openvino"].latency["runtime"] == "openvino"
    a, b = (means(results[runtime].rows)["psnr_y"] for runtime in ("onnxruntime", "openvino"))
    assert abs(a["fp32"] - b["fp32"]) < 0.01  # the same float function
    assert abs(a["int8"] - b["int8"]) < 0.2  # the same QDQ model; integer kernels round differently


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=exact_openvino_int8)])
def test_output_buffer_holds_the_same_values_as_a_fresh_output(pair, runtime):
    """``run(x, out)`` (what bench times) writes exactly ``run(x)``'s values; each call overwrites the
    buffer, a plain call after it returns an array of its own, and a wrong buffer is refused."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
    session = open_session(pair[1], runtime)
    rng = np.random.default_rng(0)
    first, second = (rng.random((1, 3, 64, 96), dtype=np.float32) for _ in range(2))
    buffer = np.full(session.output_shape, np.nan, np.float32)
    forward = reusing_output(session)
    assert session.run(first, buffer) is buffer and np.array_equal(buffer, session.run(first))
    fresh = session.run(second)
    assert np.array_equal(buffer, session.run(first)) and not np.array_equal(fresh, buffer)
    assert np.array_equal(forward(second), fresh) and np.array_equal(session.run(second, buffer), fresh)
    with pytest.raises(ValueError, match="float32 array of shape"):
        session.run(first, np.empty((1, 3, 128, 96), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        session.run(first, np.empty(session.output_shape[::-1], np.float32).T)


def saturating_conv(path) -> np.ndarray:
    """A QDQ conv whose exact int32 sums a CPU without VNNI overflows in int16 (``vpmaddubsw``): every input
    level 255 and 16 input channels of weights +127, one output channel; writes it to ``path`` and returns the
    exact output (the integer sums, dequantized)."""
    weight = np.full((1, 16, 1, 1), 127, np.int8)
    inits = [numpy_helper.from_array(np.asarray(1 / 255, np.float32), "s_x"),
             numpy_helper.from_array(np.asarray(0, np.uint8), "z_x"),
             numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(np.asarray([0.01], np.float32), "s_w"),
             numpy_helper.from_array(np.asarray([0], np.int8), "z_w"),
             numpy_helper.from_array(np.asarray(0.1, np.float32), "s_y"),
             numpy_helper.from_array(np.asarray(0, np.uint8), "z_y")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s_x", "z_x"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w"], axis=0),
             helper.make_node("Conv", ["x_dq", "w"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "s_y", "z_y"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "s_y", "z_y"], ["out"])]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    exact = 16 * 255 * 127 * (1 / 255) * 0.01  # 20.32: within the output's range (255 x 0.1)
    return np.full((1, 1, 4, 4), np.round(exact / 0.1) * 0.1, np.float32)


def test_onnxruntime_sessions_compute_int8_sums_exactly_on_every_cpu(tmp_path):
    """Our onnxruntime sessions give the exact integer result where a plain session on a CPU without VNNI
    saturates (there this test fails without ``ort_options``; with VNNI both are exact)."""
    expected = saturating_conv(tmp_path / "sat.onnx")
    x = np.ones((1, 16, 4, 4), np.float32)
    np.testing.assert_allclose(open_session(tmp_path / "sat.onnx").run(x), expected, rtol=1e-6)


def test_openvino_refuses_an_int8_model_it_would_compute_wrong(tmp_path, invoke, monkeypatch):
    """On a CPU without VNNI (simulated) OpenVINO refuses weights past +-64 in one line naming the model and
    the way out; a model whose weights stay within +-64 runs."""
    pytest.importorskip("openvino")
    from dipnet_deploy import runtime

    saturating_conv(tmp_path / "sat.onnx")
    monkeypatch.setattr(runtime, "int8_sums_saturate", lambda: True)
    with pytest.raises(InputError) as refusal:
        open_session(tmp_path / "sat.onnx", "openvino")
    line = str(refusal.value)
    assert "sat.onnx" in line and "reach 127" in line and "--runtime onnxruntime" in line and "\n" not in line
    model = onnx.load(str(tmp_path / "sat.onnx"))
    weight = next(init for init in model.graph.initializer if init.name == "w_q")
    weight.CopyFrom(numpy_helper.from_array(np.full((1, 16, 1, 1), 64, np.int8), "w_q"))
    onnx.save(model, str(tmp_path / "seven_bit.onnx"))
    x = np.ones((1, 16, 4, 4), np.float32)
    assert open_session(tmp_path / "seven_bit.onnx", "openvino").run(x) == pytest.approx(16 * 64 * 0.01, abs=0.05)


@pytest.mark.parametrize("flags, saturate", [("fpu sse4_2 avx avx2", True), ("avx2 avx512f avx512_vnni", False),
                                             ("avx2 avx_vnni", False), ("avx2 amx_int8", False)])
def test_cpus_whose_int8_sums_saturate_are_told_by_their_flags(flags, saturate, monkeypatch):
    from dipnet_deploy import runtime

    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime.Path, "read_text", lambda self: f"processor\t: 0\nflags\t\t: {flags}\n")
    assert runtime.int8_sums_saturate() is saturate
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")  # no vpmaddubsw there
    assert runtime.int8_sums_saturate() is False
