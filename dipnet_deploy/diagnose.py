"""Where int8 loses: each quantized activation's SQNR and the PSNR-Y it costs (``compare --diagnose``).

For every activation QuantizeLinear -> DequantizeLinear pair of an int8 QDQ model:

- ``sqnr_db``: 10 log10(sum x^2 / sum (x - x_hat)^2), x_hat the int8 model's dequantized tensor and
  x the same tensor with every activation left in float (the int8 graph without its activation
  Q/DQ pairs: its weights are those the int8 model holds, so activation equalization and weight
  rounding are not counted as noise), over the first tile of each image (the input the model
  sees). The tensors are read a memory budget at a time (``range_graphs.group_by_budget``), so 1080p
  models never hold more than the budget of activations.
- ``psnr_y_gain_db``: the comparison's mean PSNR-Y of the int8 model with only that pair removed
  (its consumers read the float tensor: ``float_fallback``) minus the int8 model's.

One pass over the data per pair: for x2 at 540x960 on Set5 (37 pairs) the whole `compare --diagnose`
took 3 minutes on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dipnet_deploy.calibrate import PASS2_BUDGET_BYTES
from dipnet_deploy.fileio import scratch_dir
from dipnet_deploy.imageio import read_rgb8, vendor_preprocess
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.qdq_graph import dequantize_early
from dipnet_deploy.range_graphs import group_by_budget, run, session, tensor_shapes, values_model
from dipnet_deploy.runtime import UNNAMED_MODEL
from dipnet_deploy.sr_protocol import make_pair, to_input
from dipnet_deploy.tiling import TiledRunner


@dataclass(frozen=True)
class QdqPair:
    """One quantized activation: its float tensor, the Q node's output and the DQ outputs read."""

    tensor: str
    quantized: str
    dequantized: tuple[str, ...]
    producer: str  # op type of the node making ``tensor`` ("graph input" for the image)
    scale: float
    zero_point: int
    levels: tuple[int, int]  # the integer type's range: (0, 255) for uint8

    def float_range(self) -> list[float]:
        return [self.scale * (self.levels[0] - self.zero_point), self.scale * (self.levels[1] - self.zero_point)]


