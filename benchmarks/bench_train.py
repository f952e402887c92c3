"""Training speed on this machine: iterations per second of the default recipe (x2, E = 32,
batch 16, HR patch 64), measured over a short run after the data is loaded.

    python benchmarks/bench_train.py [--iters 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from _measure import SHARED

from dipnet_deploy.train import TrainOptions, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-train-")) / "ckpt.pth"
    options = TrainOptions(expansion=32, iters=args.iters, batch=16, patch=64, save_every=args.iters)
    result = train(SHARED / "data" / "train", out, options, warn=lambda m: None)
    print(f"train x2 (E=32, batch 16, patch 64), {torch.get_num_threads()} threads, {os.cpu_count()} cores: "
          f"{result.iters_per_second:.2f} it/s over {args.iters} iterations")


if __name__ == "__main__":
    main()
