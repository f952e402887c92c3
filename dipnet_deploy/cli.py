"""The ``dipnet-deploy`` command line. Parses options and calls the stage modules; nothing else."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from dipnet_deploy import __version__, leftovers
from dipnet_deploy.artifacts import DEFAULT_FP32, DEFAULT_INT8, default_checkpoint, default_fp32_path, default_int8_path
from dipnet_deploy.config import MAX_CHANNELS, PRESETS
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import is_write_failure, json_text, removing_empty_folders
from dipnet_deploy.observers import DEFAULT_CLIP
from dipnet_deploy.precision import FALLBACKS
from dipnet_deploy.runtime import RUNTIMES, model_named


class StageChoice(click.Choice):
    """A ``click.Choice`` of the names a stage module defines (``module.name``), read when click first
    needs them (help, or parsing the option): the CLI starts without importing torch or onnxruntime."""

    def __init__(self, module: str, name: str):  # click.Choice's own __init__ would read them at once
        self.module, self.name, self.case_sensitive = module, name, True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.name))


QUANTIZE_METHODS = StageChoice("dipnet_deploy.quantize", "METHODS")
FINETUNE_TARGETS = StageChoice("dipnet_deploy.finetune", "TARGETS")
LOSSES = StageChoice("dipnet_deploy.train", "LOSSES")
PROTOCOLS = StageChoice("dipnet_deploy.compare", "PROTOCOLS")


def one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name, say) written as escapes: always one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


MESSAGE_LIMIT = 2000  # characters of one error line: a crafted name must not flood the terminal


def fail(message: str) -> None:
    line = one_line(message)
    if len(line) > MESSAGE_LIMIT:
        line = line[:MESSAGE_LIMIT - 1] + "…"
    click.echo(f"dipnet-deploy: error: {line}", err=True)
    sys.exit(2)


def user_errors(command):
    """Turn InputError, a write that found no room (``fileio.WRITE_FAILURES``, where no stage named the
    file) and memory the machine could not give (where no runtime named the model) into one stderr line and
    exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as error:
            fail(str(error))
        except MemoryError as error:  # numpy's names the array it could not allocate
            fail(f"out of memory ({error or 'MemoryError'})")
        except RuntimeError as error:
            if not str(error).startswith("Symlink loop from "):  # pathlib's resolve() on a loop of links
                raise
            fail(f"{str(error).removeprefix('Symlink loop from ')}: {os.strerror(errno.ELOOP)}")
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENAMETOOLONG):  # a path no file can have, wherever it is used
                fail(f"{error.filename or 'a path'}: {error.strerror or os.strerror(error.errno)}")
            if not is_write_failure(error):
                raise
            where = error.filename or _stream_written(error) or "an output"
            fail(f"{where}: cannot write ({error.strerror or os.strerror(error.errno)})")

    return wrapper


STANDARD_STREAMS = {1: "standard output", 2: "standard error"}


def _stream_written(error: OSError) -> str | None:
    """The standard stream a failed ``click.echo`` wrote to (``info > /dev/full``), found in the traceback: the
    error of a full or failing stream names no file. None when no echo to one of them failed."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code is click.utils.echo.__code__:
            with contextlib.suppress(AttributeError, OSError, ValueError):  # a stream with no descriptor (tests')
                return STANDARD_STREAMS.get(frame.f_locals["file"].fileno())
    return None


# signals that end a run with the clean-up of Ctrl-C: SIGTERM (schedulers, ``timeout``), SIGHUP (the terminal
# closed), SIGQUIT (Ctrl-\, whose default would dump core and skip every clean-up), and the others whose default
# is to end the process: SIGUSR1, SIGUSR2, SIGALRM (SIGPROF and SIGVTALRM stay the profilers')
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


class Terminated(KeyboardInterrupt):
    """One of ``TERMINATING_SIGNALS`` (``signum``), raised where the program is: every clean-up that Ctrl-C
    runs (temporary files, worker processes) runs for it too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# the terminating signal this run received: a C extension that turns the handler's exception into a KeyboardInterrupt
# of its own (Ray's wait: ``check_status``) loses the Terminated, not the signal
_received: list[int] = []


def _terminate(signum, frame) -> None:
    for each in TERMINATING_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(each, signal.SIG_IGN)
    _received.append(signum)
    raise Terminated(signum)


def _stopped(abort: click.exceptions.Abort) -> None:
    """Say why the run stopped and exit: 130 for Ctrl-C, 128 + the signal's number for a terminating signal."""
    cause = abort.__cause__
    signum = cause.signum if isinstance(cause, Terminated) else (_received[0] if _received else None)
    if signum is not None:
        name = "" if signum == signal.SIGTERM else f" ({signal.Signals(signum).name})"
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            click.echo(f"dipnet-deploy: terminated{name}", err=True)
        sys.exit(128 + signum)
    click.echo("dipnet-deploy: interrupted", err=True)
    sys.exit(130)


