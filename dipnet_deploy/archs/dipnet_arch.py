"""DIPNet in deploy form, with the upstream state-dict keys.

Keys match xiumu00/DIPNet so its checkpoints load with strict matching:
``conv_1``, ``block_N.{c1_r,c2_r,c3_r,c5}``, ``block_N.esa.{conv1,conv_f,conv2,conv3,conv4}``,
``conv_2``, ``upsampler.0`` (+ PixelShuffle). Input and output are RGB in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dipnet_deploy.config import DIPNetConfig

LEAKY_SLOPE = 0.05


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ESA(nn.Module):
    """Enhanced Spatial Attention (RFDN/RLFN), the only biased convs of DIPNet."""

    def __init__(self, channels: int, esa_channels: int):
        super().__init__()
        f = esa_channels
        self.conv1 = nn.Conv2d(channels, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)
        pooled = F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3)
        context = F.interpolate(self.conv3(pooled), size=x.shape[2:], mode="bilinear", align_corners=False)
        mask = torch.sigmoid(self.conv4(context + self.conv_f(reduced)))
        return x * mask


class RRFB(nn.Module):
    """Reparameterized residual feature block in deploy form (one 3x3 per stage)."""

    def __init__(self, config: DIPNetConfig):
        super().__init__()
        feat, mid = config.feature_channels, config.mid_channels
        self.c1_r = conv3x3(feat, mid)
        self.c2_r = conv3x3(mid, mid)
        self.c3_r = conv3x3(mid, feat)
        self.c5 = nn.Conv2d(feat, feat, 1, bias=False)
        self.esa = ESA(feat, config.esa_channels) if config.esa else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.c1_r(x), LEAKY_SLOPE)
        out = F.leaky_relu(self.c2_r(out), LEAKY_SLOPE)
        out = F.leaky_relu(self.c3_r(out), LEAKY_SLOPE)
        out = self.c5(out + x)
        return self.esa(out) if self.esa is not None else out


class DIPNet(nn.Module):
    """conv_1 -> RRFB x N -> conv_2 + skip -> conv to 3*r*r -> PixelShuffle."""

    def __init__(self, config: DIPNetConfig, block: type[nn.Module] = RRFB):
        super().__init__()
        self.config = config
        feat = config.feature_channels
        self.conv_1 = conv3x3(3, feat)
        for index in range(1, config.num_blocks + 1):
            self.add_module(f"block_{index}", block(config))
        self.conv_2 = conv3x3(feat, feat)
        self.upsampler = nn.Sequential(conv3x3(feat, 3 * config.upscale**2), nn.PixelShuffle(config.upscale))

    def blocks(self) -> list[nn.Module]:
        return [getattr(self, f"block_{i}") for i in range(1, self.config.num_blocks + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv_1(x)
        out = features
        for block in self.blocks():
            out = block(out)
        return self.upsampler(self.conv_2(out) + features)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
