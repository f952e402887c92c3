"""Calibration and int8 quantization: exact streaming ranges, stock parity, determinism, bad input."""

import json
import shutil

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dipnet_deploy.calibrate import calibrate, channel_ranges
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess
from dipnet_deploy.observers import EntropyObserver, MaxObserver, MseObserver, PercentileObserver
from dipnet_deploy.qat import image_grid_ranges
from dipnet_deploy.quantize import QuantizeOptions, VendorInputs, quantize
from dipnet_deploy.range_graphs import derived_ranges, float_tensors, values_model
from dipnet_deploy.runtime import ort_options

from .conftest import CALIBRATION, EVAL, TRAIN, image_folder, int8_fidelity, need, random_train_model, whole_image_ranges


@pytest.fixture(scope="module")
def x2_small(tmp_path_factory):
    """A random-weight x2 training checkpoint exported at 40x56."""
    import torch

    from dipnet_deploy.config import PRESETS

    work = tmp_path_factory.mktemp("x2")
    checkpoint = work / "x2.pth"
    torch.save(random_train_model(PRESETS["x2"].replace(expansion=24), std=0.08).state_dict(), checkpoint)
    return export(load_checkpoint(checkpoint), work / "x2.onnx", ExportOptions(height=40, width=56)).onnx_path


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """Four of the shipped calibration photos (in the project: these tests never skip)."""
    return image_folder(tmp_path_factory, "calib", list_images(CALIBRATION)[:4])


@pytest.fixture(scope="module")
def train_calib_dir(tmp_path_factory):
    """Four photos of ../shared's training set: the stock-parity thresholds below were measured on them."""
    return image_folder(tmp_path_factory, "train_calib", list_images(need(TRAIN))[::40][:4])


