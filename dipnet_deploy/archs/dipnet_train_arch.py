"""DIPNet training form (three-branch RRFB convs) and its exact fold into the deploy form.

Each of c1_r, c2_r, c3_r is, before its activation, the sum of three bias-free branches:
``cK_r`` 3x3 (in -> E) then ``cK_r_11_m`` 1x1 (E -> out); a parallel ``cK_r_11_a`` 1x1
(in -> out); and the identity, where output channel i adds input channel ``i mod in``.
All three are linear and bias-free, so they fold into one 3x3 exactly (zero padding of the
3x3 commutes with the following 1x1).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from dipnet_deploy.archs.dipnet_arch import ESA, LEAKY_SLOPE, DIPNet
from dipnet_deploy.config import DIPNetConfig

REP_CONVS = ("c1_r", "c2_r", "c3_r")
_REP_KEY = re.compile(r"^(?P<prefix>.*\.)?(?P<conv>c[123]_r)\.weight$")


def identity_kernel(out_channels: int, in_channels: int, dtype=torch.float32) -> torch.Tensor:
    """3x3 kernel of the identity branch: output i copies input i mod in (centre tap)."""
    kernel = torch.zeros(out_channels, in_channels, 3, 3, dtype=dtype)
    rows = torch.arange(out_channels)
    kernel[rows, rows % in_channels, 1, 1] = 1.0
    return kernel


def fold_rep_conv(conv3x3: torch.Tensor, conv_11_m: torch.Tensor, conv_11_a: torch.Tensor) -> torch.Tensor:
    """Fold the three branches into one bias-free 3x3 weight [out, in, 3, 3].

    conv3x3: [E, in, 3, 3]; conv_11_m: [out, E, 1, 1]; conv_11_a: [out, in, 1, 1].
    Computed in float64 so the fold adds no rounding beyond the final cast.
    """
    dtype = conv3x3.dtype
    w3, wm, wa = (t.detach().to(torch.float64) for t in (conv3x3, conv_11_m, conv_11_a))
    out_channels, in_channels = wa.shape[:2]
    folded = torch.einsum("oe,eihw->oihw", wm[:, :, 0, 0], w3)
    folded[:, :, 1, 1] += wa[:, :, 0, 0]
    folded += identity_kernel(out_channels, in_channels, torch.float64)
    return folded.to(dtype)


def is_training_form(state_dict: dict) -> bool:
    return any(key.endswith("_r_11_m.weight") for key in state_dict)


def fold_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training-form state dict -> deploy-form state dict (other keys pass through)."""
    folded: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if "_r_11_m." in key or "_r_11_a." in key:
            continue
        match = _REP_KEY.match(key)
        if match and key.replace(".weight", "_11_m.weight") in state_dict:
            stem = key[: -len(".weight")]
            value = fold_rep_conv(value, state_dict[f"{stem}_11_m.weight"], state_dict[f"{stem}_11_a.weight"])
        folded[key] = value
    return folded


def three_branch_conv(x: torch.Tensor, conv3x3: nn.Conv2d, conv_11_m: nn.Conv2d, conv_11_a: nn.Conv2d) -> torch.Tensor:
    """Training-time forward of one rep conv: 3x3->1x1, parallel 1x1, identity (i mod in)."""
    in_channels, out_channels = x.shape[1], conv_11_m.out_channels
    repeats = -(-out_channels // in_channels)
    identity = x.repeat(1, repeats, 1, 1)[:, :out_channels]
    return conv_11_m(conv3x3(x)) + conv_11_a(x) + identity


class TrainRRFB(nn.Module):
    """RRFB with the three-branch convs, keys named as in the DIPNet authors' training code."""

    def __init__(self, config: DIPNetConfig):
        super().__init__()
        feat, mid = config.feature_channels, config.mid_channels
        convs = (("c1_r", feat, mid), ("c2_r", mid, mid), ("c3_r", mid, feat))
        for (name, cin, cout), width in zip(convs, config.expansion_widths()):
            self.add_module(name, nn.Conv2d(cin, width, 3, padding=1, bias=False))
            self.add_module(f"{name}_11_m", nn.Conv2d(width, cout, 1, bias=False))
            self.add_module(f"{name}_11_a", nn.Conv2d(cin, cout, 1, bias=False))
        self.c5 = nn.Conv2d(feat, feat, 1, bias=False)
        self.esa = ESA(feat, config.esa_channels) if config.esa else None

    def rep(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return three_branch_conv(x, getattr(self, name), getattr(self, f"{name}_11_m"), getattr(self, f"{name}_11_a"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in REP_CONVS:
            out = F.leaky_relu(self.rep(name, out), LEAKY_SLOPE)
        out = self.c5(out + x)
        return self.esa(out) if self.esa is not None else out


def build_train_model(config: DIPNetConfig) -> DIPNet:
    return DIPNet(config, block=TrainRRFB)


def fold_model(train_model: DIPNet) -> DIPNet:
    """Training-form DIPNet -> deploy-form DIPNet with identical outputs."""
    deploy = DIPNet(train_model.config)
    deploy.load_state_dict(fold_state_dict(train_model.state_dict()), strict=True)
    return deploy.eval()
