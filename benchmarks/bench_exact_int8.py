"""int8 sums on CPUs without VNNI: onnxruntime's default session against the tool's (``runtime.ort_options``).

On an x86-64 CPU without VNNI, MLAS multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which
saturates pairs of products in int16; ``session.x64quantprecision`` takes the exact uint8 x uint8 path. This
prints, on this CPU, each int8 session's PSNR-Y drop against the fp32 model on the sr protocol (Set5 by
default) and the latency of fp32, int8 default and int8 exact, interleaved in one run. With VNNI both int8
sessions are the same. Run on a quiet machine.

    python benchmarks/bench_exact_int8.py --fp32 build/x2.onnx --int8 build/x2.int8.onnx [--data DIR] [--repeats 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _measure import SHARED

from dipnet_deploy.imageio import list_images, read_rgb8
from dipnet_deploy.metrics import psnr
from dipnet_deploy.runtime import FULL_HD_PIXELS, cpu_name, int8_sums_saturate, time_interleaved
from dipnet_deploy.sr_protocol import make_pair
from dipnet_deploy.tiling import TiledRunner


class DefaultSession:
    """onnxruntime's session with its own defaults: what a user who loads the int8 file plainly runs."""

    def __init__(self, path: Path):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.session.run(None, {self.session.get_inputs()[0].name: x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--int8", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "eval" / "Set5")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    runners = {"fp32": TiledRunner(str(args.fp32)), "int8 default": TiledRunner(str(args.int8)),
               "int8 exact": TiledRunner(str(args.int8))}  # the tool's sessions (ort_options)
    runners["int8 default"].session = DefaultSession(args.int8)
    shape, scale = (runners["fp32"].tile_h, runners["fp32"].tile_w), runners["fp32"].scale
    drops: dict[str, list[float]] = {"int8 default": [], "int8 exact": []}
    for path in list_images(args.data):
        hr, lr = make_pair(read_rgb8(path)[0], scale)
        reference = psnr(runners["fp32"].run_rgb8(lr)[0], hr, scale, y_channel=True)
        for name in drops:
            drops[name].append(reference - psnr(runners[name].run_rgb8(lr)[0], hr, scale, y_channel=True))
    x = np.random.default_rng(0).random((1, 3, *shape), dtype=np.float32)
    forwards = {name: runner.forward for name, runner in runners.items()}
    times = {name: float(np.median(t)) * FULL_HD_PIXELS / (shape[0] * shape[1])
             for name, t in time_interleaved(forwards, x, args.repeats).items()}
    print(f"{cpu_name()} ({'no VNNI: int8 sums saturate' if int8_sums_saturate() else 'VNNI'}), onnxruntime "
          f"{ort.__version__}, {args.int8.name} at {shape[1]}x{shape[0]}, {len(drops['int8 exact'])} images of "
          f"{args.data.name}, {args.repeats} interleaved rounds\n")
    print("| session | PSNR-Y drop mean / worst (dB) | s per 1080p frame | vs fp32 |")
    print("|---|---|---|---|")
    for name in runners:
        drop = f"{np.mean(drops[name]):.3f} / {np.max(drops[name]):.3f}" if name in drops else "0"
        print(f"| {name} | {drop} | {times[name]:.3f} | {times[name] / times['fp32']:.2f}x |")


if __name__ == "__main__":
    main()
