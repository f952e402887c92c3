"""Export benchmark: the 1080p x2 export (target <= 30 s, <= 4 GB peak) vs the plain exporter.

    python benchmarks/bench_export.py [--checkpoint PATH] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _measure import measure

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(PACKAGED_WEIGHTS))
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-export-")
    ours = measure(f"""
        from dipnet_deploy.checkpoint import load_checkpoint
        from dipnet_deploy.export import export
        card = export(load_checkpoint({args.checkpoint!r}), {os.path.join(work, 'ours.onnx')!r}).card
        result = {{"ort_max_abs_diff": card["ort_max_abs_diff"], "params": card["params"], "macs": card["macs"]}}
    """)
    print(f"dipnet-deploy export, 1x3x1080x1920 x2 (trace small + fix shape + onnxsim + checker + ORT verify): "
          f"{ours['seconds']:.1f} s, peak RSS {ours['peak_rss_mb'] / 1024:.2f} GB, "
          f"ORT vs torch max|diff| {ours['ort_max_abs_diff']:.2e}")
    if not args.skip_baseline:
        plain = measure(f"""
            import torch, warnings
            from dipnet_deploy.checkpoint import load_checkpoint
            model = load_checkpoint({args.checkpoint!r}).model
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.rand(1, 3, 1080, 1920),), {os.path.join(work, 'plain.onnx')!r},
                              dynamo=False, input_names=["input"], output_names=["output"], opset_version=17)
        """)
        print(f"plain torch.onnx.export traced at 1080p (no simplify, no verify): {plain['seconds']:.1f} s, "
              f"peak RSS {plain['peak_rss_mb'] / 1024:.2f} GB")
        print(f"ratio ours/plain: time {ours['seconds'] / plain['seconds']:.2f}x, "
              f"memory {ours['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