def run() -> None:
    """Console entry point: click usage errors also become one line and exit code 2; Ctrl-C exits 130, SIGTERM
    143 (SIGHUP 129, SIGQUIT 131), after the same clean-up. What killed runs left (``leftovers``) is removed
    first; folders the run made for outputs and left empty (it failed, or was stopped) are removed last."""
    previous = {each: signal.signal(each, _terminate) for each in TERMINATING_SIGNALS}
    _received.clear()
    try:
        leftovers.sweep()
        with removing_empty_folders():
            main.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        fail(error.format_message().replace("\n", " "))
    except OSError as error:  # --help or --version into a full device: no command's user_errors around it
        if not is_write_failure(error) or _stream_written(error) is None:
            raise
        fail(f"{_stream_written(error)}: cannot write ({error.strerror or os.strerror(error.errno)})")
    except click.exceptions.Abort as abort:  # click's form of KeyboardInterrupt; outputs are atomic, none is partial
        _stopped(abort)
    finally:
        for each, handler in previous.items():  # for a caller that runs the command in its own process (tests)
            signal.signal(each, handler)


max_clip_option = click.option(
    "--max-clip", type=click.FloatRange(0, 0.01), default=DEFAULT_CLIP, show_default=True,
    help="Range coverage of learned ranges: the largest fraction of a tensor's values on any one calibration, "
         "coverage or training image that a learned range may clip (0: none, the max ranges). A bound per image "
         "keeps flat regions of colours the photos lacked unclipped (BENCHMARKS.md: 'int8 on every image').")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print a one-line JSON summary (strict JSON) as the last line of stdout.")


def emit_json(summary: dict) -> None:
    click.echo(json_text(summary, indent=None))


def warn(message: str) -> None:
    """One line on stderr, on its own line even while a progress bar is drawn there."""
    from tqdm import tqdm

    tqdm.write(one_line(message), file=sys.stderr)


def _positive(unit: str, below: Callable[[], float] = lambda: math.inf, least: float = 0.0):
    """Click callback: a positive plain decimal number (``PLAIN_NUMBER``) under ``below()`` and at least ``least``
    (a smaller budget only refuses every input, in words that round it to 0), refused in one line under the name
    the user set: the option, or the environment variable."""

    def callback(context, parameter, text: str | None) -> float | None:
        if text is None:
            return None
        from dipnet_deploy.memory_budget import PLAIN_NUMBER

        value = float(text) if PLAIN_NUMBER.fullmatch(text) else math.nan
        source = context.get_parameter_source(parameter.name)
        name = parameter.envvar if source == click.core.ParameterSource.ENVIRONMENT else parameter.opts[0]
        if not (0 < value < below()):
            raise click.UsageError(f"{name}: {text!r} is not a positive number of {unit} (digits 0-9 and at most "
                                   "one decimal point)")
        if value < least:
            raise click.UsageError(f"{name}: {text!r} is below the least accepted, {least:g} {unit}")
        return value

    return callback


def _memory_limit() -> float:
    from dipnet_deploy.imageio import MAX_MEMORY_MB_LIMIT  # here: imageio loads OpenCV, which --help need not

    return MAX_MEMORY_MB_LIMIT


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dipnet-deploy")
@click.option("--max-megapixels", envvar="DIPNET_MAX_MEGAPIXELS", callback=_positive("megapixels"),
              help="Largest image decoded, in megapixels (default 100; env DIPNET_MAX_MEGAPIXELS). Larger ones "
                   "are skipped with a warning in a folder, refused when given alone.")
@click.option("--max-memory-mb", envvar="DIPNET_MAX_MEMORY_MB", callback=_positive("MiB", _memory_limit, least=1),
              help="Memory one input may take in upscale (a video: its frames and the encoder's look-ahead), compare "
                   "(shared by its --workers), quantize's calibration and train/finetune (a validation image, or a "
                   "finetune training image, run whole through the model), in MiB (default 700; env "
                   "DIPNET_MAX_MEMORY_MB), estimated from its header before it is decoded (the model's own memory not "
                   "counted). Larger ones are skipped with a warning in a folder, refused when given alone.")
def main(max_megapixels: float | None, max_memory_mb: float | None) -> None:
    """Fold, export, int8-quantize and evaluate DIPNet super-resolution models.

    The pipeline is a chain of files: checkpoint -> fp32 ONNX (+ model card JSON) ->
    calibration ranges JSON -> int8 ONNX -> report directory. Run `export`, then `quantize`,
    then `compare`; each step reads what the previous one wrote.
    """
    if max_megapixels is not None:  # through the environment, so worker processes apply them too
        os.environ["DIPNET_MAX_MEGAPIXELS"] = str(max_megapixels)
    if max_memory_mb is not None:
        os.environ["DIPNET_MAX_MEMORY_MB"] = str(max_memory_mb)


def _checkpoint_or_default(checkpoint: Path | None) -> Path:
    if (path := default_checkpoint(checkpoint)) is None:
        raise InputError("--checkpoint", "required (no packaged default weights in this installation)")
    return path


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False),
              help="DIPNet weights (.pth): raw state dict or BasicSR checkpoint (params_ema preferred), "
                   "deploy or training form. Default: the packaged x2 weights.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help="Model variant. Default: inferred from the checkpoint's keys and shapes.")
