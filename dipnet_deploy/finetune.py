"""Stage 1b: checkpoint -> quantization-aware fine-tuned checkpoint with learned activation ranges.

The folded (deploy-form) model is trained through ``qat.QuantSimDIPNet``, the fake-quantized
twin of the int8 QDQ graph ``quantize`` writes: int8 per-channel weights, uint8 activations
whose ranges are parameters (initialised from max calibration on training patches, LSQ-style
straight-through rounding). The trainer's data pipeline (MATLAB-bicubic LR pairs), cosine
schedule, EMA, atomic and resumable checkpoints are reused (``train.fit``).

The checkpoint is BasicSR-shaped: ``params``/``params_ema`` hold deploy-form weights that
``export`` loads like any other, and ``quantization`` holds the ranges learned with them, keyed
by the model's structure (``qat`` point names). ``export`` maps them onto the ONNX tensors and
``quantize --method learned`` writes the int8 model from exactly those ranges.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.calibrate import channel_ranges
from dipnet_deploy.checkpoint import LoadedCheckpoint, load_checkpoint, load_file
from dipnet_deploy.config import refuse_beyond_memory
from dipnet_deploy.equalize import channel_spaces, equalization_scales, equalize_with
from dipnet_deploy.errors import InputError
from dipnet_deploy.export import TRACE_SIZE, ExportOptions, fix_shape, trace_to_onnx
from dipnet_deploy.fileio import ensure_parent, write_checkpoint
from dipnet_deploy.imageio import list_images, silent
from dipnet_deploy.observers import DEFAULT_CLIP
from dipnet_deploy.progress import Progress, no_progress
from dipnet_deploy.qat import (
    FIXED_POINTS,
    QAT_FORMAT,
    CompiledOrEager,
    QuantSimDIPNet,
    covering,
    model_from_onnx,
    observe_ranges,
    range_floor,
)
from dipnet_deploy.range_graphs import tensor_shapes
from dipnet_deploy.safety import refuse_collisions, refuse_replacing_foreign, same_file
from dipnet_deploy.sr_protocol import make_pair, run_torch_whole, score, to_input
from dipnet_deploy.stress_set import coverage_images
from dipnet_deploy.train import ESA_MIN_SIZE, LOSSES, LoopOptions, PairedPatches, fit, load_val_pairs, make_run
from dipnet_deploy.training_memory import TrainingMemory

TARGETS = ("gt", "teacher", "mix")
TRAINING_DEVICES = ("cpu", "cuda", "mps", "xpu")
EQUALIZATION_IMAGES = 16  # evenly spaced training images measure the equalization scales


@dataclass
class FinetuneOptions(LoopOptions):
    """Settings of ``finetune``; the loop's are ``train.LoopOptions``' (with these defaults).

    patch: HR patch side in pixels (None: 32 x scale).
    lr: peak Adam learning rate of the weights; range_lr: of the activation ranges (both decay
        by cosine to lr_min_ratio x peak at ``iters``).
    target: what the output is pulled towards: "gt" (the HR patch), "teacher" (the original
        fp32 model's output: distillation), "mix" (the mean of both losses).
    val: scored by the validation drop (original fp32 Y-PSNR minus simulated int8's).
    equalize: start from the activation-equalized model (``equalize``; the same function in
        float, each channel spanning more of its uint8 range) rather than the checkpoint's weights.
    device: where the models and batches live; the checkpoint is written with CPU tensors.
    compile: run the student and the teacher through ``torch.compile`` (``qat.CompiledOrEager``:
        about twice the iterations per second after a minute of compilation; plain PyTorch where
        compilation fails).
    coverage: generated stress images (``stress_set.coverage_images``) whose LR joins the training
        images in the starting ranges (max calibration).
    floor: no learned range narrower than its starting range (``qat.QuantSimDIPNet`` floor): what the
        training and coverage images showed is never clipped.
    clip: the floor may leave out this fraction of each image's values at each point (0: none, the
        max ranges; ``qat.clipped_bounds``).
    """

    iters: int = 5000
    batch: int = 32
    lr: float = 1e-4
    save_every: int = 250
    patch: int | None = None
    range_lr: float = 1e-3
    lr_min_ratio: float = 0.01
    target: str = "teacher"
    equalize: bool = True
    device: str = "cpu"  # a torch device ("cuda", "cuda:1", "mps"): where the fine-tune runs
    compile: bool = True
    coverage: int = 0
    floor: bool = True
    clip: float = DEFAULT_CLIP


@dataclass
class FinetuneResult:
    out: Path
    iters: int
    seconds: float
    iters_per_second: float
    last_loss: float
    points: int  # learned activation ranges
    history: list[dict] = field(default_factory=list)


def check_options(options: FinetuneOptions, scale: int, esa: bool) -> int:
    """Refuse settings that cannot train; return the HR patch side."""
    if options.loss not in LOSSES:
        raise InputError("--loss", f"unknown loss {options.loss!r} (choose from {', '.join(LOSSES)})")
    if options.target not in TARGETS:
        raise InputError("--target", f"unknown target {options.target!r} (choose from {', '.join(TARGETS)})")
    for name in ("iters", "batch", "val_every", "save_every"):
        if getattr(options, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')}", "must be positive")
    for name in ("lr", "range_lr", "lr_min_ratio", "ema_decay"):
        value = getattr(options, name)
        if not (math.isfinite(value) and value > 0) or (name in ("lr_min_ratio", "ema_decay") and value >= 1):
            raise InputError(f"--{name.replace('_', '-')}", f"{value} is not a usable value")
    patch = options.patch or 32 * scale
    if patch <= 0 or patch % scale:
        raise InputError("--patch", f"{patch} is not a positive multiple of the scale {scale}")
    if esa and patch // scale < ESA_MIN_SIZE:
        raise InputError("--patch", f"ESA needs LR patches of at least {ESA_MIN_SIZE}px (--patch >= {ESA_MIN_SIZE * scale})")
    try:
        device = torch.device(options.device)
        if device.type not in TRAINING_DEVICES:  # "meta" and friends hold no data to train
            raise RuntimeError(f"not a device to train on (choose from {', '.join(TRAINING_DEVICES)})")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise InputError("--device", f"{options.device!r} is not usable here ({str(error).splitlines()[0][:100]})") from None
    return patch


def equalized_start(model: DIPNet, images: list[np.ndarray]) -> DIPNet:
    """``model`` with activation equalization from per-channel ranges over ``images``.

    ``images``: [1, 3, h, w] float32 inputs of any size. The graph is traced with free height and
    width and measured by onnxruntime, as ``quantize`` measures it; the weights of the equalized
    graph come back as a DIPNet (``qat.model_from_onnx``), equal in float to ``model``.
    """
    traced = trace_to_onnx(model, ExportOptions().opset)
    # channel counts of every tensor, Resize's included (data propagation resolves its computed size)
    pinned = fix_shape(copy.deepcopy(traced), TRACE_SIZE, TRACE_SIZE, model.config.upscale, simplify=False)
    shapes = tensor_shapes(onnx.shape_inference.infer_shapes(pinned, data_prop=True))
    low, high = channel_ranges(traced, images, shapes=shapes)
    spaces = channel_spaces(traced)
    return model_from_onnx(equalize_with(traced, equalization_scales(traced, spaces, low, high)))


def learned_ranges_entry(sim: QuantSimDIPNet, ema: QuantSimDIPNet, covered: list[np.ndarray] | None = None,
                         clip: float = 0.0) -> dict:
    """The checkpoint's ``quantization`` entry: ranges of ``params_ema`` (and of ``params``). With ``covered``
    (model inputs), the EMA ranges are widened to contain what the EMA model as written computes on them
    (``qat.covering``): the floor holds for the weights the fine-tune ends with."""
    as_lists = lambda ranges: {name: [low, high] for name, (low, high) in sorted(ranges.items())}  # noqa: E731
    ranges = ema.ranges() if covered is None else covering(ema.ranges(), ema.written().cpu(), covered, clip)
    return {
        "format": QAT_FORMAT,
        "weights": "int8 symmetric per output channel",
        "activations": "uint8 asymmetric",
        "fixed": {name: list(bounds) for name, bounds in FIXED_POINTS.items()},
        "ranges": as_lists(ranges),  # belongs to params_ema
        "ranges_params": as_lists(sim.ranges()),  # belongs to params
        "floor": as_lists(sim.floor()),  # range coverage: no learned range narrower (restored on resuming)
        # the range parameters before the floor widens them, which a resumed run continues from
        "learned_params": as_lists(sim.learned()),
        "learned_ema": as_lists(ema.learned()),
    }


def _restore_ranges(sim: QuantSimDIPNet, ranges: dict, path: Path) -> None:
    if not isinstance(ranges, dict) or sorted(ranges) != sim.names:
        raise InputError(path, "its learned ranges do not match this model's quantization points")
    with torch.no_grad():
        sim.low.copy_(torch.tensor([float(ranges[n][0]) for n in sim.names]))
        sim.high.copy_(torch.tensor([float(ranges[n][1]) for n in sim.names]))


def _checked_floor(floor, sim: QuantSimDIPNet, path: Path) -> dict[str, tuple[float, float]]:
    if not isinstance(floor, dict) or not set(floor) <= set(sim.names):
        raise InputError(path, "its range floor does not match this model's quantization points")
    try:
        checked = {str(name): (float(low), float(high)) for name, (low, high) in floor.items()}
    except (TypeError, ValueError):
        raise InputError(path, "its range floor is not pairs of numbers") from None
    if not all(math.isfinite(low) and math.isfinite(high) and low <= high for low, high in checked.values()):
        raise InputError(path, "its range floor holds a non-finite or inverted range")
    return checked


def finetune(checkpoint: Path, data: Path, out: Path, options: FinetuneOptions = FinetuneOptions(),
             progress: Progress = no_progress, warn: Callable[[str], None] = print) -> FinetuneResult:
    """Quantization-aware fine-tuning of ``checkpoint`` on HR images in ``data``; writes ``out``."""
    loaded: LoadedCheckpoint = load_checkpoint(checkpoint)
    config = loaded.config
    patch = check_options(options, config.upscale, config.esa)
    # the fake-quantized twin keeps about as much per sample as training the deploy form (twice, with a teacher)
    refuse_beyond_memory(config, "--batch/--patch", patch // config.upscale, patch // config.upscale,
                         options.batch * (2 if options.target != "gt" else 1), training=True)
    # --out may be --resume (a run continues its own checkpoint), never what the run reads
    images = list_images(data, silent) + (list_images(options.val, silent) if options.val is not None else [])
    refuse_collisions([("--out", out)], [("--checkpoint", Path(checkpoint))] +
                      [("a --data/--val image", path) for path in images])
    if not (options.resume and same_file(out, options.resume)):  # continuing the file the user named twice
        refuse_replacing_foreign([("checkpoint", out)])
    ensure_parent(out)
    if options.threads:
        torch.set_num_threads(options.threads)
    saved = load_file(options.resume) if options.resume else None
    if saved is not None and "quantization" not in saved:
        raise InputError(options.resume, "not a finetune checkpoint (no learned ranges)")
    memory = TrainingMemory(config, finetune=True)  # its training images also run whole through the model
    patches = PairedPatches(data, config.upscale, patch, warn, memory)
    val_pairs = load_val_pairs(options.val, config.upscale, warn, memory)

    torch.manual_seed(options.seed)
    teacher = loaded.model.eval().to(options.device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    # max calibration over the whole LR images (patches see narrower extremes: a worse start, measured)
    images = [to_input(lr) for _, lr in patches.pairs]
    initial = copy.deepcopy(loaded.model).cpu()
    if options.equalize and saved is None:  # a resumed run restores its own weights
        initial = equalized_start(initial, images[:: max(1, len(images) // EQUALIZATION_IMAGES)])
    initial = initial.to(options.device)
    coverage = [to_input(make_pair(hr, config.upscale)[1]) for hr in coverage_images(options.coverage)]
    seen = [torch.from_numpy(image) for image in images + coverage]
    start = observe_ranges(initial, seen)
    sim = QuantSimDIPNet(initial.train(), start, floor=range_floor(initial, start, seen, options.clip) if options.floor else None)
    sim = sim.to(options.device)
    for parameter in sim.model.parameters():
        parameter.requires_grad_(True)
    groups = [{"params": list(sim.model.parameters()), "lr": options.lr},
              {"params": [sim.low, sim.high], "lr": options.range_lr}]
    run = make_run(sim, groups, options.lr_min_ratio)
    run.params_of = lambda module: {key: value.cpu() for key, value in module.model.state_dict().items()}
    run.load_params = lambda module, params: module.model.load_state_dict(params)
    if saved is not None:
        try:
            run.restore(saved, restart=False)
        except (KeyError, RuntimeError, ValueError) as error:
            raise InputError(options.resume, f"cannot resume from it ({str(error).splitlines()[0][:120]})") from None
        entry = saved["quantization"]
        _restore_ranges(run.model, entry.get("learned_params", entry.get("ranges_params")), options.resume)
        _restore_ranges(run.ema, entry.get("learned_ema", entry.get("ranges")), options.resume)
        for module in (run.model, run.ema):  # the floor of the run's own start (equalized weights), not of this one
            module.set_floor(_checked_floor(entry.get("floor", {}), module, options.resume))
    if run.iteration >= options.iters:
        raise InputError(options.resume, f"already at iteration {run.iteration}; --iters {options.iters} leaves nothing to do")
    start = run.iteration

    distance = LOSSES[options.loss]
    # fit trains run.model; its compiled form (the same parameters) runs it, compiled once per run
    student = CompiledOrEager(run.model, warn) if options.compile else run.model
    reference_of = CompiledOrEager(teacher, lambda _: None) if options.compile else teacher  # the student warns

    def loss_of(_trained: QuantSimDIPNet, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        output = student(lr)
        if options.target == "gt":
            return distance(output, hr)
        with torch.no_grad():
            reference = reference_of(lr)
        if options.target == "teacher":
            return distance(output, reference)
        return 0.5 * (distance(output, hr) + distance(output, reference))

    fp32_psnr = [score(run_torch_whole(teacher, lr), hr, config.upscale)["psnr_y"] for hr, lr in val_pairs]

    def validation() -> dict:
        simulated = [score(run_torch_whole(run.ema, lr), hr, config.upscale)["psnr_y"] for hr, lr in val_pairs]
        drops = [reference - value for reference, value in zip(fp32_psnr, simulated)]
        return {"val_psnr_y": float(np.mean(simulated)), "val_drop_db": float(np.mean(drops)),
                "val_worst_drop_db": float(np.max(drops))}

    if val_pairs and run.iteration == 0:  # where the fine-tune starts: max ranges, original weights
        run.history.append({"iter": 0, **validation()})

    def save(wall: float) -> None:
        payload = run.payload(config, asdict(options) | {"checkpoint": str(checkpoint), "data": str(data)}, wall)
        final = options.floor and run.iteration >= options.iters
        payload["quantization"] = learned_ranges_entry(run.model, run.ema, images + coverage if final else None,
                                                       options.clip)
        payload["finetuned_from"] = {"path": str(checkpoint), "sha256": loaded.sha256, "entry": loaded.source}
        write_checkpoint(out, payload)

    seconds, loss_value = fit(run, patches, loss_of, options, save, validation=validation if val_pairs else None,
                              progress=progress, description="finetune", device=options.device)
    done = options.iters - start
    return FinetuneResult(out, options.iters, seconds, done / seconds if seconds else 0.0, loss_value,
                          len(sim.names), run.history)
