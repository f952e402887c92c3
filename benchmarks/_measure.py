"""Benchmark helpers: the ../shared folder; run a snippet in a fresh process (wall time, peak RSS); describe a
loss; stock quantize_static as the peer int8 route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess

SHARED = Path(os.environ.get("DIPNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))

FOOTER = """
import json as _json, resource as _resource, time as _time
print("@@" + _json.dumps({"seconds": _time.perf_counter() - _began,
                          "peak_rss_mb": _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / 1024,
                          **globals().get("result", {})}))
"""


def measure(code: str) -> dict:
    """Execute ``code`` (it may set a dict ``result``) and return seconds, peak RSS and result."""
    script = "import time as _t\n_began = _t.perf_counter()\n" + textwrap.dedent(code) + FOOTER
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    line = next(line for line in done.stdout.splitlines()[::-1] if line.startswith("@@"))
    return json.loads(line[2:])


def ground_truth_line(means: dict) -> str:
    """fp32 -> int8 Y-PSNR and SSIM-Y against ground truth, from ``compare.means``."""
    psnr, ssim = means["psnr_y"], means["ssim_y"]
    return (f"fp32 {psnr['fp32']:.3f} dB, int8 {psnr['int8']:.3f} dB (loss {psnr['fp32'] - psnr['int8']:.3f}), "
            f"SSIM-Y fp32 {ssim['fp32']:.4f} int8 {ssim['int8']:.4f}, bicubic {psnr['bicubic']:.2f}")


def stock_minmax(fp32: Path, calib: Path, output: Path, height: int, width: int) -> Path:
    """Stock onnxruntime quantize_static (MinMax, per-channel int8 weights, uint8 activations, QDQ) of ``fp32``,
    calibrated on the photos of ``calib`` seed-preprocessed to ``height`` x ``width``."""
    files = list_images(calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": vendor_preprocess(read_rgb8(p)[0], height, width)} for p in files])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return output