@click.option("--feature-channels", type=click.IntRange(1, MAX_CHANNELS), help="Override the trunk width.")
@click.option("--mid-channels", type=click.IntRange(1, MAX_CHANNELS), help="Override the RRFB inner width.")
@click.option("--upscale", type=click.IntRange(1), help="Override the scale factor.")
@click.option("--esa/--no-esa", default=None, help="Override whether blocks end with ESA attention.")
@click.option("--height", type=click.IntRange(1), default=1080, show_default=True,
              help="Fixed input height (the graph has no dynamic axes).")
@click.option("--width", type=click.IntRange(1), default=1920, show_default=True, help="Fixed input width.")
@click.option("--opset", type=click.IntRange(11, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the .onnx (model card: same name, .json). "
                   "Default: build/dipnet_x{scale}_{H}x{W}.onnx")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim (keeps shape-computing nodes).")
@json_option
@user_errors
def export(checkpoint, preset, feature_channels, mid_channels, upscale, esa, height, width, opset, output,
           no_simplify, as_json):
    """Fold the checkpoint and export a fixed-shape, simplified, verified fp32 ONNX.

    Steps: load (strict key/shape check) -> fold training-form branches -> ONNX (input
    `input`, output `output`, 1x3xHxW) -> onnxsim -> onnx.checker -> onnxruntime vs PyTorch
    on a random image -> model card JSON beside the .onnx.
    """
    from dipnet_deploy.checkpoint import load_checkpoint
    from dipnet_deploy.export import ExportOptions
    from dipnet_deploy.export import export as run_export

    loaded = load_checkpoint(_checkpoint_or_default(checkpoint), preset, feature_channels=feature_channels,
                             mid_channels=mid_channels, upscale=upscale, esa=esa)
    output = output or default_fp32_path(loaded.config.upscale, height, width)
    if loaded.training_form:
        click.echo(f"folded training-form checkpoint ({loaded.source}); fold max|diff| {loaded.fold_max_abs_diff:.2e}")
    result = run_export(loaded, output, ExportOptions(height, width, opset, not no_simplify))
    card = result.card
    click.echo(f"wrote {result.onnx_path} ({card['params']:,} params, {card['macs']:,} MACs = "
               f"{card['gflops']} GFLOP at {height}x{width}, ORT vs torch max|diff| {card['ort_max_abs_diff']:.2e})")
    click.echo(f"wrote {result.card_path}")
    if as_json:
        keys = ("onnx", "params", "macs", "gflops", "input_shape", "output_shape", "opset", "fold_max_abs_diff",
                "ort_max_abs_diff", "onnx_sha256", "seconds")
        emit_json({k: card[k] for k in keys} | {"card": str(result.card_path), "ops": card["ops"]})


@main.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--height", type=click.IntRange(1), default=1080, show_default=True,
              help="Input height for a checkpoint's MAC count.")
@click.option("--width", type=click.IntRange(1), default=1920, show_default=True,
              help="Input width for a checkpoint's MAC count.")
@json_option
@user_errors
def info(path, height, width, as_json):
    """Describe a checkpoint (.pth) or an ONNX model: params, MACs, shapes, ops."""
    from dipnet_deploy.info import describe

    summary = describe(path, height, width)
    for key, value in summary.items():
        click.echo(f"{key:>16}: {value}")
    if as_json:
        emit_json(summary)


def loop_options(iters: int, batch: int, val_every: int, save_every: int):
    """The options of a training loop that `train` and `finetune` share (each with its own defaults)."""
    options = (
        click.option("--iters", type=click.IntRange(1), default=iters, show_default=True,
                     help="Total iterations (a resumed run continues up to this count)."),
        click.option("--batch", type=click.IntRange(1), default=batch, show_default=True, help="Patches per iteration."),
        click.option("--val-every", type=click.IntRange(1), default=val_every, show_default=True,
                     help="Validate every K iterations."),
        click.option("--save-every", type=click.IntRange(1), default=save_every, show_default=True,
                     help="Write the checkpoint every K iterations (atomically)."),
        click.option("--threads", type=click.IntRange(1), help="PyTorch CPU threads (default: all cores)."),
    )

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@main.command()
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Directory of HR training images (searched recursively).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="x2", show_default=True, help="Model variant.")
@click.option("--expansion", type=click.IntRange(1), help="Width E of the training-form 3x3 branch.")
@loop_options(iters=30000, batch=16, val_every=1000, save_every=500)
@click.option("--patch", type=click.IntRange(2), default=64, show_default=True, help="HR patch side in pixels.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="Peak Adam learning rate of the cosine cycle (decays to 1e-6 at --iters).")
@click.option("--loss", type=LOSSES, default="l1", show_default=True,
              help="Pixel loss; mse is for a final PSNR fine-tune after the L1 stage.")
@click.option("--restart", is_flag=True,
              help="With --resume: start a new cosine cycle at --lr from the resumed iteration (warm restart, "
                   "e.g. for a fine-tune). Without it a resumed run continues its cycle.")
@click.option("--val", type=click.Path(path_type=Path), help="HR validation images (Y-PSNR, crop = scale).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=Path("runs/x2/last.pth"),
              show_default=True, help="Checkpoint to write (BasicSR layout with optimizer state).")
@click.option("--resume", type=click.Path(path_type=Path, dir_okay=False), help="Continue from this checkpoint.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed for weights init and batches.")
@json_option
@user_errors
def train(data, preset, expansion, iters, batch, patch, lr, loss, restart, val, val_every, save_every, out, resume, seed,
          threads, as_json):
    """Train the training-form (three-branch) DIPNet on HR images, BasicSR style.

    LR inputs are the MATLAB-bicubic LR of each image (as `compare` makes them), L1 (or MSE)
    loss, Adam, cosine decay, EMA weights; checkpoints can be resumed (optionally with a
    warm restart of the schedule) and fold on export.
    """

    from dipnet_deploy.train import TrainOptions
    from dipnet_deploy.train import train as run_train

    options = TrainOptions(preset=preset, expansion=expansion, iters=iters, batch=batch, patch=patch, lr=lr, loss=loss,
                           restart=restart, val=val, val_every=val_every, save_every=save_every, seed=seed,
                           resume=resume, threads=threads)
    result = run_train(data, out, options, progress_bar, warn=warn)
    click.echo(f"wrote {result.out} after {result.iters} iterations ({result.iters_per_second:.2f} it/s)")
    if as_json:
        last = result.history[-1] if result.history else {}
        emit_json({"checkpoint": str(result.out), "iters": result.iters, "seconds": round(result.seconds, 1),
                   "iters_per_second": round(result.iters_per_second, 3), "loss": result.last_loss,
                   "val_psnr_y": last.get("val_psnr_y")})


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False),
              help="Weights to fine-tune: any checkpoint `export` accepts. Default: the packaged x2 weights.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Directory of HR training images (searched recursively; never the evaluation sets).")