def stock_reader(files, height, width):
    """onnxruntime's CalibrationDataReader over the seed-preprocessed files (for stock quantize_static)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": vendor_preprocess(read_rgb8(p)[0], height, width)} for p in files])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def test_streaming_max_ranges_equal_whole_image_ranges(x2_small, calib_dir):
    files = sorted(calib_dir.iterdir())
    got = calibrate(onnx.load(str(x2_small)), VendorInputs(files, 40, 56), MaxObserver()).ranges
    want = whole_image_ranges(x2_small, files, 40, 56)
    assert set(got) == set(want) and len(got) == 1 + 19 + 12 + 5  # input, convs, leaky, adds
    # Pre-activation ranges are mapped back from the fused Conv+LeakyRelu output (v / alpha):
    # equal up to that one float rounding; every other range is bit-exact.
    pre_activation = set(derived_ranges(onnx.load(str(x2_small))))
    assert {name for name in want if got[name] != want[name]} <= pre_activation
    for name in pre_activation & set(want):
        assert got[name] == pytest.approx(want[name], rel=3e-7, abs=0)


def test_per_channel_ranges_equal_whole_image_ranges(x2_small, calib_dir):
    """Pass 1 reads blocked NCHWc tensors in place: per channel, exact, padding dropped."""
    files = sorted(calib_dir.iterdir())
    low, high = channel_ranges(onnx.load(str(x2_small)), VendorInputs(files, 40, 56))
    want_low, want_high = whole_image_ranges(x2_small, files, 40, 56, per_channel=True)
    pre_activation = set(derived_ranges(onnx.load(str(x2_small))))
    assert set(low) == set(want_low)
    for name in want_low:
        assert low[name].shape == want_low[name].shape == (onnx_channels(x2_small, name),)
        tolerance = 3e-7 if name in pre_activation else 0
        np.testing.assert_allclose(low[name], want_low[name], rtol=tolerance, atol=0)
        np.testing.assert_allclose(high[name], want_high[name], rtol=tolerance, atol=0)


def onnx_channels(model_path, name):
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    return next(vi.type.tensor_type.shape.dim[1].dim_value for vi in [*inferred.graph.input, *inferred.graph.value_info]
                if vi.name == name)


def test_ranges_exact_when_blocked_layout_pads_channels(calib_dir, tmp_path):
    """24 channels are padded to 32 in 16-lane NCHWc blocks: the padding's zeros must not leak into the range."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((24, 3, 3, 3)) * 0.01).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.full(24, 5.0, np.float32), "b")  # all values near +5: true min far from 0
    weight2 = numpy_helper.from_array((rng.standard_normal((8, 24, 3, 3)) * 0.1).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["positive"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["positive", "w2"], ["output"], pads=[1, 1, 1, 1])],
        "padded", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 40, 56])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 40, 56])], [weight, bias, weight2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "padded.onnx"
    onnx.save(model, str(path))
    files = sorted(calib_dir.iterdir())
    got = calibrate(model, VendorInputs(files, 40, 56), MaxObserver()).ranges
    want = whole_image_ranges(path, files, 40, 56)
    assert got == want and got["positive"][0] > 4.0
    low, high = channel_ranges(model, VendorInputs(files, 40, 56))
    want_low, want_high = whole_image_ranges(path, files, 40, 56, per_channel=True)
    assert np.array_equal(low["positive"], want_low["positive"]) and np.array_equal(high["positive"], want_high["positive"])


def test_max_ranges_equal_stock_minmax_and_models_agree(x2_small, train_calib_dir, tmp_path):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data

    calib_dir = train_calib_dir

    files = sorted(calib_dir.iterdir())

    stock_model, stock_cache = tmp_path / "stock.onnx", tmp_path / "stock_cache.json"
    quantize_static(str(x2_small), str(stock_model), stock_reader(files, 40, 56), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(stock_cache))
    result = quantize(x2_small, tmp_path / "ours.int8.onnx", calib_dir, options=QuantizeOptions(equalize=False))
    ours = json.loads(result.ranges_path.read_text())["tensors"]
    stock = load_tensors_data(stock_cache)
    # the image input and the last conv's output (the image before DepthToSpace) sit on the uint8 grid of [0, 1]
    last_conv = [n for n in onnx.load(str(x2_small)).graph.node if n.op_type == "Conv"][-1].output[0]
    assert set(image_grid_ranges(onnx.load(str(x2_small)).graph)) == {"input", last_conv}
    gridded = {}
    for name, data in stock.items():
        low, high = (np.asarray(v).item() for v in data.range_value)
        if name in ("input", last_conv):
            assert (ours[name]["min"], ours[name]["max"]) == (0.0, 1.0)
        else:  # Stock's graph runs other kernels (no fusions), so equal up to float rounding.
            assert ours[name]["min"] == pytest.approx(low, abs=1e-7, rel=1e-5)
            assert ours[name]["max"] == pytest.approx(high, abs=1e-7, rel=1e-5)
        # stock's quantizer writes the model from our ranges: any difference is then the model's writing, not
        # float rounding of the ranges (which flips roundings down the chain, more on some CPUs than others)
        gridded[name] = (np.float32(ours[name]["min"]), np.float32(ours[name]["max"]))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, gridded), stock_cache)
    quantize_static(str(x2_small), str(stock_model), None, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibration_cache_path=str(stock_cache))
    x = vendor_preprocess(read_rgb8(files[0])[0], 40, 56)

    def run(path):
        return ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    # our graph form's rewrites are exact, and integer sums are exact on every CPU (ort_options)
    np.testing.assert_array_equal(run(result.int8_path), run(stock_model))


