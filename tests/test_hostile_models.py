"""Hostile models, checkpoints and videos: graphs that are not super-resolution models of this kind, declared
sizes that would exhaust memory (external data, zip records, tensor shapes, a picture named as a video), weights
that are not real floating point, videos that break their header's promise.

Every refusal: exit 2, one stderr line naming the file, no traceback, nothing written. The memory bombs run in a
child process whose address space is capped at 1.5 GiB: a regression fails there instead of taking the machine
down.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.checkpoint import MAX_CHECKPOINT_BYTES, load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.errors import InputError, OutOfMemoryError
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import read_rgb8
from dipnet_deploy.onnx_model import ALLOWED_OPS, MAX_NODES, load_onnx, sr_model_shape
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.runtime import allocation_failures_named
from dipnet_deploy.video import write_clip

from .conftest import random_train_model

SIDE = 16  # the hand-made models' input: 1x3x16x16 -> 1x3x32x32
ADDRESS_SPACE = 3 << 29  # 1.5 GiB: what a bomb's child process may map


def refused(result: tuple[int, str, str], name: str, words: str = "") -> None:
    """Exit 2 and one stderr line (progress bars aside, with or without a total, and the blank lines their carriage
    returns make in text mode) naming ``name`` and ``words``, no traceback."""
    code, _, err = result
    lines = [line for line in err.strip().splitlines()
             if "%|" not in line and not line.startswith("upscale: ") and line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dipnet-deploy: error: "), err
    assert "Traceback" not in err and name in lines[0] and words in lines[0], lines[0]


def bounded(*args, address_space: int = ADDRESS_SPACE, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in a child process whose address space is capped at ``address_space`` (a bomb that gets through
    fails with MemoryError instead of swapping the machine to a halt); ``env``: more environment variables."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    done = subprocess.run([sys.executable, "-m", "dipnet_deploy", *map(str, args)], capture_output=True, text=True,
                          timeout=120, preexec_fn=cap,
                          env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])} | (env or {}))
    return done.returncode, done.stdout, done.stderr


# --------------------------------------------------------------------------- ONNX graphs


def sr_graph(middle: list | None = None, initializers: list | None = None,
             opsets: tuple = (("", 17),)) -> onnx.ModelProto:
    """A valid x2 SR model: input -> ``middle`` nodes (from "input" to "x") -> 3x3 Conv to 12 -> DepthToSpace."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((12, 3, 3, 3)) * 0.1).astype(np.float32), "W")
    nodes = middle if middle is not None else [helper.make_node("Relu", ["input"], ["x"])]
    graph = helper.make_graph(
        [*nodes, helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("DepthToSpace", ["c"], ["output"], blocksize=2, mode="CRD")], "sr",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2 * SIDE, 2 * SIDE])],
        [weight, *(initializers or [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets])


def _constant(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _loop(trips: int, scan: bool) -> onnx.ModelProto:
    """The input carried through a Loop of ``trips`` iterations (with a scan output that grows with each)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["carried"], ["next"]),
         *([helper.make_node("Identity", ["carried"], ["scanned"])] if scan else [])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("next", TensorProto.FLOAT, [1, 3, SIDE, SIDE]),
         *([helper.make_tensor_value_info("scanned", TensorProto.FLOAT, [1, 3, SIDE, SIDE])] if scan else [])])
    return sr_graph([_constant("trips", np.int64(trips)), _constant("go", np.bool_(True)),
                     helper.make_node("Loop", ["trips", "go", "input"], ["x", *(["all"] if scan else [])], body=body)])


def _unknown_domain() -> onnx.ModelProto:
    return sr_graph([helper.make_node("Relu", ["input"], ["x"], domain="ai.evil")], opsets=(("", 17), ("ai.evil", 1)))


def _many_nodes() -> onnx.ModelProto:
    names = ["input", *(f"r{i}" for i in range(100_000 - 1)), "x"]
    return sr_graph([helper.make_node("Relu", [a], [b]) for a, b in zip(names, names[1:])])


def _graph_attribute() -> onnx.ModelProto:
    inner = helper.make_graph([], "inner", [], [])
    return sr_graph([helper.make_node("Relu", ["input"], ["x"], body=inner)])


def _local_function() -> onnx.ModelProto:
    model = sr_graph([helper.make_node("Twice", ["input"], ["x"], domain="local")], opsets=(("", 17), ("local", 1)))
    model.functions.append(helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                [helper.make_opsetid("", 17)]))
    return model


def _string_tensor() -> onnx.ModelProto:
    return sr_graph(initializers=[helper.make_tensor("notes", TensorProto.STRING, [1], [b"hello"])])


def _resize_bomb() -> onnx.ModelProto:
    """Allowed ops only, and the declared output right, but one tensor (3 GiB) 1,024 times the input each way."""
    scales = numpy_helper.from_array(np.array([1, 1, 1024, 1024], np.float32), "scales")
    return sr_graph([helper.make_node("Resize", ["input", "", "scales"], ["big"], mode="nearest"),
                     helper.make_node("MaxPool", ["big"], ["x"], kernel_shape=[1024, 1024], strides=[1024, 1024])],
                    [scales])


GRAPHS = {  # what each builds, and the words of its refusal
    "op of an unknown domain": (_unknown_domain, "op ai.evil.Relu"),
    "Loop of 10^12 trips": (lambda: _loop(10**12, scan=False), "op Loop"),
    "Loop with a growing scan output": (lambda: _loop(10**6, scan=True), "op Loop"),
    "100,000 nodes": (_many_nodes, f"at most {MAX_NODES:,}"),
    "subgraph attribute": (_graph_attribute, "graph attribute"),
    "model-local function": (_local_function, "functions"),
    "string tensor": (_string_tensor, "STRING"),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Every hostile graph of GRAPHS as <case>.onnx, the Resize bomb as resize.onnx, and a calibration folder of
    one image."""
    folder = tmp_path_factory.mktemp("graphs")
    for case, (make, _) in GRAPHS.items():
        onnx.save(make(), str(folder / f"{case}.onnx"))
    onnx.save(_resize_bomb(), str(folder / "resize.onnx"))
    (folder / "calib").mkdir()
    cv2.imwrite(str(folder / "calib" / "a.png"), np.full((48, 64, 3), (40, 120, 200), np.uint8))
    return folder


def _command(command: str, model: Path, folder: Path, out: Path) -> list:
    return {"info": ["info", model],
            "quantize": ["quantize", "--model", model, "--calib", folder / "calib", "-o", out / "q.int8.onnx"],
            "upscale": ["upscale", folder / "calib", "--model", model, "-o", out],
            "compare": ["compare", out, "--fp32", model, "--data", folder / "calib", "--repeats", "1"]}[command]


@pytest.mark.parametrize("command", ["info", "quantize", "upscale"])
@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_graph_not_of_this_kind_refused_in_one_line(case, command, models_dir, tmp_path, invoke):
    model = models_dir / f"{case}.onnx"
    refused(invoke(*_command(command, model, models_dir, tmp_path / "out")), model.name, GRAPHS[case][1])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["quantize", "upscale", "compare"])
def test_tensor_far_larger_than_the_output_refused(command, models_dir, tmp_path, invoke):
    """Allowed ops can still build a tensor of 3 GiB from a 16x16 input: refused from the inferred shapes."""
    refused(invoke(*_command(command, models_dir / "resize.onnx", models_dir, tmp_path / "out")), "resize.onnx",
            "tensor big is 1x3x16384x16384, over 64 times the output's size")
    assert not (tmp_path / "out").exists()


def test_sixteen_bit_qdq_of_onnxruntimes_domain_and_a_slice_are_accepted(models_dir, tmp_path, invoke):
    """What `quantize` is to write next: uint16 QuantizeLinear/DequantizeLinear (com.microsoft before opset 21),
    a Slice after DepthToSpace. Loaded, recognized as an x2 model and run."""
    q = [helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"], domain="com.microsoft")
         for name in ("input", "c")]
    dq = [helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"], domain="com.microsoft")
          for name in ("input", "c")]
    starts, ends, axes = (numpy_helper.from_array(np.array(v, np.int64), n)
                          for v, n in (([0, 0], "starts"), ([2 * SIDE, 2 * SIDE], "ends"), ([2, 3], "axes")))
    weight = numpy_helper.from_array(np.full((12, 3, 3, 3), 0.05, np.float32), "W")
    graph = helper.make_graph(
        [q[0], dq[0], helper.make_node("Conv", ["input_dq", "W"], ["c"], pads=[1, 1, 1, 1]), q[1], dq[1],
         helper.make_node("DepthToSpace", ["c_dq"], ["d"], blocksize=2, mode="CRD"),
         helper.make_node("Slice", ["d", "starts", "ends", "axes"], ["output"])], "q16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2 * SIDE, 2 * SIDE])],
        [weight, numpy_helper.from_array(np.float32(1 / 65535), "s"), numpy_helper.from_array(np.uint16(0), "z"),
         starts, ends, axes])
    path = tmp_path / "q16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    assert sr_model_shape(load_onnx(path), path, "--int8") == ([1, 3, SIDE, SIDE], 2)
    code, _, err = invoke("upscale", models_dir / "calib", "--model", path, "-o", tmp_path / "out")
    assert code == 0, err
    assert cv2.imread(str(tmp_path / "out" / "a.png")).shape == (96, 128, 3)


@pytest.fixture(scope="module")
def written_models(tmp_path_factory) -> tuple[Path, Path]:
    """What `export` writes for the x4-ntire preset (random weights; its ops include every op of x2's) and what
    `quantize` makes of it."""
    folder = tmp_path_factory.mktemp("written")
    (folder / "calib").mkdir()
    cv2.imwrite(str(folder / "calib" / "a.png"), cv2.GaussianBlur(
        (np.random.default_rng(1).random((60, 80, 3)) * 255).astype(np.uint8), (5, 5), 2))
    torch.save(random_train_model(PRESETS["x4-ntire"].replace(expansion=8)).state_dict(), folder / "x4.pth")
    fp32 = export(load_checkpoint(folder / "x4.pth"), folder / "x4.onnx", ExportOptions(40, 40)).onnx_path
    return fp32, quantize(fp32, folder / "x4.int8.onnx", folder / "calib", options=QuantizeOptions()).int8_path


def test_the_models_this_tool_writes_stay_well_inside_the_allowlist_and_caps(written_models):
    for path in written_models:
        model = load_onnx(path)
        assert {node.op_type for node in model.graph.node} <= ALLOWED_OPS
        assert 20 * max(len(model.graph.node), len(model.graph.initializer)) < MAX_NODES
        sr_model_shape(model, path, "--model")


# --------------------------------------------------------------------------- ONNX external data


def _with_external(folder: Path, dims: list[int], entries: dict[str, str]) -> Path:
    """The tiny SR model and one more (unused) float initializer of ``dims`` whose data lies in a file, as
    ``entries`` (location, offset, length) declare; <folder>/m.onnx."""
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in entries.items():
        big.external_data.add(key=key, value=value)
    (folder / "m.onnx").write_bytes(sr_graph(initializers=[big]).SerializeToString())
    return folder / "m.onnx"


def test_external_data_declaring_a_gigabyte_refused_in_bounded_memory(tmp_path):
    """The audit's bomb: a 1 GiB sparse data file, and a tensor shaped to match it exactly."""
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.truncate(1 << 30)
    model = _with_external(tmp_path, [1 << 28], {"location": "w.bin", "offset": "0", "length": str(1 << 30)})
    refused(bounded("info", model), "m.onnx", "its tensors declare 1,024 MiB")


EXTERNAL = {  # (dims, the file's size, entries): every one reading other bytes than the shape needs
    "length short of the shape": ([100], 400, {"length": "40"}),
    "length beyond the file": ([100], 400, {"length": "4000"}),
    "no length, the file longer": ([100], 4000, {}),
    "offset beyond the file": ([100], 400, {"offset": "4000", "length": "400"}),
    "offset not a number": ([100], 400, {"offset": "x", "length": "400"}),
}


@pytest.mark.parametrize("case", sorted(EXTERNAL))
def test_external_data_that_does_not_fit_its_shape_refused(case, tmp_path, invoke):
    dims, size, entries = EXTERNAL[case]
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.truncate(size)
    refused(invoke("info", _with_external(tmp_path, dims, {"location": "w.bin", **entries})), "m.onnx",
            "external data for tensor big")


def test_external_data_in_a_fifo_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "w.bin")
    model = _with_external(tmp_path, [100], {"location": "w.bin", "length": "400"})
    refused(bounded("info", model), "m.onnx", "w.bin is no regular file")


