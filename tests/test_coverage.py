"""Range coverage (issue 27): no learned or searched range clips what calibration, coverage images or the
training images showed, and an image unlike the calibration photos is no longer clipped.

Clipping measure: the fraction of a quantized tensor's elements outside its range (the range widened to
contain 0, as onnxruntime's uint8 quantizer does), measured through onnxruntime on the fp32 graph the int8
model is made from.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import vendor_preprocess
from dipnet_deploy.int8_model import model_to_quantize
from dipnet_deploy.metrics import psnr
from dipnet_deploy.ptq import AutoOptions
from dipnet_deploy.qat import QuantSimDIPNet, clipped_bounds, fake_quant_activation
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.range_graphs import values_model
from dipnet_deploy.stress_set import EVALUATION_HUES, EVALUATION_SEED, coverage_images, stress_image

from .conftest import random_train_model, write_images

SIDE = 48


def test_floor_widens_a_learned_range_and_never_narrows_it():
    torch.manual_seed(0)
    model = DIPNet(PRESETS["x2"].replace(expansion=8)).eval()
    start = {"conv_1": (-1.0, 2.0)}
    sim = QuantSimDIPNet(model, start, floor={"conv_1": (-0.5, 1.5)})
    with torch.no_grad():
        sim.low.fill_(-0.1)  # learned narrower than the floor on both sides
        sim.high.fill_(3.0)  # and wider on one
    assert sim.ranges()["conv_1"] == (-0.5, 3.0)
    x = torch.linspace(-2, 4, 101)
    i = sim.index["conv_1"]
    low, high = sim.bounds()
    assert torch.equal(fake_quant_activation(x, low[i], high[i]),
                       fake_quant_activation(x, torch.tensor(-0.5), torch.tensor(3.0)))
    free = QuantSimDIPNet(model, start)  # no floor: the learned range is used as it is
    with torch.no_grad():
        free.low.fill_(-0.1)
    assert free.ranges()["conv_1"] == (pytest.approx(-0.1), 2.0)


@pytest.mark.parametrize("clip", [0.0, 2e-4, 1e-3, 0.02])
def test_clipped_bounds_against_a_full_sort(clip):
    """The narrowest range leaving out at most ``clip`` of the elements, half on each side: the sorted values at
    that count, for heavy tails, ties (a ReLU's zeros) and a tensor large enough for the sampled shortcut."""
    rng = np.random.default_rng(1)
    tails = rng.standard_t(2, 2_000_000).astype(np.float32)
    ties = np.maximum(rng.normal(0, 1, 300_000), 0).astype(np.float32)
    step = np.repeat(np.float32([-1, 0, 5]), [40, 100_000, 13])
    for values in (tails, ties, step):
        allowed = int(clip / 2 * values.size)
        ordered = np.sort(values)
        low, high = clipped_bounds(torch.from_numpy(values), clip)
        assert (low, high) == (float(ordered[allowed]), float(ordered[-1 - allowed]))
        assert np.sum(values < low) <= allowed and np.sum(values > high) <= allowed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny x2 model whose calibration photos are smooth and dull: nothing like a saturated stress image."""
    work = tmp_path_factory.mktemp("coverage")
    checkpoint = work / "w.pth"
    torch.save(random_train_model(PRESETS["x2"].replace(expansion=8), seed=3, std=0.08).state_dict(), checkpoint)
    fp32 = export(load_checkpoint(checkpoint), work / "m.onnx", ExportOptions(SIDE, SIDE)).onnx_path
    paths = write_images(work / "calib", 3, (96, 96))
    for path in paths:  # dull colours: a quarter of the value range around mid-grey
        image = cv2.imread(str(path))
        cv2.imwrite(str(path), (96 + image // 4).astype(np.uint8))
    stress = [stress_image(i, EVALUATION_SEED, EVALUATION_HUES, sizes=((96, 128),))[1] for i in range(5)]
    return {"work": work, "fp32": fp32, "calib": work / "calib", "stress": stress}


def _clipped_fraction(fp32: Path, document: dict, images: list[np.ndarray]) -> float:
    """Largest fraction of any quantized tensor's elements outside its range, over ``images`` (the input and
    the output image excepted: both are on the exact 8-bit grid of [0, 1])."""
    graph = model_to_quantize(fp32, document)
    # the image before DepthToSpace is clipped to [0, 1] by design: the output's own final clip
    output_image = {node.input[0] for node in graph.graph.node if node.op_type == "DepthToSpace"}
    names = [name for name in document["tensors"] if name != "input" and name not in output_image]
    session = ort.InferenceSession(values_model(graph, names).SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for image in images:
        values = session.run(names, {"input": vendor_preprocess(image, SIDE, SIDE)})
        for name, value in zip(names, values):
            low, high = min(document["tensors"][name]["min"], 0.0), max(document["tensors"][name]["max"], 0.0)
            scale = (high - low) / 255
            worst = max(worst, float(np.mean((value < low - scale / 2) | (value > high + scale / 2))))
    return worst


def _stress_fidelity(fp32: Path, int8: Path, images: list[np.ndarray]) -> float:
    """Mean PSNR (dB) of the int8 output against the fp32 output on ``images``."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    scores = []
    for image in images:
        x = vendor_preprocess(image, SIDE, SIDE)
        a, b = (np.clip(s.run(None, {"input": x})[0], 0, 1) * 255 for s in sessions)
        scores.append(psnr(b, a))
    return float(np.mean(scores))


@pytest.mark.parametrize("method, clip", [("max", 0.0), ("auto", 0.0), ("auto", 2e-4)])
def test_stress_images_no_longer_clip(method, clip, tiny):
    import json

    fp32, work = tiny["fp32"], tiny["work"]
    auto = AutoOptions(iters=10, batch=2, crop=32, clip=clip)
    before = QuantizeOptions(method=method, coverage=0, auto=AutoOptions(iters=10, batch=2, crop=32, floor=False))
    after = QuantizeOptions(method=method, auto=auto, coverage=10)
    results = {}
    for name, options in (("before", before), ("after", after)):
        result = quantize(fp32, work / f"{method}_{clip}_{name}.int8.onnx", tiny["calib"], None, options,
                          warn=lambda m: None)
        document = json.loads(result.ranges_path.read_text())
        results[name] = {"stress_clipped": _clipped_fraction(fp32, document, tiny["stress"]),
                         "coverage_clipped": _clipped_fraction(fp32, document, coverage_images(options.coverage)),
                         "stress_psnr": _stress_fidelity(fp32, result.int8_path, tiny["stress"])}
    print(method, results)
    assert results["before"]["stress_clipped"] > 0.01  # dull photos alone: saturated images clip
    # the stated bound: max clips nothing coverage showed; auto at most its clip fraction of one image's values
    assert results["after"]["coverage_clipped"] <= (auto.clip if method == "auto" else 0.0)
    assert results["after"]["stress_clipped"] < results["before"]["stress_clipped"] / 5  # unseen palettes too
    assert results["after"]["stress_psnr"] > results["before"]["stress_psnr"] + 1.0