@loop_options(iters=5000, batch=32, val_every=500, save_every=250)
@click.option("--patch", type=click.IntRange(2), help="HR patch side in pixels. Default: 32 x scale.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Peak Adam learning rate of the weights (cosine decay to 1% at --iters).")
@click.option("--range-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak Adam learning rate of the activation ranges.")
@click.option("--equalize/--no-equalize", default=True, show_default=True,
              help="Start from the activation-equalized weights (the same float function; each channel fills "
                   "more of its uint8 range), as `quantize` does by default.")
@click.option("--target", type=FINETUNE_TARGETS, default="teacher", show_default=True,
              help="teacher: the original fp32 model's output (distillation: the int8 model learns to be the "
                   "fp32 one); gt: the HR patch; mix: the mean of both losses.")
@click.option("--loss", type=LOSSES, default="l1", show_default=True,
              help="Distance to the target.")
@click.option("--val", type=click.Path(path_type=Path),
              help="HR validation images: the bar shows the simulated int8 drop vs the original fp32 (Y-PSNR).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=Path("runs/finetune/last.pth"),
              show_default=True, help="Checkpoint to write: deploy-form params/params_ema plus the learned ranges.")
@click.option("--resume", type=click.Path(path_type=Path, dir_okay=False), help="Continue from this finetune checkpoint.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed for the batches.")
@click.option("--device", default="cpu", show_default=True,
              help="Torch device to train on, e.g. cuda (the checkpoint is the same either way).")
@click.option("--compile/--no-compile", "compile_step", default=True, show_default=True,
              help="Run the training step through torch.compile: about a minute of compilation, then about twice "
                   "the iterations per second on CPU (plain PyTorch, with a warning, where compilation fails).")
@click.option("--coverage", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="Generated stress images (saturated flat colours, line art, text, UI) whose LR joins the "
                   "training images in the starting ranges (and so the floor); 0: the training images alone.")
@click.option("--floor/--no-floor", "range_floor", default=True, show_default=True,
              help="Never learn a range that clips more than --max-clip of a tensor's values on any one training "
                   "or coverage image; --no-floor lets ranges narrow freely.")
@max_clip_option
@json_option
@user_errors
def finetune(checkpoint, data, iters, batch, patch, lr, range_lr, equalize, target, loss, val, val_every, save_every, out,
             resume, seed, threads, device, compile_step, coverage, range_floor, max_clip, as_json):
    """Quantization-aware fine-tuning: weights and int8 activation ranges learned together.

    The folded model is trained through a fake-quantized twin of the int8 QDQ graph that
    `quantize` writes (int8 per-channel weights, uint8 activations with learned ranges,
    straight-through rounding). Then: `export --checkpoint OUT` carries the ranges into the
    ONNX, and `quantize --method learned` writes the int8 model from exactly those ranges.
    Compare the result against the ORIGINAL fp32 model (`compare --fp32 original.onnx`).

    The defaults take about 16 minutes for the packaged x2 on 2 CPU cores. For the official x4
    use `--batch 16 --iters 10000` (about 37 minutes).
    """

    from dipnet_deploy.finetune import FinetuneOptions
    from dipnet_deploy.finetune import finetune as run_finetune

    options = FinetuneOptions(iters=iters, batch=batch, patch=patch, lr=lr, range_lr=range_lr, target=target, loss=loss,
                              val=val, val_every=val_every, save_every=save_every, seed=seed, resume=resume,
                              threads=threads, equalize=equalize, device=device, compile=compile_step,
                              coverage=coverage, floor=range_floor, clip=max_clip)
    checkpoint = _checkpoint_or_default(checkpoint)
    with model_named(checkpoint):  # no memory for the calibration of its starting ranges: named as its checkpoint
        result = run_finetune(checkpoint, data, out, options, progress_bar, warn=warn)
    click.echo(f"wrote {result.out} after {result.iters} iterations ({result.iters_per_second:.2f} it/s, "
               f"{result.points} learned activation ranges)")
    if as_json:
        last = result.history[-1] if result.history else {}
        emit_json({"checkpoint": str(result.out), "iters": result.iters, "seconds": round(result.seconds, 1),
                   "iters_per_second": round(result.iters_per_second, 3), "loss": result.last_loss,
                   "learned_ranges": result.points, "val_drop_db": last.get("val_drop_db"),
                   "val_worst_drop_db": last.get("val_worst_drop_db")})


