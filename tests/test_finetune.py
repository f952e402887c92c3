"""Quantization-aware fine-tuning: the simulation against onnxruntime, the learned-ranges chain, bad input."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess
from dipnet_deploy.qat import (
    FIXED_POINTS,
    QuantSimDIPNet,
    fake_quant_activation,
    fake_quant_weight,
    onnx_point_names,
    range_owner,
    round_ste,
)
from dipnet_deploy.qdq_graph import dequantize_early
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.runtime import ort_options

from .conftest import CALIBRATION, image_folder, random_train_model


def quant_params(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """Quantized float tensor -> (scale, zero point) of its QuantizeLinear, read from the int8 graph."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


@pytest.fixture(scope="module")
def calib_images(tmp_path_factory):
    return image_folder(tmp_path_factory, "calib", list_images(CALIBRATION)[:3])


def max_quantized(checkpoint, work, height, width, calib_images):
    """Export and quantize with max ranges and no equalization: (fp32 path, int8 path, ranges)."""
    fp32 = export(load_checkpoint(checkpoint), work / "m.onnx", ExportOptions(height=height, width=width)).onnx_path
    result = quantize(fp32, work / "m.int8.onnx", calib_images, None, QuantizeOptions(equalize=False), warn=lambda m: None)
    ranges = json.loads(result.ranges_path.read_text())["tensors"]
    return fp32, result.int8_path, ranges


def sim_from_tensor_ranges(checkpoint, fp32_path, ranges) -> QuantSimDIPNet:
    """The simulation with the calibrated ranges of the int8 graph (fixed points too)."""
    names = onnx_point_names(onnx.load(str(fp32_path)).graph)
    learned = {n: (ranges[t]["min"], ranges[t]["max"]) for t, n in names.items()
               if range_owner(n) == n and n not in FIXED_POINTS}
    fixed = {n: (ranges[t]["min"], ranges[t]["max"]) for t, n in names.items() if n in FIXED_POINTS}
    return QuantSimDIPNet(load_checkpoint(checkpoint).model, learned, fixed), names


