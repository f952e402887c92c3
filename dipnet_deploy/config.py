"""DIPNet variant description and the named presets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from dipnet_deploy.errors import InputError


@dataclass(frozen=True)
class DIPNetConfig:
    """Shape of a DIPNet.

    feature_channels: width of the trunk (conv_1, c5, conv_2).
    mid_channels: width inside each RRFB (output of c1_r and c2_r).
    upscale: super-resolution factor r; the last conv emits 3*r*r channels.
    esa: whether each RRFB ends with Enhanced Spatial Attention.
    esa_channels: width inside ESA.
    num_blocks: number of RRFBs (upstream uses 4).
    expansion: width E of the 3x3 branch of the training form (3x3 to E, then 1x1 to out); one
        int for c1_r, c2_r and c3_r alike, or a (c1_r, c2_r, c3_r) tuple (e.g. E = out channels).
    """

    feature_channels: int = 32
    mid_channels: int = 24
    upscale: int = 2
    esa: bool = False
    esa_channels: int = 16
    num_blocks: int = 4
    expansion: int | tuple[int, int, int] = 64

    def expansion_widths(self) -> tuple[int, int, int]:
        """E of c1_r, c2_r and c3_r."""
        return (self.expansion,) * 3 if isinstance(self.expansion, int) else tuple(self.expansion)

    def approximate_bytes(self, height: int = 0, width: int = 0, images: int = 0, training: bool = False) -> int:
        """A rough upper bound of the float32 bytes this model needs, to refuse absurd sizes before allocating.

        Weights as in the training form (the larger); for ``images`` inputs of height x width, four of the
        widest activations and two outputs, or with ``training`` every conv's activation (kept for backward).
        """
        widest = max(self.feature_channels, self.mid_channels, self.esa_channels, *self.expansion_widths())
        out_channels = 3 * self.upscale**2
        weights = 9 * widest * widest * (3 * self.num_blocks + 2) + 9 * self.feature_channels * out_channels
        live = 3 * 3 * self.num_blocks + 4 if training else 4
        activations = images * height * width * (live * widest + 2 * out_channels)
        return 4 * (weights + activations)

    def replace(self, **changes) -> DIPNetConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DIPNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        if isinstance(fields.get("expansion"), list):  # JSON and checkpoints keep the tuple as a list
            fields["expansion"] = tuple(fields["expansion"])
        return cls(**fields)


# the widest trunk (feature) or block (mid) width accepted, from an option or a checkpoint: 8 times the widest
# published DIPNet (64). The export's peak grows with the square of the width (its weights are copied by the ONNX
# export, onnxsim and onnxruntime in turn), whatever the input size, so this bound also bounds that share.
MAX_CHANNELS = 512


def refuse_too_wide(config: DIPNetConfig, where: dict[str, str | Path]) -> None:
    """Refuse a ``feature_channels`` or ``mid_channels`` over ``MAX_CHANNELS``, naming ``where[field]``."""
    for field in ("feature_channels", "mid_channels"):
        width = getattr(config, field)
        if width > MAX_CHANNELS:
            raise InputError(where[field], f"{width} {field.replace('_', ' ')}: at most {MAX_CHANNELS} are accepted "
                                           "(DIPNets are 32 to 64 wide)")


def refuse_beyond_memory(config: DIPNetConfig, where: str | Path, height: int = 0, width: int = 0, images: int = 0,
                         training: bool = False) -> None:
    """Refuse a model or input size whose ``approximate_bytes`` exceed this machine's physical memory."""
    need = config.approximate_bytes(height, width, images, training)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise InputError(where, f"needs about {need / 2**30:,.0f} GiB of memory, more than this machine's "
                                f"{have / 2**30:,.0f} GiB")


PRESETS: dict[str, DIPNetConfig] = {
    # The deploy target: the vendor zoo's DIPNet x2 (93,664 params).
    "x2": DIPNetConfig(feature_channels=32, mid_channels=24, upscale=2, esa=False),
    # The official NTIRE 2023 ESR model (243,252 params).
    "x4-ntire": DIPNetConfig(feature_channels=44, mid_channels=38, upscale=4, esa=True, esa_channels=16),
}
