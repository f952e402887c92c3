"""Stage 1: checkpoint -> folded (deploy-form) DIPNet.

Accepts raw state dicts, BasicSR checkpoints (``params_ema`` preferred over ``params``),
``module.`` prefixes, deploy or training form. The variant is inferred from keys and shapes;
a preset and explicit overrides take precedence, and the file must then fit them exactly.

Size limits: ``torch.load`` reads a file only when ``checkpoint_archive.check_archive`` passes it;
the weights it holds may then take at most ``MAX_CHECKPOINT_BYTES`` (views of one storage count
as often as they occur). Weights are dense real floating-point tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.archs.dipnet_train_arch import REP_CONVS, build_train_model, fold_state_dict, is_training_form
from dipnet_deploy.checkpoint_archive import MAX_CHECKPOINT_BYTES, load_archive
from dipnet_deploy.config import PRESETS, DIPNetConfig, refuse_beyond_memory, refuse_too_wide
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import sha256_file

BASICSR_KEYS = ("params_ema", "params", "state_dict", "model")


@dataclass
class LoadedCheckpoint:
    path: Path
    model: DIPNet  # deploy form, eval mode
    config: DIPNetConfig
    training_form: bool
    source: str  # which entry of the file held the weights
    sha256: str
    fold_max_abs_diff: float | None = None  # filled by verify_fold when training form
    learned_ranges: dict[str, tuple[float, float]] | None = None  # from `finetune`: point name -> (low, high)


def load_file(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` of a checkpoint file within the size limits (``load_archive``),
    with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        data = load_archive(path)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    except InputError:
        raise
    except Exception as error:  # torch.load raises many types on foreign or damaged files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(path, f"not a PyTorch checkpoint ({first_line[:160]})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"not a state dict (holds a {type(data).__name__})")
    return data


def read_learned_ranges(path: Path, data: dict, source: str) -> dict[str, tuple[float, float]] | None:
    """The activation ranges ``finetune`` learned with the weights in ``source``, checked; else None.

    ``quantization.ranges`` belongs to ``params_ema``, ``quantization.ranges_params`` to ``params``.
    """
    entry = data.get("quantization")
    if entry is None:
        return None
    key = "ranges_params" if source == "params" else "ranges"
    ranges = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(ranges, dict) or not ranges:
        raise InputError(path, f"its quantization entry has no {key} (a damaged finetune checkpoint?)")
    checked = {}
    for name, bounds in ranges.items():
        try:
            low, high = (float(v) for v in bounds)
        except (TypeError, ValueError):
            raise InputError(path, f"learned range of {name} is not two numbers") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InputError(path, f"learned range of {name} is [{low}, {high}] (must be finite, min < max)")
        checked[str(name)] = (low, high)
    return checked


def read_state_dict(path: str | Path, data: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a checkpoint file (or of its loaded ``data``), and the entry they came from."""
    path = Path(path)
    data = load_file(path) if data is None else data
    source = "state_dict"
    for key in BASICSR_KEYS:
        if isinstance(data.get(key), dict):
            data, source = data[key], key
            break
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(path, "holds no tensors (not a DIPNet state dict)")
    size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    if size > MAX_CHECKPOINT_BYTES:  # views of one small storage can declare any size; a model is built from them
        raise InputError(path, f"its tensors declare {size / 2**20:,.0f} MiB, more than a DIPNet checkpoint holds "
                               f"(at most {MAX_CHECKPOINT_BYTES >> 20} MiB)")
    stripped = {re.sub(r"^(module\.)+", "", k): v for k, v in tensors.items()}
    return stripped, source


def _require(path: Path, state_dict: dict, key: str) -> torch.Tensor:
    """The conv weight ``key``: present and 4-D (out, in, kh, kw), or a one-line refusal."""
    if key not in state_dict:
        raise InputError(path, f"missing key {key} (not a DIPNet checkpoint?)")
    if state_dict[key].dim() != 4 or 0 in state_dict[key].shape:
        raise InputError(path, f"{key} has shape {list(state_dict[key].shape)}, expected a 4-D conv weight")
    return state_dict[key]