def test_fake_quant_equals_onnxruntime_quantize_dequantize():
    """Forward: QuantizeLinear/DequantizeLinear with the scale and zero point onnxruntime's quantizer computes."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 16, 16)) * 2).astype(np.float32)
    for low, high in ((-1.3, 2.1), (0.2, 3.0), (-4.0, -0.5), (-0.0581, 1.0352)):
        zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), np.uint8(0), np.uint8(255))
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, x.shape)],
            [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
             numpy_helper.from_array(np.asarray(zero_point, np.uint8), "z")])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
        expected = ort.InferenceSession(model.SerializeToString(), ort_options(),
                                        providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        got = fake_quant_activation(torch.from_numpy(x), torch.tensor(low), torch.tensor(high)).numpy()
        step = float(scale)
        assert np.abs(got - expected).max() <= 1e-6 * max(1.0, abs(high), abs(low))
        assert np.mean(np.abs(got - expected) > step / 2) == 0  # no value on another level


def test_fused_gradients_equal_the_autograd_formula():
    """The fused backward equals autograd through the plain straight-through formula (LSQ)."""

    def plain(x, low, high):
        low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
        scale = (high - low) / 255
        zero_point = torch.clamp(round_ste(-low / scale), 0, 255)
        return (torch.clamp(round_ste(x / scale) + zero_point, 0, 255) - zero_point) * scale

    torch.manual_seed(0)
    x, weight = torch.randn(2, 3, 8, 8) * 2, torch.randn(2, 3, 8, 8)
    grads = []
    for function in (plain, fake_quant_activation):
        xs = x.clone().requires_grad_()
        low, high = torch.tensor(-1.3, requires_grad=True), torch.tensor(2.1, requires_grad=True)
        (function(xs, low, high) * weight).sum().backward()
        grads.append((xs.grad, low.grad, high.grad))
    for mine, reference in zip(grads[1], grads[0]):
        assert torch.allclose(mine, reference, atol=1e-5, rtol=1e-5)
    assert grads[1][1].abs() > 0 and grads[1][2].abs() > 0  # both ends of the range learn


def test_weight_fake_quant_equals_onnxruntime_int8_weights(tmp_path, calib_images):
    _, int8_path, _ = max_quantized(PACKAGED_WEIGHTS, tmp_path, 40, 48, calib_images)
    int8 = dequantize_early(onnx.load(str(int8_path)))  # the weights as the quantizer wrote them, unpadded
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    model = load_checkpoint(PACKAGED_WEIGHTS).model
    checked = 0
    for name, weight in model.state_dict().items():
        if not name.endswith(".weight"):
            continue
        dequantized = inits[f"{name}_quantized"].astype(np.float32) * inits[f"{name}_scale"].reshape(-1, 1, 1, 1)
        simulated = fake_quant_weight(weight).numpy()
        step = inits[f"{name}_scale"].reshape(-1, 1, 1, 1)
        assert np.all(np.abs(simulated - dequantized) <= 1e-6 * step * 127 + 1e-9), name
        checked += 1
    assert checked == 19


@pytest.mark.parametrize("variant", ["x2", "x4-ntire"])
def test_points_are_exactly_the_quantized_tensors(variant, tmp_path, calib_images):
    """Every tensor onnxruntime quantizes has a point, and the simulation visits exactly those points."""
    checkpoint = tmp_path / "w.pth"
    torch.save(random_train_model(PRESETS[variant].replace(expansion=16), std=0.05).state_dict(), checkpoint)
    fp32, int8, _ = max_quantized(checkpoint, tmp_path, 40, 48, calib_images)
    names = onnx_point_names(onnx.load(str(fp32)).graph)
    assert set(names) == set(quant_params(onnx.load(str(int8))))
    sim = QuantSimDIPNet(load_checkpoint(checkpoint).model, {})
    sim.observed = {}
    sim(torch.rand(1, 3, 40, 48))
    assert sorted(sim.visited) == sorted(names.values())
    assert len(names) == (37 if variant == "x2" else 77)
    # MaxPool and Resize outputs carry their input's scale and zero point in the int8 graph
    params = quant_params(onnx.load(str(int8)))
    by_point = {point: tensor for tensor, point in names.items()}
    tied = [point for point in names.values() if range_owner(point) != point]
    assert len(tied) == (0 if variant == "x2" else 8)
    for point in tied:
        assert params[by_point[point]] == params[by_point[range_owner(point)]]


def test_simulation_reproduces_onnxruntime_int8(tmp_path, calib_images):
    """With the calibrated ranges of a real int8 model, the simulation gives onnxruntime's output.

    Measured at 48x64 with the packaged x2: identical outputs; at 96x160, 53 dB between them
    (rounding ties inside int8 kernels flip single values, which the next layers spread).
    """
    fp32, int8, ranges = max_quantized(PACKAGED_WEIGHTS, tmp_path, 48, 64, calib_images)
    sim, names = sim_from_tensor_ranges(PACKAGED_WEIGHTS, fp32, ranges)
    x = vendor_preprocess(read_rgb8(list_images(calib_images)[0])[0], 48, 64)
    ort_out, fp32_out = (ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0] for path in (int8, fp32))
    with torch.no_grad():
        simulated = sim(torch.from_numpy(x)).numpy()
    levels = lambda a: np.round(np.clip(a * 255, 0, 255))  # noqa: E731
    disagreement = np.mean((levels(ort_out) - levels(simulated)) ** 2)
    int8_error = np.mean((levels(ort_out) - levels(fp32_out)) ** 2)
    assert 10 * np.log10(255**2 / max(disagreement, 1e-12)) >= 50 and disagreement < int8_error / 10


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, calib_images):
    """A few fine-tuning iterations of the packaged x2 on tiny patches (the CI smoke test)."""
    from dipnet_deploy.finetune import FinetuneOptions, finetune

    work = tmp_path_factory.mktemp("ft")
    options = FinetuneOptions(iters=4, batch=4, patch=32, save_every=2, threads=2)
    result = finetune(PACKAGED_WEIGHTS, calib_images, work / "ft.pth", options, warn=lambda m: None)
    return work, result


def test_finetune_checkpoint_exports_and_quantizes_with_learned_ranges(finetuned, calib_images, invoke):
    work, result = finetuned
    saved = torch.load(result.out, weights_only=True)
    learned = saved["quantization"]["ranges"]
    assert saved["iter"] == 4 and result.points == len(learned) == 35  # 37 points, input and last conv fixed
    code, out, err = invoke("export", "--checkpoint", result.out, "--height", 40, "--width", 48,
                            "-o", work / "ft.onnx", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["card"]
    code, out, err = invoke("quantize", "--model", work / "ft.onnx", "--method", "learned", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["method"] == "learned" and summary["images_used"] == 0 and not summary["equalized"]
    # every Q node's scale and zero point are onnxruntime's for exactly the learned range of its point
    int8 = onnx.load(summary["int8"])
    names = onnx_point_names(onnx.load(str(work / "ft.onnx")).graph)
    params = quant_params(int8)
    for tensor, point in names.items():
        low, high = (learned | {k: list(v) for k, v in FIXED_POINTS.items()})[range_owner(point)]
        zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), np.uint8(0), np.uint8(255))
        assert params[tensor] == (pytest.approx(float(scale), rel=1e-6), int(zero_point)), point
    card = json.loads(open(summary["card"]).read())
    agreement = card["simulation_agreement"]
    # psnr_db None: the simulation equals onnxruntime's output exactly
    assert (agreement["psnr_db"] is None or agreement["psnr_db"] >= 45) and agreement["max_abs_diff_levels"] <= 16

    # compare against the ORIGINAL fp32: the report says where the int8 model came from
    code, _, err = invoke("export", "--height", 40, "--width", 48, "-o", work / "original.onnx")
    assert code == 0, err
    code, _, err = invoke("compare", work / "report", "--fp32", work / "original.onnx", "--int8", summary["int8"],
                          "--data", calib_images, "--limit", 1, "--repeats", 1)
    assert code == 0, err
    metrics = json.loads((work / "report" / "metrics.json").read_text())
    assert metrics["int8_origin"] == {"method": "learned", "fp32_onnx": str(work / "ft.onnx"),
                                      "from_this_fp32": False, "finetuned": True}
    assert "made from fine-tuned weights" in (work / "report" / "report.md").read_text()


def test_finetune_resume_continues_exactly(finetuned, calib_images, tmp_path):
    """Interrupted after iteration 2 of 4 and resumed: the same weights, EMA and ranges as one run."""
    from dipnet_deploy.finetune import FinetuneOptions, finetune

    _, result = finetuned

    def interrupt(iterations, _description, _total):
        for iteration in iterations:
            if iteration == 3:
                raise KeyboardInterrupt  # right after iteration 2 and its checkpoint
            yield iteration

    options = FinetuneOptions(iters=4, batch=4, patch=32, save_every=2, threads=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(PACKAGED_WEIGHTS, calib_images, tmp_path / "a.pth", options, progress=interrupt, warn=lambda m: None)
    options.resume = tmp_path / "a.pth"
    finetune(PACKAGED_WEIGHTS, calib_images, tmp_path / "b.pth", options, warn=lambda m: None)
    whole, resumed = torch.load(result.out, weights_only=True), torch.load(tmp_path / "b.pth", weights_only=True)
    for key in ("params", "params_ema"):
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    assert whole["quantization"]["ranges"] == resumed["quantization"]["ranges"]
    assert whole["quantization"]["ranges_params"] == resumed["quantization"]["ranges_params"]


def test_learned_without_ranges_and_diverging_loss_are_one_line(tmp_path, calib_images, invoke, monkeypatch):
    fp32 = export(load_checkpoint(PACKAGED_WEIGHTS), tmp_path / "plain.onnx", ExportOptions(height=40, width=48)).onnx_path
    code, out, err = invoke("quantize", "--model", fp32, "--method", "learned")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "carries no learned ranges" in err
    assert not (tmp_path / "plain.int8.onnx").exists() and not (tmp_path / "plain.ranges.json").exists()

    import torch.nn.functional as F

    calls = {"n": 0}

    def l1_turning_nan(output, target):  # the loss of iteration 3 is NaN, as after a blow-up
        calls["n"] += 1
        loss = F.l1_loss(output, target)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr("dipnet_deploy.finetune.LOSSES", {"l1": l1_turning_nan})
    out_path = tmp_path / "nan.pth"
    code, _, err = invoke("finetune", "--data", calib_images, "--iters", 6, "--batch", 2, "--patch", 32,
                          "--save-every", 1, "--out", out_path, "--threads", 2, "--no-compile")
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and last.startswith("dipnet-deploy: error: --lr: the loss became nan at iteration 3"), err
    assert "Traceback" not in err
    kept = torch.load(out_path, weights_only=True)  # the last good checkpoint
    assert kept["iter"] == 2 and all(torch.isfinite(t).all() for t in kept["params"].values())

    image = sorted(calib_images.iterdir())[0]
    before = image.read_bytes()
    code, _, err = invoke("finetune", "--data", calib_images, "--iters", 2, "--out", image)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(image) in err and image.read_bytes() == before

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = invoke("finetune", "--data", empty, "--iters", 2, "--out", tmp_path / "x.pth")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(empty) in err
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda q: q["ranges"].update({"conv_1": [float("nan"), 1.0]}), "must be finite"),
    (lambda q: q["ranges"].update({"conv_1": [2.0, 1.0]}), "min < max"),
    (lambda q: q["ranges"].update({"conv_1": "wide"}), "not two numbers"),
    (lambda q: q["ranges"].pop("conv_1"), "do not fit the exported graph"),
    (lambda q: q.pop("ranges"), "has no ranges"),
])
def test_damaged_learned_ranges_are_refused(damage, message, finetuned, tmp_path, invoke):
    _, result = finetuned
    saved = torch.load(result.out, weights_only=True)
    damage(saved["quantization"])
    path = tmp_path / "damaged.pth"
    torch.save(saved, path)
    code, _, err = invoke("export", "--checkpoint", path, "--height", 40, "--width", 48, "-o", tmp_path / "d.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and str(path) in err, err
    assert not (tmp_path / "d.onnx").exists()


def test_equalized_start_is_the_same_function_with_the_same_tensor_ranges(calib_images):
    """Equalization rescales channels (weights change) yet keeps the float output and every
    quantized tensor's [min, max] on the images it was measured on: only channel widths grow."""
    from dipnet_deploy.finetune import equalized_start
    from dipnet_deploy.qat import observe_ranges
    from dipnet_deploy.sr_protocol import make_pair, to_input

    model = load_checkpoint(PACKAGED_WEIGHTS).model
    images = [to_input(make_pair(read_rgb8(path)[0], 2)[1][:96, :128]) for path in list_images(calib_images)[:2]]
    equalized = equalized_start(model, images)
    changed = [name for name, value in equalized.state_dict().items() if not torch.equal(value, model.state_dict()[name])]
    assert len(changed) >= 8  # conv weights on both sides of the rescaled channels
    with torch.no_grad():
        x = torch.from_numpy(images[0])
        assert (equalized(x) - model(x)).abs().max() < 1e-5
    before = observe_ranges(model, [torch.from_numpy(i) for i in images])
    after = observe_ranges(equalized, [torch.from_numpy(i) for i in images])
    assert after.keys() == before.keys()
    for name, (low, high) in before.items():
        assert after[name] == (pytest.approx(low, rel=1e-4, abs=1e-5), pytest.approx(high, rel=1e-4, abs=1e-5)), name


