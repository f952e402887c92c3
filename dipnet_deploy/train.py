"""Training of the training-form DIPNet, BasicSR style, sized for a CPU.

Random HR crops with flips/rot90; the LR of each training image is the MATLAB-bicubic
uint8 LR of the whole image, made once when the data is loaded (the benchmark's own LR,
so no patch-border effects); L1 loss (MSE for a PSNR fine-tune); Adam (0.9, 0.99); cosine
decay, optionally restarted from a resumed checkpoint (SGDR); EMA of the weights.
Checkpoints use the BasicSR layout ``{"params", "params_ema", "iter", "config", ...}`` and are
written atomically, so a run can stop at any time and continue with ``resume``.
Randomness of iteration i comes from ``(seed, i)`` alone, so a resumed run draws the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dipnet_deploy.archs.dipnet_train_arch import build_train_model, fold_model
from dipnet_deploy.checkpoint import check_state_dict, load_file
from dipnet_deploy.config import PRESETS, DIPNetConfig
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import atomic_path, ensure_parent
from dipnet_deploy.imageio import list_images, read_rgb8
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole, score

ESA_MIN_SIZE = 15  # stride-2 3x3 conv then a 7x7 max pool must leave at least one pixel


@dataclass
class TrainConfig:
    data: Path
    out: Path = Path("runs/x2/last.pth")
    preset: str = "x2"
    expansion: int | None = None
    iters: int = 1000
    batch: int = 16
    patch: int = 64  # HR patch side
    lr: float = 5e-4
    lr_min: float = 1e-6
    loss: str = "l1"  # "mse" fine-tunes for PSNR, as NTIRE efficient-SR entries do after the L1 stage
    restart: bool = False  # with resume: a new cosine cycle from lr, starting at the resumed iteration
    ema_decay: float = 0.999
    val: Path | None = None
    val_every: int = 500
    save_every: int = 200
    seed: int = 0
    resume: Path | None = None
    threads: int | None = None


@dataclass
class TrainResult:
    out: Path
    iters: int
    seconds: float
    iters_per_second: float
    last_loss: float
    history: list[dict] = field(default_factory=list)


class PairedPatches:
    """All training pairs in memory; draws aligned random crops with flips/rot90."""

    def __init__(self, directory: Path, scale: int, patch: int, warn: Callable[[str], None] = print):
        if patch % scale:
            raise InputError("--patch", f"{patch} is not a multiple of the scale {scale}")
        self.scale, self.patch = scale, patch
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        files = list_images(directory)
        for path in files:
            try:
                hr, _ = read_rgb8(path)
            except InputError as error:
                warn(f"warning: skipped {error}")
                continue
            if min(hr.shape[:2]) < patch:
                warn(f"warning: skipped {path}: {hr.shape[1]}x{hr.shape[0]} is smaller than the {patch}px patch")
                continue
            self.pairs.append(make_pair(hr, scale))
        if not self.pairs:
            found = f"{len(files)} image file(s), none usable" if files else "no image files"
            raise InputError(directory, f"no training images ({found}; need readable images >= {patch}px)")

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr_patch = self.patch // self.scale
        lrs, hrs = [], []
        for index in rng.integers(0, len(self.pairs), size):
            hr, lr = self.pairs[index]
            top = int(rng.integers(0, lr.shape[0] - lr_patch + 1))
            left = int(rng.integers(0, lr.shape[1] - lr_patch + 1))
            lr_crop = lr[top : top + lr_patch, left : left + lr_patch]
            hr_crop = hr[top * self.scale : (top + lr_patch) * self.scale, left * self.scale : (left + lr_patch) * self.scale]
            flip, rotations = bool(rng.integers(2)), int(rng.integers(4))
            for image, out in ((lr_crop, lrs), (hr_crop, hrs)):
                image = image[:, ::-1] if flip else image
                out.append(np.rot90(image, rotations).transpose(2, 0, 1))
        to_tensor = lambda items: torch.from_numpy(np.stack(items).astype(np.float32) / 255.0)  # noqa: E731
        return to_tensor(lrs), to_tensor(hrs)


def validate(model: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]], scale: int) -> float:
    """Mean Y-PSNR (crop = scale) of the folded model over (HR, LR) pairs."""
    deploy = fold_model(model)
    return float(np.mean([score(run_torch_whole(deploy, lr), hr, scale)["psnr_y"] for hr, lr in pairs]))


def load_val_pairs(directory: Path | None, scale: int, warn: Callable[[str], None]) -> list:
    if directory is None:
        return []
    pairs = []
    for path in list_images(directory):
        try:
            hr, _ = read_rgb8(path)
        except InputError as error:
            warn(f"warning: skipped {error}")
            continue
        pairs.append(make_pair(hr, scale))
    if not pairs:
        raise InputError(directory, "no readable validation images")
    return pairs


LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


def cosine_lr(iteration: int, cycle_start: int, cycle_end: int, peak: float, floor: float) -> float:
    """Learning rate of ``iteration`` (1-based) in a cosine cycle from ``peak`` at ``cycle_start`` to ``floor``."""
    progress = min(1.0, (iteration - cycle_start) / max(1, cycle_end - cycle_start))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def _resume_state(path: Path, config: DIPNetConfig) -> dict:
    checkpoint = load_file(path)
    if "optimizer" not in checkpoint or not isinstance(checkpoint.get("params"), dict):
        raise InputError(path, "not a resumable training checkpoint (no optimizer state)")
    saved = DIPNetConfig.from_dict(checkpoint.get("config", {}))
    if saved != config:
        raise InputError(path, f"checkpoint is for {saved}, not the requested {config}")
    check_state_dict(path, checkpoint["params"], build_train_model(config).state_dict())
    return checkpoint


def _save(path: Path, model, ema, optimizer, cycle_start, iteration, config, train_config, history, wall) -> None:
    payload = {
        "wall_seconds": wall,
        "params": model.state_dict(),
        "params_ema": ema.state_dict(),
        "iter": iteration,
        "config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {"cycle_start": cycle_start, "lr": train_config.lr, "lr_min": train_config.lr_min},
        "train": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(train_config).items()},
        "history": history,
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)


def train(cfg: TrainConfig, progress: Callable | None = None, warn: Callable[[str], None] = print) -> TrainResult:
    """Run (or continue) training; returns the final checkpoint path and figures."""
    if cfg.preset not in PRESETS:
        raise InputError("--preset", f"unknown preset {cfg.preset!r}")
    if cfg.loss not in LOSSES:
        raise InputError("--loss", f"unknown loss {cfg.loss!r} (choose from {', '.join(LOSSES)})")
    if cfg.restart and not cfg.resume:
        raise InputError("--restart", "needs --resume (it restarts the schedule of a resumed run)")
    for name in ("iters", "batch", "patch", "val_every", "save_every"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')}", "must be positive")
    config = PRESETS[cfg.preset].replace(expansion=cfg.expansion)
    if config.esa and cfg.patch // config.upscale < ESA_MIN_SIZE:
        raise InputError("--patch", f"ESA needs LR patches of at least {ESA_MIN_SIZE}px "
                                    f"(--patch >= {ESA_MIN_SIZE * config.upscale} at x{config.upscale})")
    ensure_parent(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    checkpoint = _resume_state(cfg.resume, config) if cfg.resume else None
    data = PairedPatches(cfg.data, config.upscale, cfg.patch, warn)
    val_pairs = load_val_pairs(cfg.val, config.upscale, warn)

    torch.manual_seed(cfg.seed)
    model = build_train_model(config).train()
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    start, cycle_start, history, wall_before = 0, 0, [], 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["params"])
        ema.load_state_dict(checkpoint["params_ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start, history = int(checkpoint["iter"]), list(checkpoint.get("history", []))
        wall_before = float(checkpoint.get("wall_seconds", 0.0))
        # a resumed run continues its cycle (--iters may extend it) unless told to restart it here
        cycle_start = start if cfg.restart else int(checkpoint.get("schedule", {}).get("cycle_start", 0))
    if start >= cfg.iters:
        raise InputError(cfg.resume, f"checkpoint is already at iteration {start}; --iters {cfg.iters} leaves nothing to do")
    loss_fn = LOSSES[cfg.loss]
    for parameter in ema.parameters():
        parameter.requires_grad_(False)

    began, loss_value = time.perf_counter(), math.nan
    for iteration in range(start + 1, cfg.iters + 1):
        rng = np.random.default_rng([cfg.seed, iteration])
        lr_batch, hr_batch = data.batch(rng, cfg.batch)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(iteration, cycle_start, cfg.iters, cfg.lr, cfg.lr_min)
        loss = loss_fn(model(lr_batch), hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for target, source in zip(ema.parameters(), model.parameters()):
                target.lerp_(source, 1.0 - cfg.ema_decay)
        loss_value = loss.item()
        entry = None
        if val_pairs and (iteration % cfg.val_every == 0 or iteration == cfg.iters):
            entry = {"iter": iteration, "loss": loss_value, "val_psnr_y": validate(ema, val_pairs, config.upscale),
                     "wall_seconds": round(wall_before + time.perf_counter() - began, 1)}
            history.append(entry)
        if iteration % cfg.save_every == 0 or iteration == cfg.iters:
            wall = wall_before + time.perf_counter() - began
            _save(cfg.out, model, ema, optimizer, cycle_start, iteration, config, cfg, history, wall)
        if progress:
            progress(iteration, loss_value, entry)
    seconds = time.perf_counter() - began
    done = cfg.iters - start
    return TrainResult(cfg.out, cfg.iters, seconds, done / seconds if seconds else 0.0, loss_value, history)