def test_onnx_file_larger_than_any_model_refused_unread(tmp_path):
    path = tmp_path / "huge.onnx"
    path.write_bytes(sr_graph().SerializeToString())
    with open(path, "r+b") as handle:
        handle.truncate(1 << 30)  # sparse: no disk used, and protobuf would take it all into memory
    refused(bounded("info", path), "huge.onnx", "1,024 MiB is more than")


def _hungry_model(path: Path) -> Path:
    """A valid x2 model of 2048x2048 input whose first Conv makes 512 channels: one 8 GiB tensor (43 times the
    output, within the cap of 64) from a file of 300 KB."""
    side, rng = 2048, np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.01).astype(np.float32), name)
               for name, shape in (("W1", (512, 3, 3, 3)), ("W2", (12, 512, 3, 3)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W1"], ["wide"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["wide", "W2"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("DepthToSpace", ["c"], ["output"], blocksize=2, mode="CRD")], "hungry",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2 * side, 2 * side])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("command", ["upscale", "compare"])
def test_model_needing_more_memory_than_there_is_is_one_line(command, tmp_path):
    """onnxruntime's allocation failure (and its own error log) becomes one line naming the model; 4 GiB of
    address space hold the tool and its 2048x2048 tiles, not the model's 8 GiB tensor."""
    model = _hungry_model(tmp_path / "hungry.onnx")
    (tmp_path / "hr").mkdir()
    cv2.imwrite(str(tmp_path / "hr" / "a.png"), np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8))
    args = (["upscale", tmp_path / "hr", "--model", model, "-o", tmp_path / "up", "--threads", 1] if command == "upscale"
            else ["compare", tmp_path / "report", "--fp32", model, "--data", tmp_path / "hr", "--repeats", 1])
    refused(bounded(*args, address_space=4 << 30), "hungry.onnx", "onnxruntime ran out of memory for this model "
                                                                  "(could not allocate 8,192 MiB)")
    assert not (tmp_path / "up").exists() and not (tmp_path / "report").exists()


def test_quantize_calibration_needing_more_memory_than_there_is_is_one_line(tmp_path):
    """A calibration forward onnxruntime cannot allocate (the same 8 GiB tensor, 4 GiB of address space): one line
    naming the model, exit 2, no output, no scratch folder left, nor onnxruntime's own error log."""
    model = _hungry_model(tmp_path / "hungry.onnx")
    (tmp_path / "calib").mkdir()
    (tmp_path / "tmp").mkdir()
    cv2.imwrite(str(tmp_path / "calib" / "a.png"), np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    result = bounded("quantize", "--model", model, "--calib", tmp_path / "calib", "--method", "max",
                     "-o", tmp_path / "q" / "hungry.int8.onnx", address_space=4 << 30, env={"TMPDIR": str(tmp_path / "tmp")})
    refused(result, "hungry.onnx", "onnxruntime ran out of memory for this model (could not allocate 8,192 MiB)")
    assert "Failed to allocate" not in result[2] and "\x1b[" not in result[2], result[2]
    assert not (tmp_path / "q").exists()
    assert [path.name for path in (tmp_path / "tmp").iterdir() if path.name.startswith("dipnet-")] == []


def test_quantize_auto_refinement_needing_more_memory_than_there_is_is_one_line(x2_state, tmp_path):
    """--method auto's PyTorch refinement of a small x2 model at 1024x1024 (whole-image forwards of its fake-quantized
    twin) in 2.4 GiB of address space, where onnxruntime's calibration fits: one line naming the model and the size
    to lower, exit 2, no output, no scratch folder left. The audit found a traceback (DefaultCPUAllocator)."""
    torch.save(x2_state, tmp_path / "x2.pth")
    model = export(load_checkpoint(tmp_path / "x2.pth"), tmp_path / "x2.onnx",
                   ExportOptions(1024, 1024, simplify=False)).onnx_path
    (tmp_path / "calib").mkdir()
    (tmp_path / "tmp").mkdir()
    cv2.imwrite(str(tmp_path / "calib" / "a.png"), np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    result = bounded("quantize", "--model", model, "--calib", tmp_path / "calib", "--method", "auto", "--auto-steps", 1,
                     "-o", tmp_path / "q" / "x2.int8.onnx", address_space=19 << 27, env={"TMPDIR": str(tmp_path / "tmp")})
    refused(result, "x2.onnx", "PyTorch ran out of memory for this model")
    assert "refining the ranges of --method auto on its 1024x1024 input" in result[2], result[2]
    assert not (tmp_path / "q").exists()
    assert [path.name for path in (tmp_path / "tmp").iterdir() if path.name.startswith("dipnet-")] == []


def test_export_check_forward_needing_more_memory_than_there_is_is_one_line(x2_state, tmp_path):
    """export's check forward of a small x2 model at 2048x2048 (some GiB of activations) in 2 GiB of address space
    (the tool itself takes about 1): one line naming the checkpoint and the size to lower, exit 2, nothing written."""
    torch.save(x2_state, tmp_path / "x2.pth")
    result = bounded("export", "--checkpoint", tmp_path / "x2.pth", "--height", 2048, "--width", 2048,
                     "-o", tmp_path / "out" / "x2.onnx", address_space=2 << 30)
    refused(result, "x2.pth", "ran out of memory for this model, checking the export's 2048x2048 forward (a smaller "
                              "--height/--width needs less)")
    assert "Failed to allocate" not in result[2] and not (tmp_path / "out").exists()


def test_export_check_forward_names_pytorch_running_out(tmp_path):
    """The PyTorch half of the check forward, its allocator's failure injected: the same line, PyTorch named."""
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "same",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 8, 8])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    def hungry(x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)")

    from dipnet_deploy.export import ort_max_abs_diff

    with pytest.raises(OutOfMemoryError) as refusal:
        ort_max_abs_diff(data, hungry, 8, 8, tmp_path / "w.pth")
    assert str(refusal.value) == (f"{tmp_path / 'w.pth'}: PyTorch ran out of memory for this model (could not allocate "
                                  "16,384 MiB), checking the export's 8x8 forward (a smaller --height/--width needs less)")


def test_calibration_sessions_and_runs_name_the_model(tmp_path):
    """range_graphs' sessions and runs (quantize's calibration passes) turn an allocation failure into one
    OutOfMemoryError naming the model; unnamed, the CLI names it as the model it was given (model_named)."""
    from dipnet_deploy.range_graphs import run
    from dipnet_deploy.runtime import UNNAMED_MODEL, model_named

    class Starved:
        def run(self, outputs, feeds, options=None):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                               "running Conv node. Failed to allocate memory for requested buffer of size 1048576")

    with pytest.raises(OutOfMemoryError, match="^m.onnx: onnxruntime ran out of memory for this model "
                                               r"\(could not allocate 1 MiB\)$"):
        run(Starved(), None, {}, "m.onnx")
    with pytest.raises(OutOfMemoryError, match="^given.onnx: onnxruntime ran out"), model_named("given.onnx"):
        run(Starved(), None, {})
    with pytest.raises(OutOfMemoryError, match="^m.onnx: "), model_named("given.onnx"):  # named already: kept
        run(Starved(), None, {}, "m.onnx")
    with pytest.raises(ValueError, match="not memory"), model_named("given.onnx"):
        raise ValueError("not memory")
    assert UNNAMED_MODEL == "the model"


