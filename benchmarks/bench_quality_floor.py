"""Quality floor of `max` vs stock quantize_static on the official x4 weights (issue setting).

Export at 270x480, calibrate on 4 photos of ../shared/data/train, measure int8-vs-fp32 PSNR
(seed protocol input, RGB) on Set5 for ours (default: equalized), ours with --no-equalize, and
stock (MinMax, per channel, QDQ), on disjoint 4-photo subsets. Without equalization ours uses
stock's ranges up to the float rounding of the kernels that computed them, so those two differ
by noise of a few mdB either way. Then, on subset 0: the other quantization modes with and
without equalization, and the Y-PSNR against ground truth on Set5 / Set14 / BSD68 (sr protocol)
of fp32 and the int8 models.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _measure import SHARED, ground_truth_line, stock_minmax

from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.compare import CompareOptions, compare, means
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess
from dipnet_deploy.metrics import psnr
from dipnet_deploy.quantize import QuantizeOptions, quantize


def calibration_subset(work: Path, offset: int) -> Path:
    """4 photos of ../shared/data/train, evenly spaced, starting at ``offset`` (subsets 0..7 are disjoint)."""
    calib = work / f"calib{offset}"
    calib.mkdir()
    train = list_images(SHARED / "data" / "train")
    for path in train[offset :: len(train) // 4][:4]:
        shutil.copy(path, calib / path.name)
    return calib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subsets", type=int, default=8, help="disjoint 4-photo calibration subsets to compare on")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    height, width = 270, 480
    fp32 = export(load_checkpoint(SHARED / "weights" / "dipnet_official_x4.pth"), work / "x4.onnx",
                  ExportOptions(height, width)).onnx_path
    inputs = [vendor_preprocess(read_rgb8(p)[0], height, width) for p in list_images(SHARED / "data" / "eval" / "Set5")]
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    fp32_out = [np.clip(reference.run(None, {"input": x})[0][0] * 255, 0, 255) for x in inputs]

    def fidelity(model: Path) -> float:
        runner = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        outs = [np.clip(runner.run(None, {"input": x})[0][0] * 255, 0, 255) for x in inputs]
        return float(np.mean([psnr(o.transpose(1, 2, 0), r.transpose(1, 2, 0)) for o, r in zip(outs, fp32_out)]))

    gains, noise = [], []
    for offset in range(args.subsets):
        calib = calibration_subset(work, offset)
        models = {
            "ours": quantize(fp32, work / f"ours{offset}.int8.onnx", calib, warn=lambda m: None).int8_path,
            "ours --no-equalize": quantize(fp32, work / f"plain{offset}.int8.onnx", calib, warn=lambda m: None,
                                           options=QuantizeOptions(equalize=False)).int8_path,
            "stock": stock_minmax(fp32, calib, work / f"stock{offset}.onnx", height, width),
        }
        scores = {label: fidelity(model) for label, model in models.items()}
        gains.append(scores["ours"] - scores["stock"])
        noise.append(scores["ours --no-equalize"] - scores["stock"])
        print(f"subset {offset}: int8-vs-fp32 PSNR on Set5: ours {scores['ours']:.4f} dB, ours --no-equalize "
              f"{scores['ours --no-equalize']:.4f} dB, stock MinMax {scores['stock']:.4f} dB | ours - stock "
              f"{gains[-1]:+.4f} dB, --no-equalize - stock {noise[-1]:+.4f} dB", flush=True)
    print(f"over {len(gains)} subsets: ours - stock mean {np.mean(gains):+.4f} dB (min {min(gains):+.4f}), "
          f"--no-equalize - stock mean {np.mean(noise):+.4f} dB (min {min(noise):+.4f})")
    for label, options in (("symmetric activations", {"symmetric_activations": True}),
                           ("per-tensor weights", {"per_channel": False})):
        scores = [fidelity(quantize(fp32, work / f"{label}{equalize}.int8.onnx", work / "calib0", warn=lambda m: None,
                                    options=QuantizeOptions(equalize=equalize, **options)).int8_path)
                  for equalize in (False, True)]
        print(f"subset 0, {label}: --no-equalize {scores[0]:.4f} dB, equalized {scores[1]:.4f} dB "
              f"({scores[1] - scores[0]:+.4f})", flush=True)
    models = {"ours": work / "ours0.int8.onnx", "ours --no-equalize": work / "plain0.int8.onnx",
              "stock": work / "stock0.onnx"}
    for name in ("Set5", "Set14", "BSD68"):
        for label, model in models.items():
            m = means(compare(fp32, model, SHARED / "data" / "eval" / name, CompareOptions(latency_repeats=1)).rows)
            print(f"{name} x4 sr protocol (subset 0), {label}: {ground_truth_line(m)}", flush=True)

if __name__ == "__main__":
    main()