def test_all_convs_int8_ranges_reuse_is_byte_identical(x2_small, calib_dir, tmp_path, invoke):
    first, second = tmp_path / "a.int8.onnx", tmp_path / "b.int8.onnx"
    code, out, err = invoke("quantize", "--model", x2_small, "--calib", calib_dir, "-o", first, "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["convs"] == summary["int8_convs"] == 19 and summary["images_used"] == 4
    card = json.loads(first.with_suffix(".json").read_text())
    assert card["conv_report"] == {"convs": 19, "int8_weights": 19, "quantized_inputs": 19}
    code, _, err = invoke("quantize", "--model", x2_small, "--ranges", summary["ranges"], "-o", second)
    assert code == 0, err
    assert first.read_bytes() == second.read_bytes()
    code, _, _ = invoke("quantize", "--model", x2_small, "--calib", calib_dir, "-o", tmp_path / "c.int8.onnx")
    assert (tmp_path / "c.int8.onnx").read_bytes() == first.read_bytes()


def test_graph_form_moves_uint8_levels_pads_edge_convs_and_the_output_is_bit_identical(x2_small, calib_dir, tmp_path):
    """quantize writes DepthToSpace on the last conv's uint8 levels, the DequantizeLinear after it, and pads
    the two edge convs (3 input, 12 output channels) with zero weights for onnxruntime's fast integer kernel;
    the reference is onnxruntime's own QDQ model from the same ranges (DequantizeLinear before DepthToSpace,
    no padding)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    result = quantize(x2_small, tmp_path / "ours.int8.onnx", calib_dir, options=QuantizeOptions(equalize=False))
    ranges = json.loads(result.ranges_path.read_text())["tensors"]
    cache, stock = tmp_path / "cache.json", tmp_path / "stock.onnx"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {name: (np.float32(r["min"]), np.float32(r["max"]))
                                                             for name, r in ranges.items()}), cache)
    quantize_static(str(x2_small), str(stock), None, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibration_cache_path=str(cache),
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})

    def reads(path):  # op types from the last conv's output to the graph output
        graph = onnx.load(str(path)).graph
        readers = {name: node for node in graph.node for name in node.input}
        ops, name = [], [node for node in graph.node if node.op_type == "Conv"][-1].output[0]
        while name in readers:
            ops.append(readers[name].op_type)
            name = readers[name].output[0]
        return tuple(ops)

    assert reads(result.int8_path) == ("QuantizeLinear", "Slice", "DepthToSpace", "DequantizeLinear")
    card = json.loads(result.card_path.read_text())
    padded = card["fast_path_padding"]["convs"]
    assert [(c["channels"], c["padded"]) for c in padded] == [([3, 32], [4, 32]), ([32, 12], [32, 16])]
    ours = onnx.load(str(result.int8_path))
    weights = {i.name: numpy_helper.to_array(i) for i in ours.graph.initializer if i.name.endswith("weight_quantized")}
    assert [w.shape[:2] for w in weights.values()].count((32, 4)) == 1 and (16, 32) in [w.shape[:2] for w in weights.values()]
    assert "Pad" in {node.op_type for node in ours.graph.node}
    assert reads(stock) == ("QuantizeLinear", "DequantizeLinear", "DepthToSpace")
    x = np.random.default_rng(3).random((1, 3, 40, 56), dtype=np.float32)
    def run(path):
        return ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.array_equal(run(result.int8_path), run(stock))


def _observe(observer, values):
    observer.update_range("t", float(values.min()), float(values.max()))
    observer.update_values("t", values)
    return observer.compute()["t"]


def test_histogram_observers_on_a_known_distribution():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 200_000), [40.0, -30.0]]).astype(np.float32)  # two outliers
    low, high = _observe(PercentileObserver(99.9), values)
    bin_width = (40.0 + 30.0) / PercentileObserver().bins  # the histogram's resolution: the exact bound
    assert low == pytest.approx(np.quantile(values, 0.001), abs=bin_width)
    assert high == pytest.approx(np.quantile(values, 0.999), abs=bin_width)
    low, high = _observe(EntropyObserver(), values)  # KL clips the outliers, keeps the bulk
    assert -10 < low < -2.5 and 2.5 < high < 10
    # MSE: rounding error 200000 * (70 f / 255)^2 / 12 vs clipping (40 - 40 f)^2 + (30 - 30 f)^2
    # is minimal near f = 2500 / (2500 + 1256) = 0.666.
    low, high = _observe(MseObserver(), values)
    assert high == pytest.approx(40 * 0.666, abs=1.0) and low == pytest.approx(-30 * 0.666, abs=1.0)


@pytest.mark.parametrize("percentile", [99.9, 99.999])
def test_percentile_ranges_are_quantiles_of_the_whole_tensors(percentile, x2_small, calib_dir):
    """Streamed histograms (pass 2, tensors grouped under a budget) against np.quantile over every value."""
    model = onnx.load(str(x2_small))
    files = sorted(calib_dir.iterdir())
    got = calibrate(model, VendorInputs(files, 40, 56), PercentileObserver(percentile), budget_bytes=200_000).ranges
    names = float_tensors(model)
    session = ort.InferenceSession(values_model(model, names).SerializeToString(), providers=["CPUExecutionProvider"])
    values = {name: [] for name in names}
    for path in files:
        for name, value in zip(names, session.run(names, {"input": vendor_preprocess(read_rgb8(path)[0], 40, 56)})):
            values[name].append(value.ravel())
    tail = 1 - percentile / 100
    assert set(got) == set(names)
    clipped = 0
    for name in names:
        every = np.concatenate(values[name]).astype(np.float64)
        # the value below which `tail` of all values lie (no interpolation: in the tails, neighbouring values
        # can be bins apart); the histogram's answer is the outer edge of the bin holding it
        low, high = np.quantile(every, [tail, 1 - tail], method="inverted_cdf")
        bin_width = (every.max() - every.min()) / PercentileObserver().bins
        slack = 1e-6 * bin_width
        assert low - bin_width - slack <= got[name][0] <= low + slack, (name, (got[name][0] - low) / bin_width)
        assert high - slack <= got[name][1] <= high + bin_width + slack, (name, (got[name][1] - high) / bin_width)
        clipped += got[name][1] < every.max() - bin_width
    assert clipped > len(names) // 2  # the quantiles really clip (not the max range by accident)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_end_to_end(method, x2_small, calib_dir, tmp_path):
    result = quantize(x2_small, tmp_path / f"{method}.int8.onnx", calib_dir, options=QuantizeOptions(method=method))
    ranges = json.loads(result.ranges_path.read_text())["tensors"]
    reference = json.loads(quantize(x2_small, tmp_path / "max.int8.onnx", calib_dir).ranges_path.read_text())["tensors"]
    assert all(reference[n]["min"] <= r["min"] and r["max"] <= reference[n]["max"] + 1e-6 for n, r in ranges.items())
    assert any(r["max"] < reference[n]["max"] for n, r in ranges.items())


def test_quality_floor_official_x4_against_stock(official_x4, train_calib_dir, tmp_path):
    """int8-vs-fp32 PSNR on Set5 against stock quantize_static's (MinMax, per channel, QDQ)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calib_dir = train_calib_dir

    height, width = 96, 160
    fp32 = export(load_checkpoint(official_x4), tmp_path / "x4.onnx", ExportOptions(height, width)).onnx_path
    files = sorted(calib_dir.iterdir())

    stock = tmp_path / "stock.onnx"
    quantize_static(str(fp32), str(stock), stock_reader(files, height, width), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    ours = quantize(fp32, tmp_path / "x4.int8.onnx", calib_dir).int8_path
    unequalized = quantize(fp32, tmp_path / "x4.plain.int8.onnx", calib_dir, options=QuantizeOptions(equalize=False)).int8_path
    images = sorted(need(EVAL / "Set5").iterdir())
    models = {"ours": ours, "unequalized": unequalized, "stock": stock}
    mean = {k: int8_fidelity(fp32, p, images, height, width) for k, p in models.items()}
    # Without equalization: stock's ranges up to float rounding (fused vs unfused kernels) but for the image grid
    # (input and last conv output on [0, 1] in 1/255 steps), which only removes rounding: measured 36.120 vs 36.067 dB
    assert 0 < mean["unequalized"] - mean["stock"] < 0.15
    # Equalized: the same max ranges, each channel using more of them (measured 37.95 dB).
    assert mean["ours"] > mean["stock"] + 0.5, mean


def _png16(path):
    cv2.imwrite(str(path), (np.random.default_rng(0).random((64, 64, 3)) * 65535).astype(np.uint16))


def _gray_jpeg(path):
    cv2.imwrite(str(path), (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8))


def _truncated_png(path):
    ok, data = cv2.imencode(".png", (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
    path.write_bytes(data.tobytes()[: len(data) // 2])


def _tiny(path):
    cv2.imwrite(str(path), np.zeros((10, 10, 3), np.uint8))


SINGLE_BAD_IMAGES = {  # warning and continue
    "truncated.png": (_truncated_png, "skipped", False),
    "tiny.png": (_tiny, "smaller than", False),
    "deep.png": (_png16, "16-bit converted to 8-bit", True),
    "gray.jpg": (_gray_jpeg, "gray replicated to RGB", True),
}


@pytest.mark.parametrize("name", sorted(SINGLE_BAD_IMAGES))
def test_single_bad_images_warn_and_continue(name, x2_small, calib_dir, tmp_path, invoke):
    make, words, used = SINGLE_BAD_IMAGES[name]
    directory = tmp_path / "calib"
    shutil.copytree(calib_dir, directory)
    make(directory / name)
    code, out, err = invoke("quantize", "--model", x2_small, "--calib", directory, "-o", tmp_path / "m.onnx", "--json")
    assert code == 0, err
    assert any(words in line and name in line for line in err.splitlines()), err
    assert json.loads(out.strip().splitlines()[-1])["images_used"] == 4 + used


def _not_dipnet(tmp_path):
    path = tmp_path / "add.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["output"])], "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


def _other_ranges(tmp_path, x2_small, calib_dir):
    other = tmp_path / "other.onnx"
    model = onnx.load(str(x2_small))
    model.graph.initializer[0].float_data.extend([])  # same graph, different bytes below
    model.doc_string = "another model"
    onnx.save(model, str(other))
    return quantize(other, tmp_path / "other.int8.onnx", calib_dir).ranges_path


def _tampered_ranges(tmp_path, x2_small, calib_dir):
    """A ranges file of this model whose equalization scales lost a channel."""
    path = quantize(x2_small, tmp_path / "t.int8.onnx", calib_dir).ranges_path
    document = json.loads(path.read_text())
    key = next(iter(document["equalization"]["scales"]))
    document["equalization"]["scales"][key].pop()
    path.write_text(json.dumps(document))
    return path


BAD_RUNS = {
    "empty dir": (lambda t, m, c: ["--calib", (t / "empty").mkdir() or t / "empty"], "no calibration images"),
    "non-images": (lambda t, m, c: ["--calib", (t / "txt").mkdir() or (t / "txt" / "a.png").write_text("x") and
                                    t / "txt"], "none usable"),
    "not a dir": (lambda t, m, c: ["--calib", t / "missing"], "not a directory"),
    "int8 model": (lambda t, m, c: ["--calib", c, "--model", quantize(m, t / "q.int8.onnx", c).int8_path],
                   "already quantized"),
    "text model": (lambda t, m, c: ["--calib", c, "--model", (t / "x.onnx").write_text("hi") and t / "x.onnx"],
                   "not an ONNX model"),
    "not dipnet": (lambda t, m, c: ["--calib", c, "--model", _not_dipnet(t)], "no Conv nodes"),
    "foreign ranges": (lambda t, m, c: ["--ranges", _other_ranges(t, m, c)], "another model"),
    "tampered ranges": (lambda t, m, c: ["--ranges", _tampered_ranges(t, m, c)], "equalization scales do not fit"),
    "unwritable output": (lambda t, m, c: ["--calib", c, "-o", (t / "f").write_text("x") and t / "f" / "m.onnx"],
                          "cannot create"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_quantize_input_one_line_exit_2(case, x2_small, calib_dir, tmp_path, invoke):
    make, words = BAD_RUNS[case]
    args = make(tmp_path, x2_small, calib_dir)
    if "--model" not in args:
        args += ["--model", x2_small]
    before = {p for p in tmp_path.rglob("*")}
    code, out, err = invoke("quantize", *args, "-o" if "-o" not in args else "--json",
                            *([tmp_path / "out.int8.onnx"] if "-o" not in args else []))
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning", "note", "calibrate"))]
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err
    assert not [p for p in set(tmp_path.rglob("*")) - before if p.suffix in (".onnx", ".tmp")]