def check_finite(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or inf (they would only ever produce NaN images)."""
    for key, tensor in state_dict.items():
        if tensor.is_meta or tensor.device.type != "cpu":  # no values to check (or none readable here)
            raise InputError(path, f"{key} is a {tensor.device.type} tensor without values on the CPU")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(path, f"{key} holds NaN or inf values")


def training_expansion(path: Path, state_dict: dict[str, torch.Tensor]) -> int | tuple[int, int, int]:
    """Widths E of the 3x3 branches of c1_r, c2_r, c3_r (read from block 1); one int when they are equal."""
    widths = tuple(_require(path, state_dict, f"block_1.{conv}.weight").shape[0] for conv in REP_CONVS)
    return widths[0] if len(set(widths)) == 1 else widths


def infer_config(state_dict: dict[str, torch.Tensor], path: Path = Path("<state dict>")) -> DIPNetConfig:
    """Derive channels, scale, ESA and training form from keys and shapes."""
    feature = _require(path, state_dict, "conv_1.weight").shape[0]
    training = is_training_form(state_dict)
    mid_key = "block_1.c1_r_11_m.weight" if training else "block_1.c1_r.weight"
    mid = _require(path, state_dict, mid_key).shape[0]
    expansion = training_expansion(path, state_dict) if training else DIPNetConfig.expansion
    out_channels = _require(path, state_dict, "upsampler.0.weight").shape[0]
    upscale = math.isqrt(out_channels // 3)
    if 3 * upscale * upscale != out_channels:
        raise InputError(path, f"upsampler.0.weight has {out_channels} output channels, not 3*r*r")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"block_(\d+)\.", k))}
    esa = "block_1.esa.conv1.weight" in state_dict
    esa_channels = _require(path, state_dict, "block_1.esa.conv1.weight").shape[0] if esa else DIPNetConfig.esa_channels
    return DIPNetConfig(
        feature_channels=feature,
        mid_channels=mid,
        upscale=upscale,
        esa=esa,
        esa_channels=esa_channels,
        num_blocks=max(blocks) if blocks else 0,
        expansion=expansion,
    )


def check_state_dict(path: Path, state_dict: dict, expected: dict) -> None:
    """Refuse the first missing, unexpected or mismatched key, naming both shapes, and weights that are not
    dense real floating point (integers would be cast, complex numbers lose their imaginary parts)."""
    for key, tensor in expected.items():
        if key not in state_dict:
            raise InputError(path, f"missing key {key} (expected shape {list(tensor.shape)})")
        if not isinstance(state_dict[key], torch.Tensor):
            raise InputError(path, f"{key} is a {type(state_dict[key]).__name__}, not a tensor")
        if state_dict[key].layout != torch.strided:
            raise InputError(path, f"{key} is a {state_dict[key].layout} tensor, not a dense one")
        if not state_dict[key].is_floating_point():
            raise InputError(path, f"{key} holds {str(state_dict[key].dtype).removeprefix('torch.')} values, not real "
                                   "floating-point weights")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise InputError(
                path,
                f"shape mismatch for {key}: checkpoint {list(state_dict[key].shape)}, model {list(tensor.shape)}",
            )
    for key, tensor in state_dict.items():
        if key not in expected:
            raise InputError(path, f"unexpected key {key} (shape {list(getattr(tensor, 'shape', []))})")


def resolve_config(state_dict: dict, path: Path, preset: str | None = None, **overrides) -> DIPNetConfig:
    """Preset (if any) else inferred config, then explicit overrides (None = keep)."""
    if preset is not None:
        if preset not in PRESETS:
            raise InputError("--preset", f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        base = PRESETS[preset]
        if is_training_form(state_dict):
            base = base.replace(expansion=training_expansion(path, state_dict))
    else:
        base = infer_config(state_dict, path)
    config = base.replace(**overrides)
    options = [f"--{key.replace('_', '-')}" for key, value in overrides.items() if value is not None]
    refuse_too_wide(config, {key: f"--{key.replace('_', '-')}" if overrides.get(key) is not None else path
                             for key in ("feature_channels", "mid_channels")})
    refuse_beyond_memory(config, "/".join(options) or path)  # before any model of this shape is built
    return config


def load_checkpoint(path: str | Path, preset: str | None = None, **overrides) -> LoadedCheckpoint:
    """Load any accepted checkpoint and return the folded deploy-form model."""
    path = Path(path)
    data = load_file(path)
    state_dict, source = read_state_dict(path, data)
    config = resolve_config(state_dict, path, preset, **overrides)
    training = is_training_form(state_dict)
    with torch.device("meta"):  # shapes only: a model is allocated once the file holds every weight of it
        template = build_train_model(config) if training else DIPNet(config)
    check_state_dict(path, state_dict, template.state_dict())
    check_finite(path, state_dict)
    state_dict = {k: v.float() for k, v in state_dict.items()}
    model = DIPNet(config)
    model.load_state_dict(fold_state_dict(state_dict) if training else state_dict, strict=True)
    loaded = LoadedCheckpoint(path, model.eval(), config, training, source, sha256_file(path),
                              learned_ranges=read_learned_ranges(path, data, source))
    if training:
        template.load_state_dict(state_dict, strict=True, assign=True)
        loaded.fold_max_abs_diff = fold_max_abs_diff(template.eval(), loaded.model)
    return loaded


def fold_max_abs_diff(train_model: torch.nn.Module, deploy_model: torch.nn.Module, size: int = 48) -> float:
    """max |training form - folded| on a fixed random image in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=generator)
    with torch.no_grad():
        return float((train_model(x) - deploy_model(x)).abs().max())
