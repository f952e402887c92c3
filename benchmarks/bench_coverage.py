"""int8 on every image (issue 27): mean AND worst-image drop of each int8 route, with and without range coverage.

x2 packaged weights at 540x960; calibration: 16 photos of ../shared/data/train (every 5th .jpg, sorted: the
issue's gate selection; `--every-8th` takes bench_finetune's selection instead). Each int8 model is scored
through `compare` (sr protocol, Y channel, crop = scale) against the ORIGINAL fp32 ONNX on Set5, Set14, BSD68
and a generated stress set (`stress_set` evaluation images: seed and palettes that never fed calibration or
fine-tuning). Routes (pick with --routes):
  max            --method max (the default)
  max+coverage   --method max with 10 coverage images (--coverage 10)
  auto0          --method auto without the floor (before this issue)
  auto           --method auto, the defaults (--max-clip 0): ranges never narrower than max's
  auto-clip      --method auto --max-clip 2e-4: no range clips more than 2e-4 of a tensor's values on one image
  auto-clip+coverage  the same with --coverage 10
  auto+coverage  --method auto --coverage 10
  learned     --method learned from a `finetune` checkpoint (--finetuned; several: one route each)

    python benchmarks/bench_coverage.py --routes max,auto0,auto --finetuned runs/ft_x2.pth
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _measure import SHARED

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.compare import CompareOptions, compare
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images
from dipnet_deploy.ptq import AutoOptions
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.stress_set import write_stress_set

SETS = ("Set5", "Set14", "BSD68", "stress")
STRESS_IMAGES = 10  # every kind at both evaluation palettes
ROUTES = {
    "max": QuantizeOptions(),
    "max+coverage": QuantizeOptions(coverage=10),
    "auto0": QuantizeOptions(method="auto", auto=AutoOptions(floor=False)),
    "auto": QuantizeOptions(method="auto"),
    "auto-clip": QuantizeOptions(method="auto", auto=AutoOptions(clip=2e-4)),
    "auto-clip+coverage": QuantizeOptions(method="auto", coverage=10, auto=AutoOptions(clip=2e-4)),
    "auto+coverage": QuantizeOptions(method="auto", coverage=10),
}


def calibration_photos(work: Path, every_8th: bool) -> Path:
    calib = work / "calib"
    calib.mkdir()
    train = list_images(SHARED / "data" / "train")
    photos = train[::8][:16] if every_8th else [p for p in train if p.suffix == ".jpg"][::5][:16]
    for path in photos:
        shutil.copy(path, calib / path.name)
    return calib


def drops(original: Path, int8: Path, folders: dict[str, Path]) -> dict[str, dict]:
    """Per set: mean drop, worst drop and its image (Y-PSNR, dB, vs the original fp32)."""
    figures = {}
    for name, folder in folders.items():
        rows = compare(original, int8, folder, CompareOptions(latency_repeats=1), warn=lambda m: None).rows
        worst = max(rows, key=lambda r: r["drop_psnr_y"])
        figures[name] = {"mean": sum(r["drop_psnr_y"] for r in rows) / len(rows), "worst": worst["drop_psnr_y"],
                         "worst_image": Path(worst["image"]).name,
                         "per_image": {Path(r["image"]).name: r["drop_psnr_y"] for r in rows}}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", default="max,auto0,auto")
    parser.add_argument("--finetuned", type=Path, nargs="*", default=[])
    parser.add_argument("--every-8th", action="store_true")
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-coverage-") as scratch:
        work = Path(scratch)
        calib = calibration_photos(work, args.every_8th)
        folders = {name: SHARED / "data" / "eval" / name for name in SETS[:3]}
        folders["stress"] = work / "stress"
        write_stress_set(folders["stress"], STRESS_IMAGES)
        folders = {name: folders[name] for name in args.sets.split(",")}
        shape = ExportOptions(height=540, width=960)
        original = export(load_checkpoint(PACKAGED_WEIGHTS), work / "original.onnx", shape).onnx_path
        results = {}
        for route in [r for r in args.routes.split(",") if r]:
            began = time.perf_counter()
            int8 = quantize(original, work / f"{route}.int8.onnx", calib, None, ROUTES[route], warn=lambda m: None).int8_path
            seconds = time.perf_counter() - began
            results[route] = drops(original, int8, folders)
            print(f"{route} ({seconds:.0f} s): " + ", ".join(
                f"{s} {f['mean']:.3f}/{f['worst']:.3f} ({f['worst_image']})" for s, f in results[route].items()), flush=True)
        for index, checkpoint in enumerate(args.finetuned):
            tuned = export(load_checkpoint(checkpoint), work / f"ft{index}.onnx", shape).onnx_path
            options = QuantizeOptions(method="learned", equalize=False)
            int8 = quantize(tuned, work / f"ft{index}.int8.onnx", None, None, options, warn=lambda m: None).int8_path
            route = f"learned {checkpoint.name}"
            results[route] = drops(original, int8, folders)
            print(f"{route}: " + ", ".join(
                f"{s} {f['mean']:.3f}/{f['worst']:.3f} ({f['worst_image']})" for s, f in results[route].items()), flush=True)
    selection = "every 8th photo" if args.every_8th else "every 5th .jpg"
    print(f"\nDIPNet x2 at 540x960, 16 calibration photos ({selection}); Y-PSNR drop vs the ORIGINAL fp32, "
          "mean / worst image (dB)\n")
    print("| route | " + " | ".join(folders) + " |")
    print("|---|" + "---|" * len(folders))
    for route, figures in results.items():
        print(f"| {route} | " + " | ".join(f"{figures[s]['mean']:.3f} / {figures[s]['worst']:.3f}" for s in folders) + " |")
    if "stress" in folders and "max" in results:
        print("\nstress set, per image (drop, dB):")
        names = list(results["max"]["stress"]["per_image"])
        print("| image | " + " | ".join(results) + " |")
        print("|---|" + "---|" * len(results))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{results[r]['stress']['per_image'][name]:.3f}" for r in results) + " |")


if __name__ == "__main__":
    main()