def test_finetune_command_defaults_are_the_api_defaults(invoke):
    """`dipnet-deploy finetune` without options runs exactly `FinetuneOptions()`."""
    from dipnet_deploy.cli import finetune as command
    from dipnet_deploy.finetune import FinetuneOptions

    defaults = FinetuneOptions()
    fields = {"compile_step": "compile"}
    checked = set()
    for parameter in command.params:
        name = fields.get(parameter.name, parameter.name)
        if name in ("iters", "batch", "lr", "range_lr", "equalize", "target", "loss",
                    "val_every", "save_every", "seed", "device", "compile"):
            assert parameter.default == getattr(defaults, name), name
            checked.add(name)
    assert len(checked) == 12


def test_compiled_step_computes_the_eager_loss(calib_images, tmp_path):
    """The compiled student and teacher are the same functions: iteration 1 (the same batch through
    the same starting weights) gives eager PyTorch's loss, up to a few flipped rounding levels."""
    from dipnet_deploy.finetune import FinetuneOptions, finetune

    losses = {}
    for compiled in (False, True):
        options = FinetuneOptions(iters=1, batch=4, patch=32, threads=2, compile=compiled)
        losses[compiled] = finetune(PACKAGED_WEIGHTS, calib_images, tmp_path / f"{compiled}.pth", options,
                                    warn=lambda m: None).last_loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert losses[True] != 0