def test_only_allocation_failures_become_one_line():
    """A runtime's other failures (a wrong input: a bug of ours) keep their type and traceback."""
    with pytest.raises(OutOfMemoryError, match="m.onnx: onnxruntime ran out of memory"):
        with allocation_failures_named("m.onnx", "onnxruntime"):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        with allocation_failures_named("m.onnx", "onnxruntime"):
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input")


def test_memory_no_stage_named_is_one_line(invoke, monkeypatch, tmp_path):
    def hungry(*args):
        raise MemoryError("Unable to allocate 48.0 MiB for an array with shape (3, 2048, 2048)")

    monkeypatch.setattr("dipnet_deploy.info.describe", hungry)
    code, _, err = invoke("info", tmp_path / "any.onnx")
    assert code == 2 and err.strip().splitlines() == [
        "dipnet-deploy: error: out of memory (Unable to allocate 48.0 MiB for an array with shape (3, 2048, 2048))"]


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def x2_state() -> dict[str, torch.Tensor]:
    return random_train_model(PRESETS["x2"].replace(expansion=8)).state_dict()


@pytest.fixture
def zip_bomb(x2_state, tmp_path) -> Path:
    """The audit's bomb: a real checkpoint whose first weight record is replaced by a deflated one of 1.5 GiB of
    zeros (7 MB)."""
    path = tmp_path / "bomb.pth"
    buffer = io.BytesIO()
    torch.save(x2_state, buffer)
    block = bytes(1 << 20)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED,
                                                              compresslevel=1) as bomb:
        for record in source.infolist():
            if record.filename.endswith("/data/0"):
                with bomb.open(record.filename, "w", force_zip64=True) as sink:
                    for _ in range(1536):
                        sink.write(block)
            else:
                bomb.writestr(record.filename, source.read(record), zipfile.ZIP_STORED)
    return path


