"""The deployed model at work: per-frame latency per runtime, and 1080p -> 2160p video throughput.

    python benchmarks/bench_upscale.py --model build/dipnet_x2_1080x1920.onnx [--frames 12] [--parts bench video]

1. `bench` on the fp32 model and its int8 (``.int8.onnx`` beside it), onnxruntime and OpenVINO
   side by side (all four interleaved, median of --repeats), ratios to onnxruntime fp32;
2. `upscale` of a 1080p H.264 + AAC clip (--frames frames at 24 fps, made from the photos of
   calibration/ cropped to 16:9 and resized to 1920x1080) to 2160p with the int8 model, once
   per runtime: frames per second of the whole pipeline (decode, tiles, model, encode at crf 18,
   audio copy), and the same clip with the fp32 model through onnxruntime for reference.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from dipnet_deploy.artifacts import default_int8_path
from dipnet_deploy.bench import BenchOptions, bench
from dipnet_deploy.cli import progress_bar
from dipnet_deploy.imageio import list_images, read_rgb8
from dipnet_deploy.quantize import default_calibration_dir
from dipnet_deploy.upscale import UpscaleOptions, upscale
from dipnet_deploy.video import DEFAULT_CODEC, video_bytes, write_clip


def clip_frames(count: int) -> list[np.ndarray]:
    """1080p frames: the calibration photos cropped to 16:9, each held for 3 frames."""
    photos = []
    for file in list_images(default_calibration_dir()):
        rgb = read_rgb8(file)[0]
        h, w = rgb.shape[:2]
        crop_h = min(h, w * 9 // 16)
        crop_w = crop_h * 16 // 9
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        photos.append(cv2.resize(rgb[top:top + crop_h, left:left + crop_w], (1920, 1080), interpolation=cv2.INTER_AREA))
    return [photos[(i // 3) % len(photos)] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="build/dipnet_x2_1080x1920.onnx")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, help="throughput streams (default: one per core; 0: skip)")
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--parts", nargs="+", choices=["bench", "video"], default=["bench", "video"])
    args = parser.parse_args()
    fp32 = Path(args.model)
    int8 = default_int8_path(fp32)
    if "bench" in args.parts:
        latency(fp32, int8, args)
    if "video" in args.parts:
        video(fp32, int8, args)


def latency(fp32: Path, int8: Path, args) -> None:
    summary = bench(fp32, int8, BenchOptions(tuple(args.runtimes), args.repeats, streams=args.streams), progress=progress_bar)
    print(f"| runtime | fp32 s/frame | int8 s/frame | int8 speed-up | int8 / {summary['reference']} | "
          f"fp32 fps ({summary['streams']} streams) | int8 fps |")
    for name, entry in summary["runtimes"].items():
        print(f"| {name} | {entry['fp32_s']:.3f} | {entry['int8_s']:.3f} | {entry['speedup']:.2f}x | "
              f"{entry['int8_vs_reference_fp32']:.3f}x | {entry.get('fp32_fps', 0):.3f} | {entry.get('int8_fps', 0):.3f} |")


def video(fp32: Path, int8: Path, args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-upscale-"))
    clip = work / "clip.mp4"
    write_clip(clip, clip_frames(args.frames), Fraction(24), audio_rate=48000)
    runs = [(runtime, int8) for runtime in args.runtimes] + [("onnxruntime", fp32)]
    # a 1080p -> 2160p clip is over the default memory budget (the encoder's look-ahead of 4K frames): allow it
    need = video_bytes(1920, 1080, "yuv420p", 2, DEFAULT_CODEC)
    os.environ.setdefault("DIPNET_MAX_MEMORY_MB", str(math.ceil(need / 2**20)))
    for runtime, model in runs:
        result = upscale([clip], model, work / f"{runtime}-{model.stem}", UpscaleOptions(runtime=runtime),
                         warn=lambda m: None)
        print(f"| video 1080p -> 2160p, {model.name}, {runtime} | {result.frames} frames | {result.seconds:.1f} s | "
              f"**{result.frames / result.seconds:.3f} frames/s** |")


if __name__ == "__main__":
    main()