def activation_pairs(model: onnx.ModelProto) -> list[QdqPair]:
    """Every QuantizeLinear of a non-constant tensor with the DequantizeLinear nodes reading it, in graph order
    (``model`` as ``qdq_graph.dequantize_early`` leaves it: each DQ reading its Q). A Q whose output anything
    else reads (a crafted model's Slice or Pad of integers) forms no pair: taking it out would leave that
    reader on float values."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node.op_type for node in graph.node for output in node.output}
    readers: dict[str, list[str]] = {}
    others = set()  # tensors read by anything but a DequantizeLinear: no pair to take out
    for node in graph.node:
        for name in node.input:
            if node.op_type == "DequantizeLinear" and name == node.input[0]:
                readers.setdefault(name, []).append(node.output[0])
            else:
                others.add(name)
    pairs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers or node.output[0] in others:
            continue
        scale = numpy_helper.to_array(initializers[node.input[1]])
        zero_point = (numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2
                      else np.zeros(1, np.uint8))
        pairs.append(QdqPair(node.input[0], node.output[0], tuple(readers.get(node.output[0], ())),
                             producers.get(node.input[0], "graph input"), float(scale.reshape(-1)[0]),
                             int(zero_point.reshape(-1)[0]),
                             (int(np.iinfo(zero_point.dtype).min), int(np.iinfo(zero_point.dtype).max))))
    return pairs


def float_fallback(model: onnx.ModelProto, pairs: Iterable[QdqPair]) -> onnx.ModelProto:
    """A copy of ``model`` without the Q and DQ nodes of ``pairs``: what read a DQ output reads its float tensor."""
    fallback = onnx.ModelProto()
    fallback.CopyFrom(model)
    graph = fallback.graph
    source = {name: pair.tensor for pair in pairs for name in (pair.quantized, *pair.dequantized)}
    kept = [node for node in graph.node if not set(node.output) & source.keys()]
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = source.get(name, name)
    # a DQ output that is a graph output keeps its name through an Identity
    kept += [helper.make_node("Identity", [source[out.name]], [out.name]) for out in graph.output if out.name in source]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]  # the pair's scale and zero point
    for init in unused:
        graph.initializer.remove(init)
    return fallback


def first_tile(hr: np.ndarray, runner: TiledRunner, protocol: str, scale: int) -> np.ndarray:
    """The model input the comparison feeds first for the HR image ``hr`` (uint8 RGB)."""
    _, lr = make_pair(hr, scale)
    if protocol == "seed":
        return vendor_preprocess(lr, runner.tile_h, runner.tile_w)
    return next(runner.tiles(to_input(lr)))[2]


def signal_to_noise(int8: onnx.ModelProto, pairs: list[QdqPair], inputs: Iterable[np.ndarray],
                    budget_bytes: int = PASS2_BUDGET_BYTES, model_path: str | Path = UNNAMED_MODEL) -> dict[str, float | None]:
    """SQNR (dB) of each pair's dequantized tensor against the float tensor of ``int8`` without any
    activation pair (``float_fallback`` of them all), summed over ``inputs``. None where they are equal.
    ``model_path`` names the model when the runtime runs out of memory.
    """
    fp32 = float_fallback(int8, activation_pairs(int8))
    shapes = tensor_shapes(fp32)
    sizes = {pair.tensor: 8 * int(np.prod(shapes.get(pair.tensor, [1 << 28]))) for pair in pairs}  # both models
    signal = dict.fromkeys(sizes, 0.0)
    noise = dict.fromkeys(sizes, 0.0)
    readable = [pair for pair in pairs if pair.dequantized]
    groups = group_by_budget([pair.tensor for pair in readable], sizes, budget_bytes)
    by_tensor = {pair.tensor: pair for pair in readable}
    inputs = list(inputs)
    for group in groups:
        reference = session(values_model(fp32, group), name=model_path)
        quantized = session(values_model(int8, [by_tensor[name].dequantized[0] for name in group]), name=model_path)
        for x in inputs:
            feeds = {reference.get_inputs()[0].name: x}
            exacts, approxes = run(reference, None, feeds, model_path), run(quantized, None, feeds, model_path)
            for name, exact, approx in zip(group, exacts, approxes):
                exact = exact.astype(np.float64)
                signal[name] += float(np.sum(exact**2))
                noise[name] += float(np.sum((exact - approx) ** 2))
            del exacts, approxes, exact, approx
    return {name: (10 * np.log10(signal[name] / noise[name]) if noise[name] and signal[name] else None)
            for name in signal}


def diagnose(int8_path: Path, rows: list[dict], protocol: str, scale: int,
             evaluate: Callable[[np.ndarray, dict], dict], runtime: str = "onnxruntime",
             progress: Progress = no_progress) -> list[dict]:
    """One entry per quantized activation of ``int8_path``, sorted by PSNR-Y gain (largest first).

    ``rows``: the comparison's per-image rows (``image`` and ``psnr_y["int8"]``); ``evaluate(hr,
    runners)`` scores one HR image as the comparison does (``compare.evaluate_image``).
    """
    int8 = dequantize_early(onnx.load(str(int8_path)))
    pairs = activation_pairs(int8)
    images = [read_rgb8(row["image"])[0] for row in rows]
    base = float(np.mean([row["psnr_y"]["int8"] for row in rows]))
    int8_runner = TiledRunner(str(int8_path), runtime=runtime)
    sqnr = signal_to_noise(int8, pairs, [first_tile(hr, int8_runner, protocol, scale) for hr in images],
                           model_path=int8_path)
    entries = []
    with scratch_dir("dipnet-diagnose-") as work:
        for pair in progress(pairs, "diagnose", len(pairs)):
            path = Path(work) / "fallback.onnx"
            onnx.save(float_fallback(int8, [pair]), str(path))
            runners = {"fallback": TiledRunner(str(path), runtime=runtime)}
            psnr_y = float(np.mean([evaluate(hr, runners)["row"]["psnr_y"]["fallback"] for hr in images]))
            entries.append({"tensor": pair.tensor, "producer": pair.producer, "sqnr_db": sqnr.get(pair.tensor),
                            "psnr_y_gain_db": psnr_y - base, "scale": pair.scale, "zero_point": pair.zero_point,
                            "range": pair.float_range()})
    return sorted(entries, key=lambda entry: -entry["psnr_y_gain_db"])