RUNTIME_HELP = ("What runs the ONNX models: onnxruntime (CPU) or OpenVINO's own API on the CPU (optional extra: "
                "pip install 'dipnet-deploy[openvino]'); both read the same fp32 and QDQ int8 files.")
runtime_option = click.option("--runtime", type=click.Choice(RUNTIMES), default="onnxruntime", show_default=True,
                              help=RUNTIME_HELP)


PROGRESS_UNITS = {"calibrate": "img", "compare": "img", "diagnose": "tensor", "auto": "step", "upscale": "frame",
                  "latency": "round", "throughput": "model", "load": "session",
                  "budget:": "model", "validation": "img"}


def progress_bar(iterable, description: str, total: int | None = None):
    """The stages' ``progress.Progress``: a bar on stderr, counted in the loop's unit."""
    from tqdm import tqdm

    unit = PROGRESS_UNITS.get(description.split()[0], "it")
    return tqdm(iterable, desc=description, total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)


@main.command()
@click.option("--model", type=click.Path(path_type=Path, dir_okay=False),
              default=DEFAULT_FP32, show_default=True,
              help="The fp32 ONNX written by `export`.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration images (png, jpg, bmp, tif, webp; recursive, sorted by path). "
                   "Default: the project's calibration/ set, unless --ranges reuses saved ranges.")
@click.option("--method", type=QUANTIZE_METHODS,
              help="Default: max; with --max-drop, learned when the ONNX carries learned ranges, else auto. "
                   "max: observed min/max (the seed's); percentile: clip tails; entropy: KL threshold "
                   "(TensorRT-style); mse: range minimizing uint8 quantization MSE; auto: max + equalization, "
                   "the output conv on the exact 1/255 grid, every other range and the int8 weights refined for "
                   "the model's output through a fake-quantized twin (minutes; DIPNet ONNX from `export`; the "
                   "weights are pinned in the ranges file); learned: the ranges "
                   "`finetune` learned, carried by the exported ONNX (no calibration, no equalization).")
@click.option("--percentile", type=click.FloatRange(50, 100, min_open=True), default=99.999, show_default=True,
              help="Kept percentile for --method percentile.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False),
              help="int8 ONNX to write. Default: MODEL with .int8.onnx.")
@click.option("--ranges", type=click.Path(path_type=Path, dir_okay=False),
              help="With --calib: where to save the ranges JSON (default: beside the output). "
                   "Without --calib: reuse this saved file (gives a byte-identical model).")
