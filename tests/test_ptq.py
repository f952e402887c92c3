"""quantize --method auto: beats max on held-out images through onnxruntime, exact output grid, pinned
int8 weights, reuse, refusals."""

import base64
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess
from dipnet_deploy.ptq import AutoOptions
from dipnet_deploy.qat import onnx_point_names
from dipnet_deploy.qdq_graph import dequantize_early
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.runtime import ort_options

from .conftest import CALIBRATION

HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    """The packaged x2 at 48x64, quantized by max and by auto (a short refinement) from 3 photos."""
    work = tmp_path_factory.mktemp("ptq")
    calib = work / "calib"
    calib.mkdir()
    photos = list_images(CALIBRATION)
    for path in photos[:3]:
        (calib / path.name).write_bytes(path.read_bytes())
    fp32 = export(load_checkpoint(PACKAGED_WEIGHTS), work / "x2.onnx", ExportOptions(height=HEIGHT, width=WIDTH)).onnx_path
    quiet = lambda m: None  # noqa: E731
    max_int8 = quantize(fp32, work / "max.int8.onnx", calib, warn=quiet)
    auto = QuantizeOptions(method="auto", auto=AutoOptions(iters=80, batch=8, crop=32))
    auto_int8 = quantize(fp32, work / "auto.int8.onnx", calib, None, auto, warn=quiet)
    held_out = [vendor_preprocess(read_rgb8(path)[0], HEIGHT, WIDTH) for path in photos[3:]]
    return work, fp32, max_int8, auto_int8, held_out