def _directory_claiming(path: Path, state: dict, size: int) -> Path:
    """A checkpoint whose zip64 end record declares a ``size``-byte central directory."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = bytearray(buffer.getvalue())
    struct.pack_into("<Q", data, data.rfind(b"PK\x06\x06") + 40, size)
    path.write_bytes(bytes(data))
    return path


def test_checkpoint_record_inflating_to_gigabytes_refused_in_bounded_memory(zip_bomb, tmp_path):
    assert zip_bomb.stat().st_size < 16 << 20
    refused(bounded("export", "--checkpoint", zip_bomb, "-o", tmp_path / "x.onnx"), "bomb.pth",
            "its records unpack to 1,536")
    assert not (tmp_path / "x.onnx").exists()


def test_checkpoint_declaring_a_huge_model_in_small_tensors_refused_in_bounded_memory(tmp_path):
    """Three small weights from which a DIPNet of 6,000 channels (gigabytes of weights) would be inferred: the
    model is not allocated before the file is seen to hold every weight of it."""
    rng = torch.Generator().manual_seed(0)
    state = {"conv_1.weight": torch.randn(6000, 3, 3, 3, generator=rng),
             "block_1.c1_r.weight": torch.randn(24, 6000, 3, 3, generator=rng),
             "upsampler.0.weight": torch.randn(12, 6000, 3, 3, generator=rng)}
    torch.save(state, tmp_path / "wide.pth")
    refused(bounded("info", tmp_path / "wide.pth"), "wide.pth")


@pytest.mark.parametrize("option, value", [("--feature-channels", 800), ("--feature-channels", 2000),
                                           ("--mid-channels", 100000)])
def test_export_width_beyond_any_dipnet_refused_up_front(option, value, tmp_path):
    """A width no DIPNet has is refused as the option is parsed, in 1.5 GiB of address space; the audit found
    800 and 2000 refused only once the checkpoint was read (shape mismatch), 100000 by the machine's memory."""
    refused(bounded("export", option, value, "-o", tmp_path / "out" / "x.onnx"), option,
            f"{value} is not in the range 1<=x<=512")
    assert not (tmp_path / "out").exists()


