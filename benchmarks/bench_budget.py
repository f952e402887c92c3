"""The quality budget (issue 26): `quantize --max-drop` on the packaged x2 at 540x960, end to end.

Calibration: 16 photos of ../shared/data/train (every 5th .jpg, sorted: the gate selection of
bench_coverage.py); validation (--val): 8 other photos of ../shared/data/train, evenly spaced among the
.jpg files not used for calibration. The search runs as `quantize` runs it (auto, then the budget), timed;
then pure int8 (the same ranges without the budget), the budget's model and fp32 are scored through
`compare` on Set5, Set14 and BSD68 against the ORIGINAL fp32 (mean and worst image) and timed side by side
on onnxruntime and OpenVINO (`bench`, interleaved). Run on a quiet machine: the search's ranking uses latency.

    python benchmarks/bench_budget.py --max-drop 0.05 [--fallback float|uint16] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _measure import SHARED
from bench_coverage import calibration_photos, drops

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.bench import BenchOptions, bench
from dipnet_deploy.budget import BudgetOptions
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images
from dipnet_deploy.quantize import QuantizeOptions, quantize
from dipnet_deploy.runtime import cpu_name

SETS = ("Set5", "Set14", "BSD68")
VAL_IMAGES = 8


def validation_photos(work: Path, calib: Path) -> Path:
    used = {path.name for path in calib.iterdir()}
    others = [p for p in list_images(SHARED / "data" / "train") if p.suffix == ".jpg" and p.name not in used]
    val = work / "val"
    val.mkdir()
    for path in others[2::len(others) // VAL_IMAGES][:VAL_IMAGES]:
        shutil.copy(path, val / path.name)
    return val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-drop", type=float, default=0.05)
    parser.add_argument("--fallback", default="float")
    parser.add_argument("--work", type=Path, help="keep the models here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        calib = calibration_photos(work, every_8th=False)
        val = validation_photos(work, calib)
        original = export(load_checkpoint(PACKAGED_WEIGHTS), work / "original.onnx",
                          ExportOptions(height=540, width=960)).onnx_path
        began = time.perf_counter()
        budget = BudgetOptions(args.max_drop, val, args.fallback)
        result = quantize(original, work / "budget.int8.onnx", calib, None, QuantizeOptions(method=None, budget=budget),
                          warn=lambda m: None)
        seconds = time.perf_counter() - began
        record = json.loads(result.ranges_path.read_text())["mixed_precision"]
        pure_ranges = work / "pure.ranges.json"
        pure_ranges.write_text(json.dumps({k: v for k, v in json.loads(result.ranges_path.read_text()).items()
                                           if k != "mixed_precision"}))
        pure = quantize(original, work / "pure.int8.onnx", None, pure_ranges, QuantizeOptions()).int8_path
        folders = {name: SHARED / "data" / "eval" / name for name in SETS}
        figures = {"pure int8": drops(original, pure, folders), "budget": drops(original, result.int8_path, folders)}
        speed = {name: bench(original, model, BenchOptions(("onnxruntime", "openvino"), repeats=10, streams=0))
                 for name, model in (("pure int8", pure), ("budget", result.int8_path))}
    chosen = record["steps"][-1]
    print(f"\nDIPNet x2 packaged at 540x960, {cpu_name()}; auto + --max-drop {args.max_drop} --fallback {args.fallback}, "
          f"--val {VAL_IMAGES} photos: search {seconds:.0f} s (auto included), {len(record['steps'])} steps, "
          f"{len(record['tensors'])} tensors out of int8{' and the fp32 model' if record['fp32'] else ''}")
    print(f"val drop: pure int8 {record['steps'][0]['val_drop_db']:.3f} (worst {record['steps'][0]['val_worst_drop_db']:.3f}), "
          f"chosen {chosen['val_drop_db']:.3f} (worst {chosen['val_worst_drop_db']:.3f})\n")
    print("| model | " + " | ".join(SETS) + " | onnxruntime per 1080p frame (s) | OpenVINO (s) |")
    print("|---|" + "---|" * (len(SETS) + 2))
    for name, per_set in figures.items():
        runtimes = speed[name]["runtimes"]
        print(f"| {name} | " + " | ".join(f"{per_set[s]['mean']:.3f} / {per_set[s]['worst']:.3f}" for s in SETS)
              + f" | {runtimes['onnxruntime']['int8_s']:.3f} | {runtimes['openvino']['int8_s']:.3f} |")
    fp32 = speed["pure int8"]["runtimes"]
    print(f"| fp32 | 0 | 0 | 0 | {fp32['onnxruntime']['fp32_s']:.3f} | {fp32['openvino']['fp32_s']:.3f} |")
    print("\nsteps (taken out of int8, val drop dB, latency per 1080p frame s on onnxruntime):")
    for step in record["steps"]:
        print(f"  {', '.join(step['promoted']) or 'pure int8'}: {step['val_drop_db']:.4f}, {step['latency_1080p_s']:.3f}")


if __name__ == "__main__":
    main()
