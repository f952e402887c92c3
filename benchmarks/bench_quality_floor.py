"""Quality floor of `max` vs stock quantize_static on the official x4 weights (issue setting).

Export at 270x480, calibrate on 4 photos of ../shared/data/train, measure int8-vs-fp32 PSNR
(seed protocol input, RGB) on Set5 for ours and for stock (MinMax, per channel, QDQ), and the
Y-PSNR against ground truth on Set5 / Set14 / BSD68 (sr protocol) of fp32 and our int8.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.compare import CompareOptions, compare, means
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images, read_rgb8, seed_preprocess
from dipnet_deploy.metrics import psnr
from dipnet_deploy.quantize import quantize

SHARED = Path(os.environ.get("DIPNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    height, width = 270, 480
    fp32 = export(load_checkpoint(SHARED / "weights" / "dipnet_official_x4.pth"), work / "x4.onnx",
                  ExportOptions(height, width)).onnx_path
    calib = work / "calib"
    calib.mkdir()
    train = list_images(SHARED / "data" / "train")
    for path in train[:: len(train) // 4][:4]:
        shutil.copy(path, calib / path.name)
    files = list_images(calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": seed_preprocess(read_rgb8(p)[0], height, width)} for p in files])

        def get_next(self):
            return next(self.batches, None)

    stock = work / "stock.onnx"
    quantize_static(str(fp32), str(stock), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    ours = quantize(fp32, work / "x4.int8.onnx", calib, warn=lambda m: None).int8_path
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for k, p in (("fp32", fp32), ("ours", ours), ("stock", stock))}
    fidelity = {"ours": [], "stock": []}
    for path in list_images(SHARED / "data" / "eval" / "Set5"):
        x = seed_preprocess(read_rgb8(path)[0], height, width)
        out = {k: np.clip(s.run(None, {"input": x})[0][0] * 255, 0, 255) for k, s in sessions.items()}
        for k in fidelity:
            fidelity[k].append(psnr(out[k].transpose(1, 2, 0), out["fp32"].transpose(1, 2, 0)))
    print(f"official x4 @ {height}x{width}, 4 calibration photos: int8-vs-fp32 PSNR on Set5 "
          f"ours (max) {np.mean(fidelity['ours']):.3f} dB, stock MinMax {np.mean(fidelity['stock']):.3f} dB")
    for name in ("Set5", "Set14", "BSD68"):
        for label, model in (("ours", ours), ("stock", stock)):
            m = means(compare(fp32, model, SHARED / "data" / "eval" / name, CompareOptions(latency_repeats=1)).rows)
            print(f"{name} x4 sr protocol, {label}: fp32 {m['psnr_y']['fp32']:.2f} dB, int8 {m['psnr_y']['int8']:.2f} "
                  f"dB (loss {m['psnr_y']['fp32'] - m['psnr_y']['int8']:.2f}), bicubic {m['psnr_y']['bicubic']:.2f}")


if __name__ == "__main__":
    main()