def test_checkpoint_wider_than_any_dipnet_refused(tmp_path):
    """The same bound for the width a checkpoint declares: its export's peak grows with the square of the width,
    whatever --height/--width."""
    torch.save(DIPNet(PRESETS["x2"].replace(feature_channels=1024)).state_dict(), tmp_path / "wide.pth")
    refused(bounded("export", "--checkpoint", tmp_path / "wide.pth", "--height", 64, "--width", 64,
                    "-o", tmp_path / "out" / "x.onnx"), "wide.pth", "1024 feature channels: at most 512 are accepted")
    assert not (tmp_path / "out").exists()


def _viewed(state: dict) -> dict:
    """block_1.c1_r.weight as a view of one number declaring 346 MB (stride 0: tiny on disk)."""
    return {**state, "block_1.c1_r.weight": torch.zeros(1).expand(24, 400_000, 3, 3)}


CHECKPOINTS = {  # (what to save, how, the words of the refusal)
    "legacy format": (lambda s: s, {"_use_new_zipfile_serialization": False}, "legacy format"),
    "pickle of 5 MB": (lambda s: {**s, "notes": "x" * 5_000_000}, {}, "its pickle takes"),
    "tensor views declaring 346 MB": (_viewed, {}, f"its tensors declare 330 MiB, more than a DIPNet checkpoint "
                                                    f"holds (at most {MAX_CHECKPOINT_BYTES >> 20} MiB)"),
    "int64 weights": (lambda s: {**s, "conv_2.weight": s["conv_2.weight"].to(torch.int64)}, {}, "int64 values"),
    "complex weights": (lambda s: {**s, "conv_1.weight": s["conv_1.weight"].to(torch.complex64)}, {},
                        "complex64 values"),
    "bool weights": (lambda s: {**s, "conv_1.weight": s["conv_1.weight"] > 0}, {}, "bool values"),
    "sparse weights": (lambda s: {**s, "conv_1.weight": s["conv_1.weight"].to_sparse()}, {}, "not a dense one"),
}


