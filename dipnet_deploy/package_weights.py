"""Package a training checkpoint as the embedded default weights, with a measured sidecar.

    python -m dipnet_deploy.package_weights runs/x2/last.pth [--eval ../shared/data/eval]

Writes dipnet_deploy/weights/dipnet_x2.pth (training-form EMA weights in BasicSR layout, so
`export` exercises the fold) and dipnet_x2.json: data, iterations, wall time, seed, and Y-PSNR on
Set5 / Set14 / BSD68 measured with the sr protocol of `compare` (whole-image PyTorch run).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from dipnet_deploy.checkpoint import load_checkpoint, load_file
from dipnet_deploy.fileio import atomic_path, sha256_file, write_json_atomic
from dipnet_deploy.imageio import list_images, read_rgb8
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole, score

WEIGHTS_DIR = Path(__file__).parent / "weights"


def evaluate(model: torch.nn.Module, directory: Path, scale: int) -> dict:
    rows = []
    for path in list_images(directory):
        hr, lr = make_pair(read_rgb8(path)[0], scale)
        rows.append(score(run_torch_whole(model, lr), hr, scale))
    return {key: round(float(np.mean([r[key] for r in rows])), 4) for key in rows[0]} | {"images": len(rows)}


def package(checkpoint: Path, eval_root: Path, name: str = "dipnet_x2", stages: str = "") -> Path:
    raw = load_file(checkpoint)
    loaded = load_checkpoint(checkpoint)
    scale = loaded.config.upscale
    target = WEIGHTS_DIR / f"{name}.pth"
    with atomic_path(target) as temp:
        torch.save({"params_ema": raw["params_ema"], "iter": raw["iter"], "config": raw["config"]}, temp)
    train = raw.get("train", {})
    sidecar = {
        "weights": target.name,
        "sha256": sha256_file(target),
        "form": f"training (three-branch RRFB convs, E = {loaded.config.expansion}); export folds it",
        "config": loaded.config.to_dict(),
        "data": "../shared/data/train only: 130 HR photos (Sun-Hays 80, Urban100 001-050); "
                "no evaluation image was used for training",
        "validation": "Set5 (Y-PSNR every 1000 iterations, for the curve only)",
        "iterations": raw["iter"],
        "wall_seconds": round(float(raw.get("wall_seconds", 0.0)), 1),
        "machine": f"{platform.machine()} CPU, 2 threads",
        "seed": train.get("seed"),
        "recipe": {k: train.get(k) for k in ("batch", "patch", "lr", "lr_min", "loss", "restart", "ema_decay")},
        "stages": stages,  # how the runs before the last one were set (the checkpoint keeps only the last)
        "curve": raw.get("history", []),
        "eval_protocol": "BasicSR: MATLAB-bicubic uint8 LR, output rounded to uint8, Y (BT.601), crop = scale",
        "eval": {name: evaluate(loaded.model, eval_root / name, scale) for name in ("Set5", "Set14", "BSD68")
                 if (eval_root / name).is_dir()},
    }
    write_json_atomic(target.with_suffix(".json"), sidecar)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--eval", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "eval")
    parser.add_argument("--stages", default="", help="the training stages that led to this checkpoint, in words")
    args = parser.parse_args()
    written = package(args.checkpoint, args.eval, stages=args.stages)
    print(f"wrote {written} and {written.with_suffix('.json')}")
