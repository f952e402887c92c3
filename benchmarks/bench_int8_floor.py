"""Where a fine-tuned int8 model's loss sits, image by image, and what each part of the int8 graph costs.

For a `finetune` checkpoint of the packaged x2 (or the official x4 with --variant x4), on whole
images of one evaluation set, through the `qat` twin of the int8 graph (PyTorch; it matches
onnxruntime's int8 output at 58-61 dB on x2):
  1. per image: the original fp32 Y-PSNR, the fine-tuned fp32's and the int8's drop below it, and
     the Y-MSE between the int8 and the original fp32 outputs, next to the Y-MSE a 0.05 dB drop
     would leave room for (fp32's own MSE x (10^0.005 - 1)): the budget shrinks as fp32 gets better;
  2. for one image (--image), that output Y-MSE with only parts of the graph quantized: weights
     alone, activations alone, and all but the given points (--float, default: the long skip's
     two tensors) in int8.
Y-MSE is in 8-bit units squared (both outputs rounded to uint8), crop = scale, BasicSR's Y.

    python benchmarks/bench_int8_floor.py --finetuned runs/ft_x2.pth --set Set5 --image bird.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _measure import SHARED
from bench_finetune import VARIANTS

from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.imageio import list_images, read_rgb8
from dipnet_deploy.metrics import psnr
from dipnet_deploy.qat import Point, QuantSimDIPNet
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole

ALLOWED_DROP_DB = 0.05
LONG_SKIP = ("conv_1", "Add[conv_1|conv_2]")


class PartlyQuantized(QuantSimDIPNet):
    """The int8 twin with some of it left in float: every activation, the points in
    ``float_points``, or the weights (``float_weights``)."""

    def __init__(self, model, ranges, float_points=(), float_activations=False, float_weights=False):
        super().__init__(model, ranges)
        self.float_points, self.float_activations, self.float_weights = set(float_points), float_activations, float_weights

    def quant(self, name, value):
        if self.float_activations or name in self.float_points:
            return Point(value, name)
        return super().quant(name, value)

    def conv(self, name, module, x):
        return self.quant(name, module(x.value)) if self.float_weights else super().conv(name, module, x)


def y_mse(a: np.ndarray, b: np.ndarray, scale: int) -> float:
    """Y-MSE between two uint8 RGB images, 8-bit units squared, ``scale`` px cropped per edge."""
    return 255.0**2 / 10 ** (psnr(a, b, scale, y_channel=True) / 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="x2")
    parser.add_argument("--finetuned", type=Path, required=True, help="checkpoint written by `finetune`")
    parser.add_argument("--set", default="Set5", help="evaluation set under ../shared/data/eval")
    parser.add_argument("--image", default="bird.png", help="the image whose int8 parts are measured")
    parser.add_argument("--float", nargs="*", default=list(LONG_SKIP), help="points left in float in part 2")
    args = parser.parse_args()
    original = load_checkpoint(VARIANTS[args.variant][0]).model
    finetuned = load_checkpoint(args.finetuned)
    tuned, ranges = finetuned.model, finetuned.learned_ranges
    if ranges is None:
        parser.error(f"{args.finetuned} carries no learned ranges (not a `finetune` checkpoint)")
    scale = original.config.upscale
    int8 = QuantSimDIPNet(tuned, ranges).eval()

    print(f"| {args.set} image | fp32 Y-PSNR | fine-tuned fp32 drop | int8 drop | int8 vs fp32 Y-MSE | "
          f"Y-MSE a {ALLOWED_DROP_DB} dB drop allows |")
    print("|---|---|---|---|---|---|")
    drops, chosen = [], None
    for path in list_images(SHARED / "data" / "eval" / args.set):
        hr, lr = make_pair(read_rgb8(path)[0], scale)
        reference, tuned_sr, int8_sr = (run_torch_whole(model, lr) for model in (original, tuned, int8))
        fp32_psnr = psnr(reference, hr, scale, y_channel=True)
        drop = fp32_psnr - psnr(int8_sr, hr, scale, y_channel=True)
        allowed = y_mse(reference, hr, scale) * (10 ** (ALLOWED_DROP_DB / 10) - 1)
        drops.append(drop)
        print(f"| {path.stem} | {fp32_psnr:.2f} | {fp32_psnr - psnr(tuned_sr, hr, scale, y_channel=True):.3f} | "
              f"{drop:.3f} | {y_mse(int8_sr, reference, scale):.3f} | {allowed:.3f} |")
        if path.name == args.image:
            chosen = (lr, reference)
    print(f"mean int8 drop {np.mean(drops):.4f} dB\n")
    if chosen is None:
        print(f"{args.image} is not in {args.set}: part 2 skipped")
        return
    lr, reference = chosen
    parts = {
        "all of it (weights int8, activations uint8)": int8,
        "weights only": PartlyQuantized(tuned, ranges, float_activations=True),
        "activations only": PartlyQuantized(tuned, ranges, float_weights=True),
        f"all but {', '.join(args.float)}": PartlyQuantized(tuned, ranges, float_points=args.float),
        "nothing (the fine-tuned fp32)": tuned,
    }
    print(f"{args.image}: Y-MSE of the output against the original fp32, by what is quantized")
    for label, model in parts.items():
        print(f"  {label:48s} {y_mse(run_torch_whole(model.eval(), lr), reference, scale):.3f}")


if __name__ == "__main__":
    main()
