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

One pass over the data per pair (its time is in ``BENCHMARKS.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from dipnet_deploy.calibrate import PASS2_BUDGET_BYTES
from dipnet_deploy.fileio import scratch_dir
from dipnet_deploy.imageio import ImageHeader, read_rgb8, vendor_preprocess
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.qdq_graph import dequantize_early
from dipnet_deploy.qdq_pairs import QdqPair, activation_pairs, float_fallback
from dipnet_deploy.range_graphs import group_by_budget, run, session, tensor_shapes, values_model
from dipnet_deploy.runtime import UNNAMED_MODEL
from dipnet_deploy.sr_protocol import make_pair, to_input
from dipnet_deploy.tiling import TiledRunner


def first_tile(hr: np.ndarray, runner: TiledRunner, protocol: str, scale: int) -> np.ndarray:
    """The model input the comparison feeds first for the HR image ``hr`` (uint8 RGB)."""
    _, lr = make_pair(hr, scale)
    if protocol == "seed":
        return vendor_preprocess(lr, runner.tile_h, runner.tile_w)
    # the first tile of the whole LR is that of its top-left tile-sized corner (mirror-padded the same way where
    # the LR is smaller): no float copy of the whole image is made for it
    return next(runner.tiles(to_input(lr[:runner.tile_h, :runner.tile_w])))[2]


class Reread:
    """An iterable that ``make()`` makes anew at each pass: images read again, never all held at once."""

    def __init__(self, make: Callable[[], Iterator[np.ndarray]]):
        self.make = make

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.make()


def hr_images(rows: list[dict], check: Callable[[ImageHeader], None] | None) -> Iterator[np.ndarray]:
    """The HR image of each row, read (``read_rgb8`` with ``check``) as it is reached: one in memory at a time."""
    for row in rows:
        yield read_rgb8(row["image"], check)[0]


def signal_to_noise(int8: onnx.ModelProto, pairs: list[QdqPair], inputs: Iterable[np.ndarray],
                    budget_bytes: int = PASS2_BUDGET_BYTES, model_path: str | Path = UNNAMED_MODEL) -> dict[str, float | None]:
    """SQNR (dB) of each pair's dequantized tensor against the float tensor of ``int8`` without any
    activation pair (``float_fallback`` of them all), summed over ``inputs``. None where they are equal.
    ``inputs`` is iterated once per group of tensors: a ``Reread`` reads its images again each time (an
    iterator is listed first). ``model_path`` names the model when the runtime runs out of memory.
    """
    fp32 = float_fallback(int8, activation_pairs(int8))
    shapes = tensor_shapes(fp32)
    sizes = {pair.tensor: 8 * int(np.prod(shapes.get(pair.tensor, [1 << 28]))) for pair in pairs}  # both models
    signal = dict.fromkeys(sizes, 0.0)
    noise = dict.fromkeys(sizes, 0.0)
    readable = [pair for pair in pairs if pair.dequantized]
    groups = group_by_budget([pair.tensor for pair in readable], sizes, budget_bytes)
    by_tensor = {pair.tensor: pair for pair in readable}
    inputs = list(inputs) if iter(inputs) is inputs else inputs  # an iterator gives its items once
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
             progress: Progress = no_progress, check: Callable[[ImageHeader], None] | None = None) -> list[dict]:
    """One entry per quantized activation of ``int8_path``, sorted by PSNR-Y gain (largest first).

    ``rows``: the comparison's per-image rows (``image`` and ``psnr_y["int8"]``); ``evaluate(hr,
    runners)`` scores one HR image as the comparison does (``compare.evaluate_image``). The images are read
    again at each pass, one at a time, with ``check`` (``read_rgb8``'s: the comparison's memory check), so
    the diagnosis of many images takes no more memory than that of one.
    """
    int8 = dequantize_early(onnx.load(str(int8_path)))
    pairs = activation_pairs(int8)
    base = float(np.mean([row["psnr_y"]["int8"] for row in rows]))
    int8_runner = TiledRunner(str(int8_path), runtime=runtime)
    tiles = Reread(lambda: (first_tile(hr, int8_runner, protocol, scale) for hr in hr_images(rows, check)))
    sqnr = signal_to_noise(int8, pairs, tiles, model_path=int8_path)
    entries = []
    with scratch_dir("dipnet-diagnose-") as work:
        for pair in progress(pairs, "diagnose", len(pairs)):
            path = Path(work) / "fallback.onnx"
            onnx.save(float_fallback(int8, [pair]), str(path))
            runners = {"fallback": TiledRunner(str(path), runtime=runtime)}
            psnr_y = float(np.mean([evaluate(hr, runners)["row"]["psnr_y"]["fallback"] for hr in hr_images(rows, check)]))
            entries.append({"tensor": pair.tensor, "producer": pair.producer, "sqnr_db": sqnr.get(pair.tensor),
                            "psnr_y_gain_db": psnr_y - base, "scale": pair.scale, "zero_point": pair.zero_point,
                            "range": pair.float_range()})
    return sorted(entries, key=lambda entry: -entry["psnr_y_gain_db"])
