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
from dipnet_deploy.checkpoint import check_finite, check_state_dict, load_file
from dipnet_deploy.config import PRESETS, DIPNetConfig, refuse_beyond_memory
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import ensure_parent, write_checkpoint
from dipnet_deploy.imageio import list_images, silent, usable_images
from dipnet_deploy.progress import Progress, no_progress, show
from dipnet_deploy.safety import refuse_collisions, refuse_replacing_foreign, same_file
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole, score, unscorable
from dipnet_deploy.training_memory import TrainingMemory

ESA_MIN_SIZE = 15  # stride-2 3x3 conv then a 7x7 max pool must leave at least one pixel


@dataclass
class LoopOptions:
    """Settings of the training loop (``fit``) that ``train`` and ``finetune`` share; each sets its defaults.

    iters: total iterations (a resumed run continues up to this count); batch: patches per iteration.
    lr: peak Adam learning rate of the cosine cycle; loss: "l1" or "mse" (``LOSSES``).
    ema_decay: of the weights' exponential moving average (``params_ema``, what export prefers).
    val, val_every: HR validation images and how often they are scored; save_every: how often the
    checkpoint is written (atomically; and at the end). seed: the batches drawn (a resumed run
    continues the same sequence). resume: the checkpoint to continue. threads: PyTorch CPU threads
    (None: all cores).
    """

    iters: int = 1000
    batch: int = 16
    lr: float = 5e-4
    loss: str = "l1"  # "mse" fine-tunes for PSNR, as NTIRE efficient-SR entries do after the L1 stage
    ema_decay: float = 0.999
    val: Path | None = None
    val_every: int = 500
    save_every: int = 200
    seed: int = 0
    resume: Path | None = None
    threads: int | None = None


@dataclass
class TrainOptions(LoopOptions):
    """Settings of ``train`` (what it reads and writes, ``data`` and ``out``, are its arguments); the
    loop's are ``LoopOptions``'.

    preset, expansion: the model variant (``config.PRESETS``) and the RRFB expansion width override.
    patch: HR patch side in pixels. lr_min: the final learning rate of the cosine decay.
    restart: with ``resume``, a new cosine cycle from ``lr`` starting at the resumed iteration.
    val: scored by Y-PSNR (crop = scale). seed: also the weights' initialization.
    """

    preset: str = "x2"
    expansion: int | None = None
    patch: int = 64
    lr_min: float = 1e-6
    restart: bool = False


@dataclass
class TrainResult:
    out: Path
    iters: int
    seconds: float
    iters_per_second: float
    last_loss: float
    history: list[dict] = field(default_factory=list)


class PairedPatches:
    """All training pairs in memory; draws aligned random crops with flips/rot90. An image over the memory
    budget (``memory``'s estimate; without one, its decoding) is skipped with a warning before it is decoded."""

    def __init__(self, directory: Path, scale: int, patch: int, warn: Callable[[str], None] = print,
                 memory: TrainingMemory | None = None):
        if patch % scale:
            raise InputError("--patch", f"{patch} is not a multiple of the scale {scale}")
        self.scale, self.patch = scale, patch
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        files = list_images(directory, warn)

        def too_small(hr: np.ndarray) -> str | None:
            return f"{hr.shape[1]}x{hr.shape[0]} is smaller than the {patch}px patch" if min(hr.shape[:2]) < patch else None

        check = memory.image_check("training") if memory is not None else None
        self.pairs += [make_pair(hr, scale) for _, hr in usable_images(files, warn, too_small, check=check)]
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


def load_val_pairs(directory: Path | None, scale: int, warn: Callable[[str], None],
                   memory: TrainingMemory | None = None) -> list:
    """(HR, LR) of every scorable image under ``directory``; one over the memory budget (``memory``'s estimate,
    its whole-image forward included) is skipped with a warning before it is decoded."""
    if directory is None:
        return []
    check = memory.image_check("validation") if memory is not None else None
    pairs = [make_pair(hr, scale) for _, hr in usable_images(list_images(directory, warn), warn,
                                                             lambda hr: unscorable(hr, scale), check=check)]
    if not pairs:
        raise InputError(directory, "no readable validation images")
    return pairs


LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


def cosine_lr(iteration: int, cycle_start: int, cycle_end: int, peak: float, floor: float) -> float:
    """Learning rate of ``iteration`` (1-based) in a cosine cycle from ``peak`` at ``cycle_start`` to ``floor``."""
    progress = min(1.0, (iteration - cycle_start) / max(1, cycle_end - cycle_start))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


# what a resumable checkpoint must hold: field -> (accepted types, what to call it); optional fields may be absent
RESUME_FIELDS = {"params": (dict, "a state dict"), "params_ema": (dict, "a state dict"), "iter": (int, "an integer"),
                 "config": (dict, "a dict"), "optimizer": (dict, "an optimizer state dict")}
RESUME_OPTIONAL = {"schedule": (dict, "a dict"), "history": (list, "a list"), "wall_seconds": ((int, float), "a number")}