@click.option("--limit", type=click.IntRange(1), help="Use N evenly spaced images of the calibration set.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="Weight scales per output channel or one per tensor (weights are int8 symmetric).")
@click.option("--symmetric-activations", is_flag=True,
              help="Activations int8 symmetric instead of uint8 asymmetric.")
@click.option("--equalize/--no-equalize", default=None,
              help="Rescale each activation channel (and the weights around it, same fp32 function) so it "
                   "fills its tensor's observed range: less int8 rounding noise, no range grows. "
                   "--no-equalize quantizes the graph as exported (what stock quantize_static does). "
                   "Default: on, except with --method learned. With --ranges alone, the saved file decides.")
@click.option("--auto-steps", type=click.IntRange(1),
              help="Refinement steps of --method auto (8 crops each). Default: 1,000 per started 100,000 conv "
                   "weights (1,000 for the x2 default, about 6 minutes at 540x960 on 2 cores; 3,000 for the "
                   "official x4, about 43). Fewer steps lose more (BENCHMARKS.md). Needs --calib: reused "
                   "--ranges keep the steps they were refined with.")
@click.option("--coverage", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="Generated stress images (saturated flat colours, line art, text, gradients, flat UI) calibrated "
                   "beside yours, so that no range is narrower than what such images produce. Wider ranges cost "
                   "photos resolution (BENCHMARKS.md: 'int8 on every image'); 0: your images alone.")
@click.option("--max-drop", type=float, metavar="DB",
              help="Quality budget: the largest mean PSNR-Y drop (dB, against the fp32 model, sr protocol) on --val. "
                   "When the pure int8 model loses more, activation tensors leave int8 one at a time, ranked by the "
                   "drop each regains per latency it costs (both measured), until the drop is within it (the fp32 "
                   "model at the end). The path is recorded in the ranges file and the card. Minutes.")
@click.option("--val", "val_dir", type=click.Path(path_type=Path, file_okay=False),
              help="HR validation images for --max-drop: yours, never the calibration images.")
@click.option("--fallback", type=click.Choice(FALLBACKS), default="float", show_default=True,
              help="What a tensor out of int8 becomes under --max-drop: float (its Q/DQ removed) or uint16 (16-bit "
                   "Q/DQ, opset 21: what 16-bit accelerators take; CPU runtimes run the convs around it in float).")
@runtime_option
@max_clip_option
@json_option
@user_errors
def quantize(model, calib, method, percentile, output, ranges, limit, per_channel, symmetric_activations, equalize,
             auto_steps, coverage, max_drop, val_dir, fallback, runtime, max_clip, as_json):
    """Calibrate activation ranges in bounded memory and write an int8 QDQ ONNX.

    Each image is preprocessed as the seed does (bilinear resize to the model input, RGB,
    /255) and reduced into fixed-size statistics, so memory does not grow with the number
    of images. By default each activation channel is rescaled to fill its tensor's range
    (--equalize: same fp32 function, same max ranges, less rounding noise). onnxruntime's
    quantizer writes the model from these ranges; the ranges JSON and a model card are
    written beside it.
    """
    from dipnet_deploy.budget import BudgetOptions
    from dipnet_deploy.ptq import AutoOptions
    from dipnet_deploy.quantize import QuantizeOptions, best_method, default_calibration_dir
    from dipnet_deploy.quantize import quantize as run_quantize

    if (max_drop is None) != (val_dir is None):
        raise click.UsageError("--max-drop and --val go together")
    budget = BudgetOptions(max_drop, val_dir, fallback, runtime) if max_drop is not None else None
    method = method or best_method(model, budget)
    if calib is None and ranges is None and method != "learned":
        calib = default_calibration_dir()
    if equalize is None:
        equalize = method != "learned"
    if calib is not None and not calib.is_dir():
        raise InputError(calib, "not a directory")
    if max_clip != DEFAULT_CLIP and method != "auto":
        raise InputError("--max-clip", "bounds the ranges --method auto learns (finetune has its own)")
    if auto_steps is not None and (method != "auto" or calib is None):
        raise InputError("--auto-steps", "applies to --method auto with --calib only (reused --ranges keep "
                                         "the steps they were refined with)")
    options = QuantizeOptions(method, percentile, per_channel, symmetric_activations, limit, equalize,
                              AutoOptions(iters=auto_steps, clip=max_clip), coverage, budget)
    with model_named(model):  # no memory for a calibration session or forward: named as the model given
        result = run_quantize(model, output, calib, ranges, options, progress=progress_bar, warn=warn)
    summary = result.summary
    click.echo(f"wrote {result.int8_path} ({summary['int8_convs']}/{summary['convs']} convs with int8 weights; "
               f"{summary['images_used']} images + {summary['coverage_images']} coverage, method {summary['method']}, "
               f"peak RSS {summary['peak_rss_mb']} MB, {summary['seconds']} s)")
    if "budget" in summary:
        budget = summary["budget"]
        click.echo(f"budget {budget['max_drop_db']} dB: {budget['tensors_out_of_int8']} tensors out of int8"
                   f"{' and the weights (the fp32 model)' if budget['fp32'] else ''}; val drop {budget['val_drop_db']} "
                   f"dB (worst image {budget['val_worst_drop_db']}); per 1080p frame {budget['latency_1080p_s']} s "
                   f"(int8 {budget['int8_latency_1080p_s']}, fp32 {budget['fp32_latency_1080p_s']}, this CPU; the CPU "
                   f"runtimes run tensors out of int8, 16-bit ones too, in float: not an accelerator's latency)")
    click.echo(f"wrote {result.ranges_path}")
    click.echo(f"wrote {result.card_path}")
    if as_json:
        emit_json(summary)


def ray_options(command):
    """``--ray`` and its settings, handed to the command as one ``ray`` argument (RayOptions or None)."""

    @click.option("--ray", "use_ray", is_flag=True,
                  help="Run the work on a Ray cluster: the one named by --ray-address or RAY_ADDRESS, else a local "
                       "Ray on this machine's cores (needs `pip install 'dipnet-deploy[ray]'`; inputs must be on a "
                       "filesystem every node mounts at the same path; see docs/scale-out.md).")
    @click.option("--ray-address", metavar="ADDRESS",
                  help="Ray cluster to join (host:port that `ray start --head` printed, or 'auto'). Implies --ray.")
    @click.option("--ray-workers", type=click.IntRange(1),
                  help="Worker actors, each holding its own model session(s). Default: the cluster's CPUs divided by "
                       "--ray-cpus-per-worker.")
    @click.option("--ray-cpus-per-worker", type=click.IntRange(1), default=1, show_default=True,
                  help="CPUs Ray reserves for each worker, and its runtime's threads.")
    @functools.wraps(command)
    def wrapper(*args, use_ray, ray_address, ray_workers, ray_cpus_per_worker, **kwargs):
        from dipnet_deploy.cluster import RayOptions

        if (ray_workers is not None or ray_cpus_per_worker != 1) and not (use_ray or ray_address):
            raise click.UsageError("--ray-workers and --ray-cpus-per-worker need --ray")
        ray = RayOptions(ray_address, ray_workers, ray_cpus_per_worker) if use_ray or ray_address else None
        return command(*args, ray=ray, **kwargs)

    return wrapper


@main.command()
@click.argument("report_dir", type=click.Path(path_type=Path), default=Path("report"), required=False)
@click.option("--fp32", "fp32_path", type=click.Path(path_type=Path, dir_okay=False),
              default=DEFAULT_FP32, show_default=True, help="fp32 ONNX from `export`.")
@click.option("--int8", "int8_path", type=click.Path(path_type=Path, dir_okay=False),
              help="int8 ONNX from `quantize`. Default: the fp32 path with .int8.onnx when that file exists; "
                   "without one, only fp32 and bicubic are measured.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Directory of HR images (gray, RGBA, 16-bit are converted to 8-bit RGB, with a note).")
@click.option("--protocol", type=PROTOCOLS, default="sr", show_default=True,
              help="sr: BasicSR convention (MATLAB bicubic LR, Y/RGB, crop = scale, tiles); "
                   "seed: the vendor's (bilinear resize to the model input, RGB, no crop).")
@click.option("--limit", type=click.IntRange(1), help="Only the first N images (sorted by path).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Parallel processes, each with its own onnxruntime sessions, cores / N threads and 1/N of the memory "
                   "budget (--max-memory-mb) for its images.")
@click.option("--repeats", type=click.IntRange(1, 10_000), default=5, show_default=True,
              help="Timed forwards per model for the latency (median).")
@runtime_option
@click.option("--diagnose", is_flag=True,
              help="Also diagnose where int8 loses: per quantized activation, its SQNR and the PSNR-Y regained "
                   "with only that tensor in float (one more pass over the data per tensor; metrics.json "
                   "int8_diagnosis, a Diagnosis section in the report).")
@ray_options
@json_option
@user_errors
def compare(report_dir, fp32_path, int8_path, data, protocol, limit, workers, repeats, runtime, diagnose, ray,
            as_json):
    """Measure what int8 costs: PSNR/SSIM of fp32, int8 and bicubic against HR, and latency.

    Writes REPORT_DIR (default: report/) with metrics.json, report.md and a self-contained
    index.html (summary, per-image chart, crops of the image with the largest int8 drop,
    error heatmap).
    """

    from dipnet_deploy.compare import CompareOptions, default_int8_for
    from dipnet_deploy.compare import compare as run_compare
    from dipnet_deploy.report import check_report_dir, write_report

    if not data.is_dir():
        raise InputError(data, "not a directory")
    int8_path = int8_path or default_int8_for(fp32_path)
    check_report_dir(report_dir, [("--fp32", fp32_path)] + ([("--int8", int8_path)] if int8_path else []))
    if ray is not None and workers > 1:
        raise click.UsageError("--workers sets local processes; with --ray, use --ray-workers")
    options = CompareOptions(protocol, limit, workers, repeats, runtime, diagnose, ray)
    comparison = run_compare(fp32_path, int8_path, data, options,
                             progress=progress_bar, warn=warn)
    document = write_report(comparison, report_dir)
    mean = document["mean"]
    for name in ("bicubic", "fp32", "int8"):
        if name in mean["psnr_y"]:
            click.echo(f"{name:>8}: PSNR-Y {mean['psnr_y'][name]:.2f} dB  SSIM-Y {mean['ssim_y'][name]:.4f}  "
                       f"PSNR-RGB {mean['psnr_rgb'][name]:.2f} dB")
    if "drop_psnr_y" in document:
        drop = document["drop_psnr_y"]
        click.echo(f"int8 drop: PSNR-Y mean {drop['mean']:.3f} dB, worst image {drop['worst']:.3f} dB "
                   f"({one_line(Path(drop['worst_image']).name)})")
    latency = document["latency"]
    if "speedup_int8" in latency:
        click.echo(f"latency per 1080p frame: fp32 {latency['fp32']['per_1080p_frame_s']:.3f} s, "
                   f"int8 {latency['int8']['per_1080p_frame_s']:.3f} s ({latency['speedup_int8']:.2f}x)")
    click.echo(f"wrote {report_dir}/index.html, report.md, metrics.json")
    if as_json:
        summary = {"report": str(report_dir), "protocol": protocol, "scale": document["scale"],
                   "images": document["count"], "skipped": len(document["skipped"]),
                   "execution": document["execution"]["backend"],
                   **{f"{k}_{n}": round(v, 4) for k in ("psnr_y", "ssim_y") for n, v in mean[k].items()}}
        if "drop_psnr_y" in document:
            drop = document["drop_psnr_y"]
            summary |= {"drop_psnr_y_mean": round(drop["mean"], 4), "drop_psnr_y_worst": round(drop["worst"], 4),
                        "worst_image": drop["worst_image"]}
        if "speedup_int8" in latency:
            summary |= {"latency_fp32_s": round(latency["fp32"]["per_1080p_frame_s"], 4),
                        "latency_int8_s": round(latency["int8"]["per_1080p_frame_s"], 4),
                        "speedup_int8": round(latency["speedup_int8"], 3)}
        if "int8_diagnosis" in document:
            top = document["int8_diagnosis"][0]
            summary |= {"diagnosed_tensors": len(document["int8_diagnosis"]), "costliest_tensor": top["tensor"],
                        "costliest_gain_db": round(top["psnr_y_gain_db"], 4)}
        emit_json(summary)


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path, dir_okay=False),
              default=DEFAULT_INT8, show_default=True,
              help="Fixed-shape SR ONNX (int8 from `quantize` or fp32 from `export`).")
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write into (created; must not be inside an input folder).")
@runtime_option
@click.option("--threads", type=click.IntRange(1), help="CPU threads of one forward (default: all cores).")
@click.option("--codec", help="Video encoder (an FFmpeg encoder name: libx264, libx265, libvpx-vp9, libsvtav1...). "
                              "Default: libx264 (H.264), libvpx-vp9 for .webm.")
