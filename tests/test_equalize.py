"""Activation equalization: same fp32 function, no range grows, ranges follow exactly, int8 gains."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.calibrate import channel_ranges
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.equalize import apply_equalization, channel_spaces, equalization_scales, equalized_channel_ranges
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess
from dipnet_deploy.quantize import QuantizeOptions, VendorInputs, default_calibration_dir, quantize
from dipnet_deploy.range_graphs import float_tensors, values_model

from .conftest import EVAL, int8_fidelity, need, whole_image_ranges

HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def x2_trained(tmp_path_factory):
    """The packaged (trained) x2 weights exported at 64x96: real activation statistics."""
    work = tmp_path_factory.mktemp("x2_trained")
    return export(load_checkpoint(PACKAGED_WEIGHTS), work / "x2.onnx", ExportOptions(HEIGHT, WIDTH)).onnx_path


def calibration_files():
    return list_images(default_calibration_dir())


def run(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(values_model(model, names).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"input": x})


def test_channel_spaces_of_the_x2_graph(x2_trained):
    model = onnx.load(str(x2_trained))
    spaces = channel_spaces(model)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    # trunk (conv_1, first residual, conv_2, long skip), 3 block-to-block, last block out, 2 inside each block
    assert len(spaces) == 1 + 3 + 1 + 4 * 2
    scaled = [name for space in spaces for name in space.tensors]
    assert len(scaled) == len(set(scaled))
    # everything is rescaled but the image input and the conv feeding PixelShuffle (DepthToSpace)
    assert set(float_tensors(model)) - set(scaled) == {"input", convs[-1].output[0]}
    trunk = next(space for space in spaces if convs[0].output[0] in space.tensors)
    assert convs[-2].output[0] in trunk.tensors  # conv_2 adds to conv_1's output
    assert sorted(w for space in spaces for w, _ in space.producers) == sorted(n.input[1] for n in convs[:-1])
    assert sorted(w for space in spaces for w in space.consumers) == sorted(n.input[1] for n in convs[1:])


def test_official_x4_esa_spaces(official_x4, tmp_path):
    model = onnx.load(str(export(load_checkpoint(official_x4), tmp_path / "x4.onnx", ExportOptions(48, 64)).onnx_path))
    spaces = channel_spaces(model)
    # per block: c1, c2, ESA conv1, conv2 (+MaxPool), conv3 + conv_f (Resize, Add); block outputs via the
    # sigmoid-gated Mul; the trunk. conv4 feeds the Sigmoid and stays as it is.
    assert len(spaces) == 4 * 5 + 4 + 1
    frozen = set(float_tensors(model)) - {name for space in spaces for name in space.tensors}
    assert {node.op_type for node in model.graph.node if node.output[0] in frozen} == {"Conv", "Sigmoid"}
    assert all("conv4" in name or "Sigmoid" in name or "upsampler" in name for name in frozen - {"input"})


def test_equalized_model_computes_the_same_function(x2_trained):
    model = onnx.load(str(x2_trained))
    spaces = channel_spaces(model)
    rng = np.random.default_rng(0)
    scales = {space.key: (2.0 ** rng.uniform(-3, 3, space.channels)).astype(np.float32)
               for space in spaces}
    equalized = apply_equalization(model, spaces, scales)
    x = vendor_preprocess(read_rgb8(calibration_files()[0])[0], HEIGHT, WIDTH)
    trunk = spaces[0].tensors[0]
    (original_trunk, original_out), (scaled_trunk, scaled_out) = (
        run(m, x, [trunk, m.graph.output[0].name]) for m in (model, equalized))
    np.testing.assert_allclose(scaled_trunk, original_trunk * scales[spaces[0].key].reshape(1, -1, 1, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaled_out, original_out, rtol=0, atol=1e-5)  # measured 9.5e-7


def test_equalized_official_x4_computes_the_same_function(official_x4, tmp_path):
    """ESA: biased convs, MaxPool, linear Resize, the sigmoid gate; every rescaled tensor checked."""
    model = onnx.load(str(export(load_checkpoint(official_x4), tmp_path / "x4.onnx", ExportOptions(48, 64)).onnx_path))
    spaces = channel_spaces(model)
    rng = np.random.default_rng(1)
    scales = {space.key: (2.0 ** rng.uniform(-3, 3, space.channels)).astype(np.float32) for space in spaces}
    equalized = apply_equalization(model, spaces, scales)
    x = vendor_preprocess(read_rgb8(calibration_files()[1])[0], 48, 64)
    names = [name for space in spaces for name in space.tensors] + [model.graph.output[0].name]
    original, scaled = (dict(zip(names, run(m, x, names))) for m in (model, equalized))
    worst = 0.0
    for space in spaces:
        scale = scales[space.key].reshape(1, -1, 1, 1)
        for name in space.tensors:
            error = np.abs(scaled[name] - original[name] * scale).max() / (np.abs(original[name] * scale).max() + 1e-12)
            worst = max(worst, error)
    output = model.graph.output[0].name
    assert worst <= 5e-5, worst  # measured 5.2e-6 of each tensor's largest value
    assert np.abs(scaled[output] - original[output]).max() <= 1.5e-5  # measured 1.2e-6


def test_scales_grow_no_range_and_ranges_follow_exactly(x2_trained, tmp_path):
    model = onnx.load(str(x2_trained))
    files = calibration_files()
    low, high = channel_ranges(model, VendorInputs(files, HEIGHT, WIDTH))
    spaces = channel_spaces(model)
    scales = equalization_scales(model, spaces, low, high)
    every = np.concatenate(list(scales.values()))
    assert every.min() >= 1.0 and np.median(every) > 1.3  # measured 1.50: most channels use 2/3 of the range
    derived_low, derived_high = equalized_channel_ranges(spaces, scales, low, high)
    path = tmp_path / "equalized.onnx"
    onnx.save(apply_equalization(model, spaces, scales), str(path))
    measured = whole_image_ranges(path, files, HEIGHT, WIDTH)  # independent: a run of the equalized model
    for name, (want_low, want_high) in measured.items():
        assert float(derived_low[name].min()) == pytest.approx(want_low, rel=2e-6, abs=1e-7)
        assert float(derived_high[name].max()) == pytest.approx(want_high, rel=2e-6, abs=1e-7)
        # no tensor's range grows: the equalized model keeps the original's max-calibrated ranges
        assert want_low >= float(low[name].min()) * (1 + 2e-6) - 1e-7
        assert want_high <= float(high[name].max()) * (1 + 2e-6) + 1e-7


def test_per_tensor_weights_keep_their_range(x2_trained):
    model = onnx.load(str(x2_trained))
    low, high = channel_ranges(model, VendorInputs(calibration_files(), HEIGHT, WIDTH))
    spaces = channel_spaces(model)
    scales = equalization_scales(model, spaces, low, high, per_channel_weights=False)
    assert any((space_scales > 1).any() for space_scales in scales.values())
    before = {i.name: np.abs(numpy_helper.to_array(i)).max() for i in model.graph.initializer}
    after = {i.name: np.abs(numpy_helper.to_array(i)).max() for i in apply_equalization(model, spaces, scales).graph.initializer}
    assert all(after[name] <= before[name] * (1 + 1e-6) for name in before)


def test_symmetric_activations_use_the_symmetric_range(x2_trained):
    model = onnx.load(str(x2_trained))
    low, high = channel_ranges(model, VendorInputs(calibration_files(), HEIGHT, WIDTH))
    spaces = channel_spaces(model)
    asymmetric = equalization_scales(model, spaces, low, high)
    symmetric = equalization_scales(model, spaces, low, high, symmetric_activations=True)
    # post-LeakyRelu tensors hardly go negative: [-m, m] leaves their channels more room
    assert all((symmetric[k] >= asymmetric[k]).all() for k in symmetric)
    assert sum(int((symmetric[k] > asymmetric[k] * 1.01).sum()) for k in symmetric) > 50
    scaled_low, scaled_high = equalized_channel_ranges(spaces, symmetric, low, high)
    for name in scaled_low:
        before = max(-float(low[name].min()), float(high[name].max()))
        assert max(-float(scaled_low[name].min()), float(scaled_high[name].max())) <= before * (1 + 1e-6)


def test_equalization_gains_int8_accuracy_and_reuses_byte_identically(x2_trained, tmp_path, invoke):
    images = list_images(need(EVAL / "Set5"))
    plain = quantize(x2_trained, tmp_path / "plain.int8.onnx", default_calibration_dir(),
                     options=QuantizeOptions(equalize=False)).int8_path
    code, out, err = invoke("quantize", "--model", x2_trained, "-o", tmp_path / "eq.int8.onnx", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    card = json.loads((tmp_path / "eq.int8.json").read_text())
    assert card["equalization"]["channel_spaces"] == 13 and card["equalization"]["rescaled_channels"] > 200
    assert json.loads((tmp_path / "plain.int8.json").read_text())["equalization"] is None
    gain = (int8_fidelity(x2_trained, tmp_path / "eq.int8.onnx", images, HEIGHT, WIDTH)
            - int8_fidelity(x2_trained, plain, images, HEIGHT, WIDTH))
    assert gain > 1.0, gain  # measured 1.62 dB
    code, _, err = invoke("quantize", "--model", x2_trained, "--ranges", summary["ranges"], "-o", tmp_path / "again.int8.onnx")
    assert code == 0, err
    assert (tmp_path / "again.int8.onnx").read_bytes() == (tmp_path / "eq.int8.onnx").read_bytes()