def _resume_state(path: Path, config: DIPNetConfig) -> dict:
    """The checkpoint of ``path`` checked field by field for a resumed run of ``config``."""
    checkpoint = load_file(path)
    fields = RESUME_FIELDS | {k: v for k, v in RESUME_OPTIONAL.items() if k in checkpoint}
    for key, (kind, name) in fields.items():
        if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool):
            raise InputError(path, f"not a resumable training checkpoint ({key!r} is missing or not {name})")
    optimizer, schedule = checkpoint["optimizer"], checkpoint.get("schedule", {})
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise InputError(path, "not a resumable training checkpoint (the optimizer state has no param groups)")
    if checkpoint["iter"] < 0 or not isinstance(schedule.get("cycle_start", 0), int):
        raise InputError(path, "not a resumable training checkpoint (negative 'iter' or a bad schedule)")
    saved = DIPNetConfig.from_dict(checkpoint["config"])
    if saved != config:
        raise InputError(path, f"checkpoint is for {saved}, not the requested {config}")
    expected = build_train_model(config).state_dict()
    for key in ("params", "params_ema"):
        check_state_dict(path, checkpoint[key], expected)
        check_finite(path, checkpoint[key])
    return checkpoint


@dataclass
class Run:
    """What a training loop carries across iterations and into its checkpoint (BasicSR layout).

    Each optimizer param group holds ``peak_lr`` and ``floor_lr``: the cosine cycle's ends.
    """

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    iteration: int = 0  # iterations done
    cycle_start: int = 0
    history: list[dict] = field(default_factory=list)
    wall_before: float = 0.0  # seconds spent before this process (resumed runs)
    # what ``params``/``params_ema`` hold of a model, and how they go back into it
    params_of: Callable[[torch.nn.Module], dict] = lambda module: module.state_dict()
    load_params: Callable[[torch.nn.Module, dict], object] = lambda module, params: module.load_state_dict(params)

    def payload(self, config: DIPNetConfig, settings: dict, wall: float) -> dict:
        """The checkpoint dict: ``params``/``params_ema`` state dicts, optimizer, schedule, history."""
        return {
            "wall_seconds": wall,
            "params": self.params_of(self.model),
            "params_ema": self.params_of(self.ema),
            "iter": self.iteration,
            "config": config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"cycle_start": self.cycle_start,
                         "lr": [g["peak_lr"] for g in self.optimizer.param_groups],
                         "lr_min": [g["floor_lr"] for g in self.optimizer.param_groups]},
            "train": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
            "history": self.history,
        }

    def restore(self, checkpoint: dict, restart: bool) -> None:
        """Continue from a saved payload; ``restart`` begins a new cosine cycle at its iteration."""
        self.load_params(self.model, checkpoint["params"])
        self.load_params(self.ema, checkpoint["params_ema"])
        ends = [(g["peak_lr"], g["floor_lr"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group, (peak, floor) in zip(self.optimizer.param_groups, ends):  # this run's --lr, not the saved one
            group["peak_lr"], group["floor_lr"] = peak, floor
        self.iteration, self.history = int(checkpoint["iter"]), list(checkpoint.get("history", []))
        self.wall_before = float(checkpoint.get("wall_seconds", 0.0))
        # a resumed run continues its cycle (--iters may extend it) unless told to restart it here
        self.cycle_start = self.iteration if restart else int(checkpoint.get("schedule", {}).get("cycle_start", 0))


def make_run(model: torch.nn.Module, groups: list[dict], floor_ratio: float) -> Run:
    """A run over ``model`` with Adam (0.9, 0.99) on param ``groups`` (each with its peak ``lr``)."""
    for group in groups:
        group["peak_lr"], group["floor_lr"] = group["lr"], group["lr"] * floor_ratio
    ema = copy.deepcopy(model).eval()
    for parameter in ema.parameters():
        parameter.requires_grad_(False)
    return Run(model, ema, torch.optim.Adam(groups, betas=(0.9, 0.99)))


def fit(run: Run, data: PairedPatches, loss_of: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        settings: LoopOptions, save: Callable[[float], None], validation: Callable[[], dict] | None = None,
        progress: Progress = no_progress, description: str = "train",
        device: str | torch.device = "cpu") -> tuple[float, float]:
    """Run iterations ``run.iteration + 1 .. settings.iters``; returns (seconds, last loss).

    Batches of iteration i come from ``(settings.seed, i)`` alone, so a resumed run draws what an
    uninterrupted one would. ``save(wall_seconds)`` writes the checkpoint every ``settings.save_every``
    iterations and at the end; ``validation()`` returns a history entry every ``settings.val_every``.
    A non-finite loss stops the run before the step, keeping the last checkpoint written. Batches
    go to ``device``, where the models must be. ``progress`` wraps the iterations still to run
    (``description``), showing the loss and the latest validation figures.
    """
    iters = settings.iters
    began, loss_value, figures = time.perf_counter(), math.nan, {}
    loop = progress(range(run.iteration + 1, iters + 1), description, iters - run.iteration)
    for iteration in loop:
        rng = np.random.default_rng([settings.seed, iteration])
        lr_batch, hr_batch = (tensor.to(device) for tensor in data.batch(rng, settings.batch))
        for group in run.optimizer.param_groups:
            group["lr"] = cosine_lr(iteration, run.cycle_start, iters, group["peak_lr"], group["floor_lr"])
        loss = loss_of(run.model, lr_batch, hr_batch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise InputError("--lr", f"the loss became {loss_value} at iteration {iteration}: stopped, the last "
                                     "checkpoint written is kept (try a lower --lr)")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        with torch.no_grad():
            for target, source in zip(run.ema.parameters(), run.model.parameters()):
                target.lerp_(source, 1.0 - settings.ema_decay)
        run.iteration = iteration
        entry = None
        if validation and (iteration % settings.val_every == 0 or iteration == iters):
            entry = {"iter": iteration, "loss": loss_value} | validation()
            entry["wall_seconds"] = round(run.wall_before + time.perf_counter() - began, 1)
            run.history.append(entry)
            figures = {name: value for name, value in entry.items() if name not in ("iter", "loss", "wall_seconds")}
        if iteration % settings.save_every == 0 or iteration == iters:
            save(run.wall_before + time.perf_counter() - began)
        show(loop, loss=loss_value, **figures)
    return time.perf_counter() - began, loss_value


def train(data_dir: Path, out: Path, cfg: TrainOptions = TrainOptions(), progress: Progress = no_progress,
          warn: Callable[[str], None] = print) -> TrainResult:
    """Train (or continue, ``cfg.resume``) on the HR images under ``data_dir`` (LR: their MATLAB bicubic
    x1/scale, made once in memory), writing the checkpoint ``out`` every ``save_every`` iterations and at
    the end (BasicSR layout); returns its path and figures."""
    data_dir, out = Path(data_dir), Path(out)
    if cfg.preset not in PRESETS:
        raise InputError("--preset", f"unknown preset {cfg.preset!r}")
    if cfg.loss not in LOSSES:
        raise InputError("--loss", f"unknown loss {cfg.loss!r} (choose from {', '.join(LOSSES)})")
    if cfg.restart and not cfg.resume:
        raise InputError("--restart", "needs --resume (it restarts the schedule of a resumed run)")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):  # click's range lets NaN and inf through
        raise InputError("--lr", f"{cfg.lr} is not a positive finite learning rate")
    for name in ("iters", "batch", "patch", "val_every", "save_every"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')}", "must be positive")
    config = PRESETS[cfg.preset].replace(expansion=cfg.expansion)
    lr_side = cfg.patch // config.upscale
    refuse_beyond_memory(config, "--expansion/--batch/--patch", lr_side, lr_side, cfg.batch, training=True)
    if config.esa and cfg.patch // config.upscale < ESA_MIN_SIZE:
        raise InputError("--patch", f"ESA needs LR patches of at least {ESA_MIN_SIZE}px "
                                    f"(--patch >= {ESA_MIN_SIZE * config.upscale} at x{config.upscale})")
    # --out may be --resume (a run continues its own checkpoint) but never one of the images it reads
    images = list_images(data_dir, silent) + (list_images(cfg.val, silent) if cfg.val is not None else [])
    refuse_collisions([("--out", out)], [("a --data/--val image", path) for path in images])
    if not (cfg.resume and same_file(out, cfg.resume)):  # continuing the file the user named twice
        refuse_replacing_foreign([("checkpoint", out)])
    ensure_parent(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    checkpoint = _resume_state(cfg.resume, config) if cfg.resume else None
    memory = TrainingMemory(config)
    data = PairedPatches(data_dir, config.upscale, cfg.patch, warn, memory)
    val_pairs = load_val_pairs(cfg.val, config.upscale, warn, memory)

    torch.manual_seed(cfg.seed)
    model = build_train_model(config).train()
    run = make_run(model, [{"params": list(model.parameters()), "lr": cfg.lr}], cfg.lr_min / cfg.lr)
    if checkpoint is not None:
        try:
            run.restore(checkpoint, cfg.restart)
        except (ValueError, KeyError, TypeError) as error:  # torch's optimizer checks of the saved groups
            raise InputError(cfg.resume, f"its optimizer state does not fit this model ({error})") from None
    if run.iteration >= cfg.iters:
        raise InputError(cfg.resume, f"checkpoint is already at iteration {run.iteration}; "
                                     f"--iters {cfg.iters} leaves nothing to do")
    start = run.iteration

    def save(wall: float) -> None:
        write_checkpoint(out, run.payload(config, {"data": data_dir, "out": out, **asdict(cfg)}, wall))

    seconds, loss_value = fit(
        run, data, lambda net, lr, hr: LOSSES[cfg.loss](net(lr), hr), cfg, save,
        validation=(lambda: {"val_psnr_y": validate(run.ema, val_pairs, config.upscale)}) if val_pairs else None,
        progress=progress)
    done = cfg.iters - start
    return TrainResult(out, cfg.iters, seconds, done / seconds if seconds else 0.0, loss_value, run.history)
