"""Near-lossless int8 (issue setting): what each int8 route loses against the ORIGINAL fp32 model.

For one variant (x2 packaged weights at 540x960, or the official x4 at 270x480) and 16 photos of
../shared/data/train as calibration, side by side in one run, each int8 model scored through
`compare` (sr protocol, Y channel, crop = scale) on Set5 / Set14 / BSD68 against the original
fp32 ONNX:
  - stock onnxruntime `quantize_static` (MinMax, per-channel int8 weights, uint8 activations, QDQ)
  - NNCF `nncf.quantize` (ONNX backend, MIXED preset, fast bias correction), when installed
    (`pip install -e '.[bench]'`)
  - ours `--method max` (the default: max ranges + activation equalization)
  - ours `--method auto` (post-training: max + equalization, ranges and int8 weights refined for the output;
    its time printed)
  - ours fine-tuned: `finetune` checkpoint -> export -> `quantize --method learned`
The fine-tune itself runs separately (its wall time and it/s are printed by `finetune --json`):
    dipnet-deploy finetune --data ../shared/data/train --out runs/ft_x2.pth --json
    python benchmarks/bench_finetune.py --variant x2 --finetuned runs/ft_x2.pth
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _measure import SHARED, stock_minmax

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.compare import CompareOptions, compare, means
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess
from dipnet_deploy.quantize import QuantizeOptions, quantize

VARIANTS = {"x2": (PACKAGED_WEIGHTS, 540, 960), "x4": (SHARED / "weights" / "dipnet_official_x4.pth", 270, 480)}
SETS = ("Set5", "Set14", "BSD68")


def calibration_photos(work: Path, count: int) -> Path:
    """``count`` evenly spaced photos of ../shared/data/train (never the evaluation sets)."""
    calib = work / "calib"
    calib.mkdir()
    train = list_images(SHARED / "data" / "train")
    for path in train[:: max(1, len(train) // count)][:count]:
        shutil.copy(path, calib / path.name)
    return calib


def seed_inputs(calib: Path, height: int, width: int) -> list[dict]:
    return [{"input": vendor_preprocess(read_rgb8(p)[0], height, width)} for p in list_images(calib)]


def nncf_int8(fp32: Path, calib: Path, output: Path, height: int, width: int) -> Path | None:
    try:
        import nncf
    except ImportError:
        return None
    import onnx

    inputs = seed_inputs(calib, height, width)
    quantized = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(inputs), preset=nncf.QuantizationPreset.MIXED,
                              fast_bias_correction=True, subset_size=len(inputs))
    onnx.save(quantized, str(output))
    return output


def auto_int8(fp32: Path, calib: Path, output: Path) -> Path:
    began = time.perf_counter()
    result = quantize(fp32, output, calib, None, QuantizeOptions(method="auto"), warn=lambda m: None)
    print(f"--method auto: {time.perf_counter() - began:.1f} s for {result.summary['images_used']} images", flush=True)
    return result.int8_path


def score(original: Path, int8: Path) -> dict:
    """Mean Y-PSNR of the original fp32 and of ``int8`` per evaluation set (sr protocol)."""
    figures = {}
    for name in SETS:
        comparison = compare(original, int8, SHARED / "data" / "eval" / name, CompareOptions(latency_repeats=1),
                             warn=lambda m: None)
        mean = means(comparison.rows)["psnr_y"]
        figures[name] = {"fp32": mean["fp32"], "int8": mean["int8"], "drop": mean["fp32"] - mean["int8"]}
    return figures


LEARNED = "ours finetune + --method learned"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="x2")
    parser.add_argument("--finetuned", type=Path, required=True, help="checkpoint written by `finetune`")
    parser.add_argument("--calibration-photos", type=int, default=16)
    parser.add_argument("--learned-only", action="store_true",
                        help="score only the fine-tuned route (the other routes do not depend on --finetuned)")
    args = parser.parse_args()
    checkpoint, height, width = VARIANTS[args.variant]
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as scratch:
        work = Path(scratch)
        calib = calibration_photos(work, args.calibration_photos)
        shape = ExportOptions(height=height, width=width)
        original = export(load_checkpoint(checkpoint), work / "original.onnx", shape).onnx_path
        tuned = export(load_checkpoint(args.finetuned), work / "finetuned.onnx", shape).onnx_path
        quiet = lambda m: None  # noqa: E731
        routes = {
            "stock onnxruntime quantize_static (MinMax)":
                lambda: stock_minmax(original, calib, work / "stock.onnx", height, width),
            "NNCF 3.4 (MIXED, fast bias correction)": lambda: nncf_int8(original, calib, work / "nncf.onnx", height, width),
            "ours --method max (default, equalized)":
                lambda: quantize(original, work / "max.onnx", calib, None, QuantizeOptions(), warn=quiet).int8_path,
            "ours --method auto (post-training: output-aware ranges and int8 weights)":
                lambda: auto_int8(original, calib, work / "auto.onnx"),
            LEARNED: lambda: quantize(tuned, work / "learned.onnx", None, None,
                                      QuantizeOptions(method="learned", equalize=False), warn=quiet).int8_path,
        }
        if args.learned_only:
            routes = {LEARNED: routes[LEARNED]}
        results = {}
        for route, make_int8 in routes.items():
            int8 = make_int8()
            if int8 is None:
                print(f"{route}: not installed (pip install -e '.[bench]')")
                continue
            results[route] = score(original, int8)
            print(f"{route}: " + ", ".join(f"{s} {results[route][s]['int8']:.3f} dB (drop {results[route][s]['drop']:.3f})"
                                           for s in SETS), flush=True)
        tuned_fp32 = {name: means(compare(tuned, None, SHARED / "data" / "eval" / name,
                                          CompareOptions(latency_repeats=1), warn=quiet).rows)["psnr_y"]["fp32"]
                      for name in SETS}
        card = json.loads((work / "learned.json").read_text())
    print(f"\nDIPNet {args.variant} at {height}x{width}, {args.calibration_photos} calibration photos; Y-PSNR drop vs the "
          "ORIGINAL fp32 (dB, sr protocol)\n")
    print("| route | " + " | ".join(SETS) + " |")
    print("|---|" + "---|" * len(SETS))
    first = next(iter(results.values()))
    print("| original fp32 (Y-PSNR) | " + " | ".join(f"{first[s]['fp32']:.3f}" for s in SETS) + " |")
    print("| fine-tuned fp32 (Y-PSNR) | " + " | ".join(f"{tuned_fp32[s]:.3f}" for s in SETS) + " |")
    for route, figures in results.items():
        print(f"| {route} | " + " | ".join(f"{figures[s]['drop']:.3f}" for s in SETS) + " |")
    print(f"\nlearned int8 vs its torch simulation: {json.dumps(card['simulation_agreement'])}")


if __name__ == "__main__":
    main()
