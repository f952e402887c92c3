"""Activation equalization on the 1080p x2 model: what it buys against ground truth, per calibration set.

    python benchmarks/bench_equalize.py --model build/dipnet_x2_1080x1920.onnx

For two calibration sets, the default calibration/ (5 small photos, upscaled to 1080p by the seed
preprocessing) and 8 photos of ../shared/data/train (evenly spaced, downscaled to 1080p), the int8
model with and without equalization is compared on Set5 (sr protocol): PSNR-Y against ground
truth, and int8-vs-fp32 PSNR (RGB) with the largest pixel difference.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _measure import SHARED, ground_truth_line

from dipnet_deploy.compare import CompareOptions, compare, means
from dipnet_deploy.quantize import QuantizeOptions, default_calibration_dir, quantize, select_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="build/dipnet_x2_1080x1920.onnx")
    args = parser.parse_args()
    fp32 = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-eq-"))
    train8 = work / "train8"
    train8.mkdir()
    for path in select_images(SHARED / "data" / "train", 8, lambda m: None)[0]:
        shutil.copy(path, train8 / path.name)
    for label, calib in (("calibration/ (5 photos)", default_calibration_dir()), ("8 train photos", train8)):
        for equalize in (False, True):
            int8 = quantize(fp32, work / f"{calib.name}{equalize}.int8.onnx", calib, warn=lambda m: None,
                            options=QuantizeOptions(equalize=equalize)).int8_path
            rows = compare(fp32, int8, SHARED / "data" / "eval" / "Set5", CompareOptions(latency_repeats=1)).rows
            fidelity = float(np.mean([row["int8_vs_fp32"]["psnr_rgb"] for row in rows]))
            worst = max(row["int8_vs_fp32"]["max_abs_diff"] for row in rows)
            print(f"{label}, {'equalized' if equalize else '--no-equalize'}: Set5 {ground_truth_line(means(rows))}; "
                  f"int8-vs-fp32 {fidelity:.2f} dB, max |diff| {worst:.0f} levels", flush=True)


if __name__ == "__main__":
    main()
