"""DIPNet variant description and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DIPNetConfig:
    """Shape of a DIPNet.

    feature_channels: width of the trunk (conv_1, c5, conv_2).
    mid_channels: width inside each RRFB (output of c1_r and c2_r).
    upscale: super-resolution factor r; the last conv emits 3*r*r channels.
    esa: whether each RRFB ends with Enhanced Spatial Attention.
    esa_channels: width inside ESA.
    num_blocks: number of RRFBs (upstream uses 4).
    expansion: width E of the 3x3 branch of the training form (3x3 to E, then 1x1 to out).
    """

    feature_channels: int = 32
    mid_channels: int = 24
    upscale: int = 2
    esa: bool = False
    esa_channels: int = 16
    num_blocks: int = 4
    expansion: int = 64

    def replace(self, **changes) -> DIPNetConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DIPNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


PRESETS: dict[str, DIPNetConfig] = {
    # The deploy target: the vendor zoo's DIPNet x2 (93,664 params).
    "x2": DIPNetConfig(feature_channels=32, mid_channels=24, upscale=2, esa=False),
    # The official NTIRE 2023 ESR model (243,252 params).
    "x4-ntire": DIPNetConfig(feature_channels=44, mid_channels=38, upscale=4, esa=True, esa_channels=16),
}