def test_failed_compilation_warns_once_and_trains_exactly_as_eager(calib_images, tmp_path, monkeypatch):
    from dipnet_deploy.finetune import FinetuneOptions, finetune

    def unusable(module):
        def call(*args):
            raise RuntimeError("InductorError: C++ compiler not found\nmore detail")
        return call

    options = FinetuneOptions(iters=2, batch=2, patch=32, threads=2, compile=False)
    finetune(PACKAGED_WEIGHTS, calib_images, tmp_path / "eager.pth", options, warn=lambda m: None)
    monkeypatch.setattr("dipnet_deploy.qat.torch.compile", unusable)
    warnings = []
    options.compile = True
    finetune(PACKAGED_WEIGHTS, calib_images, tmp_path / "fallback.pth", options, warn=warnings.append)
    assert warnings == ["torch.compile is not usable here (InductorError: C++ compiler not found); "
                        "running without it (about half the speed)"]
    eager, fallback = (torch.load(tmp_path / name, weights_only=True) for name in ("eager.pth", "fallback.pth"))
    for key in ("params", "params_ema"):
        for name, tensor in eager[key].items():
            assert torch.equal(tensor, fallback[key][name]), (key, name)
    assert eager["quantization"]["ranges"] == fallback["quantization"]["ranges"]