@click.option("--crf", type=click.IntRange(0, 63), default=18, show_default=True,
              help="Video quality: the encoder's constant rate factor (lower is better and larger).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist (default: skip them with a warning).")
@ray_options
@json_option
@user_errors
def upscale(inputs, model, output, runtime, threads, codec, crf, overwrite, ray, as_json):
    """Upscale images and videos (files or folders) with the deployed model.

    INPUT: image files (png, jpg, bmp, tif, webp), videos (mp4, mkv, mov, webm, avi) and folders
    (recursive; their tree is mirrored under --output). Images of any size go through exact tiles
    with a halo (as in `compare`) and are written as PNG (gray becomes RGB, alpha is dropped,
    16-bit becomes 8-bit, each with a note). Videos keep their container, frame rate, timestamps
    and audio (copied); every frame is upscaled and re-encoded (H.264 by default, --codec/--crf).
    Inputs that cannot be read are skipped with a warning.
    """

    from dipnet_deploy.upscale import UpscaleOptions
    from dipnet_deploy.upscale import upscale as run_upscale

    result = run_upscale(list(inputs), model, output, UpscaleOptions(runtime, threads, codec, crf, overwrite, ray),
                         progress=progress_bar, warn=warn)
    summary = result.summary(output, runtime)
    click.echo(f"wrote {summary['files']} file(s) to {output} ({summary['images']} image(s), {summary['videos']} "
               f"video(s), {summary['frames']} frames, {summary['frames_per_s']} frames/s; {summary['skipped']} skipped)")
    if as_json:
        emit_json(summary)