@pytest.mark.parametrize("command", ["info", "export"])
@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_checkpoint_refused_in_one_line(case, command, x2_state, tmp_path, invoke):
    change, options, words = CHECKPOINTS[case]
    torch.save(change(dict(x2_state)), tmp_path / "bad.pth", **options)
    args = ["info", tmp_path / "bad.pth"] if command == "info" else [
        "export", "--checkpoint", tmp_path / "bad.pth", "--height", 40, "--width", 40, "-o", tmp_path / "x.onnx"]
    refused(invoke(*args), "bad.pth", words)
    assert not (tmp_path / "x.onnx").exists()


QUANTIZED = {  # a weight as torch's quantized tensors (whose loading warns in several lines) -> its dtype
    "qint8 per tensor": (lambda w: torch.quantize_per_tensor(w, 0.01, 0, torch.qint8), "qint8"),
    "quint8 per channel": (lambda w: torch.quantize_per_channel(w, torch.full((w.shape[0],), 0.01),
                                                                torch.zeros(w.shape[0], dtype=torch.long), 0,
                                                                torch.quint8), "quint8"),
}


@pytest.mark.parametrize("command", ["info", "export"])
@pytest.mark.parametrize("case", sorted(QUANTIZED))
def test_quantized_weights_refused_in_exactly_one_line(case, command, x2_state, tmp_path):
    """In a child process: torch's warnings go to its stderr there (pytest would catch them here)."""
    quantized, dtype = QUANTIZED[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates making quantized tensors
        torch.save({**x2_state, "conv_1.weight": quantized(x2_state["conv_1.weight"])}, tmp_path / "q.pth")
    args = ["info", tmp_path / "q.pth"] if command == "info" else [
        "export", "--checkpoint", tmp_path / "q.pth", "--height", 40, "--width", 40, "-o", tmp_path / "x.onnx"]
    code, _, err = bounded(*args)
    assert code == 2 and err.strip().splitlines() == [
        f"dipnet-deploy: error: {tmp_path / 'q.pth'}: conv_1.weight holds {dtype} values, not real floating-point "
        "weights"], err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("size", [2 << 20, 1 << 40])
def test_checkpoint_zip_directory_beyond_the_limit_refused_unread(size, x2_state, tmp_path, invoke):
    refused(invoke("info", _directory_claiming(tmp_path / "dir.pth", x2_state, size)), "dir.pth", "zip directory")


def test_plain_zip_end_record_is_read_too(tmp_path, invoke):
    """A zip without zip64 records (what zipfile writes for small archives) declaring a 2 MiB directory."""
    with zipfile.ZipFile(tmp_path / "small.pth", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    data = bytearray((tmp_path / "small.pth").read_bytes())
    struct.pack_into("<L", data, len(data) - 22 + 12, 2 << 20)
    (tmp_path / "small.pth").write_bytes(bytes(data))
    refused(invoke("info", tmp_path / "small.pth"), "small.pth", "zip directory takes 2.0 MiB")


def test_checkpoints_this_tool_writes_still_load(x2_state, tmp_path):
    torch.save({"params": x2_state, "params_ema": x2_state, "iter": 1}, tmp_path / "ok.pth")
    loaded = load_checkpoint(tmp_path / "ok.pth")
    assert loaded.training_form and loaded.fold_max_abs_diff < 1e-5


# --------------------------------------------------------------------------- videos


def _png_bomb(path: Path) -> Path:
    """An all-zero 16-bit RGBA PNG of 12000 x 12000 (1.15 GB of pixels) in about 1 MB."""
    side = 12000
    row = bytes(1 + side * 8)  # filter byte + pixels
    compressor = zlib.compressobj(1)
    stream = b"".join(compressor.compress(row * 500) for _ in range(side // 500)) + compressor.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


def _annex_b(size: tuple[int, int], frames: int, shade: int) -> bytes:
    """Raw H.264 (Annex B: parameter sets in the stream) of ``frames`` flat frames of width x height."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), shade + 20 * index, np.uint8), "rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _growing_video(path: Path) -> Path:
    """An MP4 whose header (from its first parameter sets) says 64x48 and whose frames 2 and 3 are 320x240."""
    raw = path.with_suffix(".h264")
    raw.write_bytes(_annex_b((64, 48), 2, 60) + _annex_b((320, 240), 2, 120))
    with av.open(str(raw), format="h264") as source, av.open(str(path), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        stream.time_base = Fraction(1, 10)
        for index, packet in enumerate(p for p in source.demux(video=0) if p.size):
            packet.stream, packet.time_base = stream, Fraction(1, 10)
            packet.pts = packet.dts = index
            packet.duration = 1
            target.mux(packet)
    raw.unlink()
    return path


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.onnx"
    onnx.save(sr_graph(), str(path))
    return path


def test_picture_named_as_a_video_refused_before_decoding(sr_model, tmp_path):
    """The audit's bomb: a 1 MB PNG named .mp4 that FFmpeg's image demuxer would decode whole (1.15 GB)."""
    bomb = _png_bomb(tmp_path / "clip.mp4")
    refused(bounded("upscale", bomb, "--model", sr_model, "-o", tmp_path / "out"), "clip.mp4",
            "not a readable video (its content is no MP4/QuickTime container, which .mp4 names)")
    assert not (tmp_path / "out").exists()


def test_video_in_another_container_than_its_suffix_names_refused(sr_model, tmp_path, invoke):
    write_clip(tmp_path / "clip.mkv", [np.zeros((48, 64, 3), np.uint8)] * 2, Fraction(10))
    (tmp_path / "clip.mkv").rename(tmp_path / "clip.mp4")
    refused(invoke("upscale", tmp_path / "clip.mp4", "--model", sr_model, "-o", tmp_path / "out"), "clip.mp4",
            "MP4/QuickTime")


def test_audio_the_output_container_cannot_hold_refused(sr_model, tmp_path, invoke):
    """A Matroska file with AAC audio named .webm: WebM holds no AAC, and the audio is copied as it is."""
    write_clip(tmp_path / "clip.mkv", [np.zeros((48, 64, 3), np.uint8)] * 2, Fraction(10), audio_rate=16000)
    (tmp_path / "clip.mkv").rename(tmp_path / "clip.webm")
    refused(invoke("upscale", tmp_path / "clip.webm", "--model", sr_model, "-o", tmp_path / "out"), "clip.webm",
            "its audio cannot be copied into a .webm file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("megapixels, words", [
    (None, "frame 2 is 320x240, the stream header says 64x48"),
    ("0.01", "the stream is damaged, or a frame is over the 0.01-megapixel limit"),  # 64x48 is 0.003
])
def test_frame_larger_than_the_header_refused(megapixels, words, sr_model, tmp_path, invoke, monkeypatch):
    """PyAV updates the stream's size from the decoder: the header's is kept, and the decoder itself bounded."""
    if megapixels:
        monkeypatch.setenv("DIPNET_MAX_MEGAPIXELS", megapixels)
    clip = _growing_video(tmp_path / "grows.mp4")
    refused(invoke("upscale", clip, "--model", sr_model, "-o", tmp_path / "out"), "grows.mp4", words)
    assert not (tmp_path / "out").exists()


def test_rotated_video_stays_rotated(sr_model, tmp_path, invoke):
    """A display matrix (90 degrees here) is carried to the upscaled video, also when audio packets come before
    the first video frame (the output's header is written with the first packet copied)."""
    with av.open(str(tmp_path / "rot.mp4"), "w") as container:
        sound = container.add_stream("aac", rate=16000)
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for start in range(0, 16000, 1024):  # one second of silence, from 0 s
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
        for index in range(3):  # video from 0.5 s
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 50 * index, np.uint8), "rgb24")
            frame.pts = 5 + index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(tmp_path / "rot.mp4")) as container:
        assert next(container.demux()).stream.type == "audio"
    code, _, err = invoke("upscale", tmp_path / "rot.mp4", "--model", sr_model, "-o", tmp_path / "out")
    assert code == 0, err
    with av.open(str(tmp_path / "out" / "rot.mp4")) as container:
        frame = next(container.decode(video=0))
        assert (frame.width, frame.height, frame.rotation, len(container.streams.audio)) == (128, 96, 90, 1)


def _b_frame_packets(codec: str, frames: int) -> list[bytes]:
    """``frames`` 64x48 frames (frame i has red level 20 i) encoded by ``codec`` with B-frames, in decode order."""
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = 64, 48, "yuv420p"
    context.time_base, context.framerate, context.max_b_frames = Fraction(1, 25), Fraction(25), 1
    context.options = {"qscale": "3"} if codec == "mpeg4" else {"bf": "1"}
    packets = []
    for index in range(frames):
        image = np.zeros((48, 64, 3), np.uint8)
        image[..., 0] = 20 * index
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = index
        packets += [bytes(packet) for packet in context.encode(frame)]
    return packets + [bytes(packet) for packet in context.encode(None)]


def _avi_with_b_frames(path: Path, kind: str, frames: int = 12) -> Path:
    """An AVI of ``frames`` frames with B-frames: "packed" as DivX 5 and XviD write them (MPEG-4 part 2, each
    P-frame and the B-frame after it in one chunk, an empty N-VOP in the next), "unpacked" MPEG-4, or H.264."""
    packets = _b_frame_packets("libx264" if kind == "H.264" else "mpeg4", frames)
    if kind == "packed":
        vop = b"\x00\x00\x01\xb6"
        bidirectional = [packet[packet.index(vop) + 4] >> 6 == 2 for packet in packets]
        start = packets[0].index(vop)  # DivX's user data, whose "p" says the bitstream is packed
        packets[0] = packets[0][:start] + b"\x00\x00\x01\xb2DivX503b1393p" + packets[0][start:]
        chunks, index = [], 0
        while index < len(packets):
            if index + 1 < len(packets) and bidirectional[index + 1]:
                chunks += [packets[index] + packets[index + 1], vop + bytes([0b01011000, 0b00000111])]  # N-VOP
                index += 2
            else:
                chunks.append(packets[index])
                index += 1
        packets = chunks
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("libx264" if kind == "H.264" else "mpeg4", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index, data in enumerate(packets):
            packet = av.Packet(data)
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, Fraction(1, 25), index, index
            container.mux(packet)
    return path


@pytest.mark.parametrize("kind", ["packed", "H.264"])
def test_avi_whose_b_frames_decode_out_of_time_order_refused(kind, sr_model, tmp_path, invoke):
    """AVI keeps no presentation times: frames of a stream with B-frames decode in display order with the times of
    their packets in stored order. The audit found the encoder failing midway, in a line naming a temporary file."""
    clip = _avi_with_b_frames(tmp_path / "old.avi", kind)
    refused(invoke("upscale", clip, "--model", sr_model, "-o", tmp_path / "out"), "old.avi",
            "an AVI with B-frames: frame ")
    assert not (tmp_path / "out").exists()


def test_avi_with_unpacked_b_frames_keeps_its_frames_in_order(sr_model, tmp_path, invoke):
    """Unpacked MPEG-4 B-frames in an AVI decode in order with their times (FFmpeg's parser orders them): not
    refused, and every frame is upscaled, in order."""
    clip = _avi_with_b_frames(tmp_path / "new.avi", "unpacked")
    code, _, err = invoke("upscale", clip, "--model", sr_model, "-o", tmp_path / "out")
    assert code == 0, err
    with av.open(str(tmp_path / "out" / "new.avi")) as container:
        shades = [frame.to_ndarray(format="rgb24").mean() for frame in container.decode(video=0)]
    assert len(shades) == 12 and np.all(np.diff(shades) > 0)  # brighter frame by frame: none lost or out of place
    # our own AVI carries no B-frames (their order an AVI cannot keep): it upscales again, in order
    code, _, err = invoke("upscale", tmp_path / "out" / "new.avi", "--model", sr_model, "-o", tmp_path / "again")
    assert code == 0, err
    with av.open(str(tmp_path / "again" / "new.avi")) as container:
        again = [frame.to_ndarray(format="rgb24").mean() for frame in container.decode(video=0)]
    assert len(again) == 12 and np.all(np.diff(again) >= 0) and again[-1] > again[0]  # (the darkest clip to 0)


# --------------------------------------------------------------------------- images


def test_image_of_a_format_not_read_is_refused_by_its_signature(tmp_path):
    """A GIF named .png: Pillow reads its header, but only the listed formats are decoded."""
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png", format="GIF")
    with pytest.raises(InputError, match="a GIF file"):
        read_rgb8(tmp_path / "a.png")
