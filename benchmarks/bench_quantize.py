"""Calibration benchmark at 1080p: memory and time vs plain forwards and vs stock quantize_static.

    python benchmarks/bench_quantize.py --model build/dipnet_x2_1080x1920.onnx [--images 8 50]

Prints, side by side in one run: streaming `max` calibration for N images (peak RSS, seconds),
N plain fp32 forwards of the same images through a default onnxruntime session (seconds, same
image reading), their ratio, stock
quantize_static (MinMax, per channel, QDQ) on 1 image, and fp32 vs int8 latency of one frame.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _measure import SHARED, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="build/dipnet_x2_1080x1920.onnx")
    parser.add_argument("--data", default=str(SHARED / "data" / "train"))
    parser.add_argument("--images", type=int, nargs="+", default=[8, 50])
    parser.add_argument("--skip-stock", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    for count in args.images:
        calib = measure(f"""
            from pathlib import Path
            from dipnet_deploy.quantize import QuantizeOptions, quantize
            r = quantize(Path({args.model!r}), Path({str(work / f'calib{count}.int8.onnx')!r}), Path({args.data!r}),
                         options=QuantizeOptions(limit={count}), warn=lambda m: None)
            result = {{"images": r.summary["images_used"]}}
        """)
        plain = measure(f"""
            from pathlib import Path
            import onnxruntime as ort
            from dipnet_deploy.quantize import VendorInputs, select_images
            files, _ = select_images(Path({args.data!r}), {count}, lambda m: None)
            runner = ort.InferenceSession({args.model!r}, providers=["CPUExecutionProvider"])
            for x in VendorInputs(files, 1080, 1920):
                runner.run(None, {{"input": x}})
        """)
        print(f"{count} images: streaming max calibration + int8 write {calib['seconds']:.1f} s, peak RSS "
              f"{calib['peak_rss_mb'] / 1024:.2f} GB | {count} plain fp32 forwards {plain['seconds']:.1f} s, "
              f"peak RSS {plain['peak_rss_mb'] / 1024:.2f} GB | ratio {calib['seconds'] / plain['seconds']:.2f}x")
    if not args.skip_stock:
        stock = measure(f"""
            from pathlib import Path
            from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                                  quantize_static)
            from dipnet_deploy.quantize import VendorInputs, select_images
            files, _ = select_images(Path({args.data!r}), 1, lambda m: None)

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(VendorInputs(files, 1080, 1920))

                def get_next(self):
                    x = next(self.batches, None)
                    return None if x is None else {{"input": x}}

            quantize_static({args.model!r}, {str(work / 'stock.onnx')!r}, Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        """)
        print(f"stock quantize_static (MinMax) on 1 image: {stock['seconds']:.1f} s, "
              f"peak RSS {stock['peak_rss_mb'] / 1024:.2f} GB")
    latency = measure(f"""
        import numpy as np, onnxruntime as ort, time
        sessions = {{k: ort.InferenceSession(p, providers=["CPUExecutionProvider"])
                     for k, p in (("fp32", {args.model!r}), ("int8", {str(work / f'calib{args.images[0]}.int8.onnx')!r}))}}
        x = np.random.default_rng(0).random((1, 3, 1080, 1920), dtype=np.float32)
        times = {{k: [] for k in sessions}}
        for s in sessions.values():
            s.run(None, {{"input": x}})
        for _ in range(5):
            for k, s in sessions.items():
                t = time.perf_counter(); s.run(None, {{"input": x}}); times[k].append(time.perf_counter() - t)
        result = {{k: float(np.median(v)) for k, v in times.items()}}
    """)
    print(f"1080p frame latency (onnxruntime CPU, median of 5, interleaved): fp32 {latency['fp32']:.2f} s, "
          f"int8 {latency['int8']:.2f} s, speed-up {latency['fp32'] / latency['int8']:.2f}x")


if __name__ == "__main__":
    main()