def output_psnr(fp32, int8, inputs) -> float:
    """PSNR (dB) of the int8 model's 8-bit output against the fp32 model's, over held-out inputs."""
    runs = [ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"]) for path in (fp32, int8)]
    levels = lambda a: np.round(np.clip(a * 255.0, 0, 255))  # noqa: E731
    errors = [np.mean((levels(runs[0].run(None, {"input": x})[0]) - levels(runs[1].run(None, {"input": x})[0])) ** 2)
              for x in inputs]
    return float(10 * np.log10(255.0**2 / np.mean(errors)))


def test_auto_beats_max_on_images_it_did_not_see(routes):
    _, fp32, max_int8, auto_int8, held_out = routes
    assert len(held_out) >= 2
    max_psnr, auto_psnr = output_psnr(fp32, max_int8.int8_path, held_out), output_psnr(fp32, auto_int8.int8_path, held_out)
    assert auto_psnr > max_psnr + 0.3, (max_psnr, auto_psnr)


def test_auto_puts_the_output_conv_on_the_exact_8_bit_grid_and_changes_no_op(routes):
    _, fp32, max_int8, auto_int8, _ = routes
    names = onnx_point_names(onnx.load(str(fp32)).graph)
    output_conv = next(tensor for tensor, point in names.items() if point == "upsampler.0")
    document = json.loads(auto_int8.ranges_path.read_text())
    assert document["method"] == "auto" and document["parameters"]["iters"] == 80
    assert document["tensors"][output_conv] == {"min": 0.0, "max": 1.0}
    int8 = onnx.load(str(auto_int8.int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    quantizer = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == output_conv)
    assert float(inits[quantizer.input[1]]) == pytest.approx(1 / 255, rel=1e-7) and int(inits[quantizer.input[2]]) == 0
    ops = lambda path: sorted(n.op_type for n in onnx.load(str(path)).graph.node)  # noqa: E731
    assert ops(auto_int8.int8_path) == ops(max_int8.int8_path)  # same graph: same speed


def test_auto_ranges_reuse_is_byte_identical(routes, invoke):
    work, fp32, _, auto_int8, _ = routes
    code, _, err = invoke("quantize", "--model", fp32, "--ranges", auto_int8.ranges_path, "-o", work / "again.onnx")
    assert code == 0, err
    assert (work / "again.onnx").read_bytes() == auto_int8.int8_path.read_bytes()


def int8_weight_levels(path) -> dict[str, np.ndarray]:
    """The int8 weights a QDQ model holds, by the float weight's name (onnxruntime's ``<name>_quantized``), as
    onnxruntime's quantizer wrote them (without the fast-path padding)."""
    model = dequantize_early(onnx.load(str(path)))
    return {init.name[: -len("_quantized")]: numpy_helper.to_array(init) for init in model.graph.initializer
            if init.name.endswith(".weight_quantized")}


def test_auto_writes_exactly_the_int8_weights_it_refined(routes):
    _, _, max_int8, auto_int8, _ = routes
    document = json.loads(auto_int8.ranges_path.read_text())
    pinned = document["adapted_weights"]
    written, rounded = int8_weight_levels(auto_int8.int8_path), int8_weight_levels(max_int8.int8_path)
    assert sorted(pinned) == sorted(written) and len(written) == 19  # every conv of the x2
    moved = 0
    for name, entry in pinned.items():
        levels = np.frombuffer(base64.b64decode(entry["levels_int8_base64"]), np.int8).reshape(entry["shape"])
        assert np.array_equal(written[name], levels), name  # onnxruntime's quantizer kept them as refined
        moved += int(np.sum(written[name] != rounded[name]))  # max: the same equalized weights, rounded to nearest
    assert moved > 0, "the refinement moved no weight off its nearest level"


def test_auto_refuses_ranges_whose_adapted_weights_do_not_fit(routes, tmp_path, invoke):
    _, fp32, _, auto_int8, _ = routes
    document = json.loads(auto_int8.ranges_path.read_text())
    entry = document["adapted_weights"]["conv_1.weight"]
    entry["levels_int8_base64"] = base64.b64encode(b"\x01" * 5).decode()  # 5 levels for a 32x3x3x3 weight
    tampered = tmp_path / "tampered.ranges.json"
    tampered.write_text(json.dumps(document))
    code, _, err = invoke("quantize", "--model", fp32, "--ranges", tampered, "-o", tmp_path / "t.int8.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "adapted weights do not fit" in err, err
    assert not list(tmp_path.glob("t.int8*"))


def not_dipnet(path):
    """An SR-shaped ONNX (conv to 12 channels, DepthToSpace x2) that is not a DIPNet."""
    weight = numpy_helper.from_array(np.full((12, 3, 3, 3), 0.01, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("DepthToSpace", ["y"], ["output"], blocksize=2, mode="CRD")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, HEIGHT, WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2 * HEIGHT, 2 * WIDTH])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("case", ["no-equalize", "not-dipnet"])
def test_auto_refusals_are_one_line(case, routes, tmp_path, invoke):
    _, fp32, *_ = routes
    model = not_dipnet(tmp_path / "other.onnx") if case == "not-dipnet" else fp32
    extra = ["--no-equalize"] if case == "no-equalize" else []
    code, _, err = invoke("quantize", "--model", model, "--method", "auto", "--calib", CALIBRATION, "--limit", 1,
                          "-o", tmp_path / "x.int8.onnx", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "auto" in err, err
    assert not list(tmp_path.glob("x.int8*"))


@pytest.mark.parametrize("checkpoint, steps", [(PACKAGED_WEIGHTS, 1000), ("official_x4", 3000)])
def test_default_steps_are_1000_per_started_100k_conv_weights(checkpoint, steps, request):
    """93,664 conv weights (x2 default) -> 1,000 refinement steps; 242,820 (official x4, ESA) -> 3,000."""
    from dipnet_deploy.ptq import default_steps, resolved

    path = request.getfixturevalue(checkpoint) if checkpoint == "official_x4" else checkpoint
    model = load_checkpoint(path).model
    graph = helper.make_graph([], "weights", [], [], [numpy_helper.from_array(value.numpy(), name)
                                                       for name, value in model.state_dict().items()])
    fp32 = helper.make_model(graph)
    conv_weights = sum(value.numel() for value in model.state_dict().values() if value.dim() == 4)
    assert conv_weights == {1000: 93_664, 3000: 242_820}[steps]
    assert default_steps(fp32) == steps and resolved(AutoOptions(), fp32).iters == steps
    assert resolved(AutoOptions(iters=7), fp32).iters == 7


def test_cli_auto_steps_reach_the_refinement_and_are_recorded(routes, tmp_path, invoke):
    work, fp32, *_ = routes
    code, out, err = invoke("quantize", "--model", fp32, "--calib", work / "calib", "--method", "auto",
                            "--auto-steps", "3", "-o", tmp_path / "a.int8.onnx", "--json")
    assert code == 0, err
    ranges = json.loads(out.strip().splitlines()[-1])["ranges"]
    assert json.loads(open(ranges).read())["parameters"]["iters"] == 3
    code, _, err = invoke("quantize", "--model", fp32, "--calib", work / "calib", "--auto-steps", "3",
                          "-o", tmp_path / "b.int8.onnx")
    assert code == 2 and err.count("\n") == 1 and "--auto-steps: applies to --method auto with --calib only" in err
    assert not (tmp_path / "b.int8.onnx").exists()
    code, _, err = invoke("quantize", "--model", fp32, "--ranges", ranges, "--method", "auto", "--auto-steps", "3",
                          "-o", tmp_path / "c.int8.onnx")
    assert code == 2 and "--auto-steps: applies to --method auto with --calib only" in err
    assert not (tmp_path / "c.int8.onnx").exists()


def test_refine_resolves_its_default_steps(routes, monkeypatch):
    """``refine`` called with default options runs ``default_steps`` of the model it is given."""
    from dipnet_deploy.ptq import default_steps, refine

    work, fp32, max_int8, _, held_out = routes
    assert default_steps(onnx.load(str(fp32))) == 1000  # the exported x2 counts as its checkpoint does
    monkeypatch.setattr("dipnet_deploy.ptq.STEPS_PER_WEIGHTS", (2, 100_000))
    tensors = {name: (r["min"], r["max"]) for name, r in json.loads(max_int8.ranges_path.read_text())["tensors"].items()}
    totals = []

    def progress(iterable, description, total):
        totals.append(total)
        return iterable

    refinement = refine(onnx.load(str(fp32)), tensors, np.concatenate(held_out[:2]), progress=progress)
    assert totals == [2] and len(refinement.weights) == 19  # the x2 convs: 19 weights, no biases