@main.command()
@click.option("--fp32", "fp32_path", type=click.Path(path_type=Path, dir_okay=False),
              default=DEFAULT_FP32, show_default=True, help="fp32 ONNX from `export`.")
@click.option("--int8", "int8_path", type=click.Path(path_type=Path, dir_okay=False),
              help="int8 ONNX from `quantize`. Default: the fp32 path with .int8.onnx.")
@click.option("--runtime", "runtimes", type=click.Choice(RUNTIMES), multiple=True,
              help=RUNTIME_HELP + " Repeat to measure several side by side (all interleaved); "
                                  "ratios are to the first one's fp32. Default: onnxruntime.")
@click.option("--repeats", type=click.IntRange(1, 10_000), default=5, show_default=True,
              help="Timed forwards per model (median), and forwards per stream for the throughput.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads of one forward for the latency (default: all cores).")
@click.option("--streams", type=click.IntRange(0),
              help="Parallel streams for the throughput, each with cores / N threads (default: one per core; "
                   "0 skips the throughput).")
@json_option
@user_errors
def bench(fp32_path, int8_path, runtimes, repeats, threads, streams, as_json):
    """Latency of fp32 and int8 per 1080p-equivalent frame, int8 speed-up, and throughput.

    fp32 and int8 (of every runtime given) run interleaved, one forward each per round, so the
    host's load hits them alike; times are medians scaled to a 1920x1080 frame. Throughput runs
    N streams at once and counts 1080p-equivalent frames per second.
    """
    from dipnet_deploy.bench import BenchOptions
    from dipnet_deploy.bench import bench as run_bench
    int8_path = int8_path or default_int8_path(fp32_path)
    summary = run_bench(fp32_path, int8_path, BenchOptions(runtimes or ("onnxruntime",), repeats, threads, streams),
                        progress=progress_bar)
    click.echo(f"{'runtime':<12} {'fp32 s/frame':>12} {'int8 s/frame':>12} {'speed-up':>9} "
               f"{'int8 / ' + summary['reference']:>24} {'fp32 fps':>9} {'int8 fps':>9}")
    for name, entry in summary["runtimes"].items():
        fps = [f"{entry[k]:>9.3f}" if k in entry else f"{'-':>9}" for k in ("fp32_fps", "int8_fps")]
        click.echo(f"{name:<12} {entry['fp32_s']:>12.3f} {entry['int8_s']:>12.3f} {entry['speedup']:>8.2f}x "
                   f"{entry['int8_vs_reference_fp32']:>23.3f}x {fps[0]} {fps[1]}")
    click.echo(f"(1080p-equivalent frames, {summary['input_shape'][2]}x{summary['input_shape'][3]} model input, "
               f"median of {repeats}, {summary['threads']} threads; throughput with {summary['streams']} stream(s))")
    if summary["int8_exact_slow_path"]:
        click.echo(f"{summary['cpu']} has no VNNI: onnxruntime sums int8 on its exact, slower path here (README: "
                   "Runtimes)")
    if as_json:
        emit_json(summary)
