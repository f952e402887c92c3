"""The fold is checked against the unfolded training-form module and an explicit reference."""

import pytest
import torch
import torch.nn.functional as F

from dipnet_deploy.archs.dipnet_arch import DIPNet, count_params
from dipnet_deploy.archs.dipnet_train_arch import fold_model, fold_rep_conv, fold_state_dict
from dipnet_deploy.config import PRESETS, DIPNetConfig

from .conftest import random_train_model


@pytest.mark.parametrize(
    "feat, mid, expansion, esa",
    [
        (32, 24, 64, False),  # the x2 preset, E > out
        (32, 24, 16, False),  # E < out
        (8, 20, 12, False),  # mid > feat: identity wraps (i mod in)
        (12, 5, 7, True),  # ESA, odd widths
        (44, 38, 38, True),  # the NTIRE widths, E == out
    ],
)
def test_fold_equals_unfolded_module(feat, mid, expansion, esa):
    config = DIPNetConfig(feature_channels=feat, mid_channels=mid, expansion=expansion, esa=esa, esa_channels=6)
    train_model = random_train_model(config, seed=feat + mid)
    deploy = fold_model(train_model)
    x = torch.rand(2, 3, 37, 41, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (train_model(x) - deploy(x)).abs().max().item()
    assert diff <= 1e-6  # measured <= 9e-8 (outputs up to ~0.6)


def test_fold_rep_conv_matches_explicit_branches_in_not_equal_out():
    in_ch, out_ch, width = 3, 7, 5  # out > in: identity maps output i to input i mod 3
    g = torch.Generator().manual_seed(0)
    w3, wm, wa = torch.randn(width, in_ch, 3, 3, generator=g), torch.randn(out_ch, width, 1, 1, generator=g), \
        torch.randn(out_ch, in_ch, 1, 1, generator=g)
    x = torch.randn(1, in_ch, 9, 11, generator=g, dtype=torch.float64)
    branches = F.conv2d(F.conv2d(x, w3.double(), padding=1), wm.double()) + F.conv2d(x, wa.double())
    identity = torch.stack([x[0, i % in_ch] for i in range(out_ch)])[None]
    folded = F.conv2d(x, fold_rep_conv(w3.double(), wm.double(), wa.double()), padding=1)  # all float64
    assert (folded - (branches + identity)).abs().max().item() <= 1e-12  # measured 1.2e-14 (values up to ~35)


def test_fold_state_dict_keys_are_the_deploy_keys():
    train_model = random_train_model(PRESETS["x2"].replace(expansion=48))
    folded = fold_state_dict(train_model.state_dict())
    assert set(folded) == set(DIPNet(PRESETS["x2"]).state_dict())
    assert folded["block_1.c1_r.weight"].shape == (24, 32, 3, 3)
    assert folded["block_1.c3_r.weight"].shape == (32, 24, 3, 3)


def test_preset_param_counts():
    assert count_params(DIPNet(PRESETS["x2"])) == 93_664
    assert count_params(DIPNet(PRESETS["x4-ntire"])) == 243_252


def upstream_forward(state: dict, x: torch.Tensor, config: DIPNetConfig) -> torch.Tensor:
    """DIPNet written out with torch.nn.functional from the upstream description (xiumu00/DIPNet, RLFN's ESA):
    LeakyReLU slope 0.05, 3x3 convs padded by 1, RRFB out = c5(c3(c2(c1(x))) + x), ESA gate, long skip."""

    def conv(name, value, padding=1, stride=1):
        return F.conv2d(value, state[f"{name}.weight"], state.get(f"{name}.bias"), stride=stride, padding=padding)

    def esa(prefix, value):
        reduced = conv(f"{prefix}.conv1", value, 0)
        pooled = F.max_pool2d(conv(f"{prefix}.conv2", reduced, 0, stride=2), 7, 3)
        context = F.interpolate(conv(f"{prefix}.conv3", pooled), value.shape[2:], mode="bilinear", align_corners=False)
        return value * torch.sigmoid(conv(f"{prefix}.conv4", context + conv(f"{prefix}.conv_f", reduced, 0), 0))

    features = conv("conv_1", x)
    out = features
    for i in range(1, config.num_blocks + 1):
        block = out
        for stage in ("c1_r", "c2_r", "c3_r"):
            block = F.leaky_relu(conv(f"block_{i}.{stage}", block), 0.05)
        out = conv(f"block_{i}.c5", block + out, 0)
        out = esa(f"block_{i}.esa", out) if config.esa else out
    return F.pixel_shuffle(conv("upsampler.0", conv("conv_2", out) + features), config.upscale)


@pytest.mark.parametrize("config", [PRESETS["x2"], DIPNetConfig(feature_channels=12, mid_channels=5, esa=True,
                                                                  esa_channels=6, upscale=4)])
def test_deploy_model_equals_the_upstream_definition(config):
    deploy = fold_model(random_train_model(config.replace(expansion=8), seed=3))
    x = torch.rand(1, 3, 40, 44, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (deploy(x) - upstream_forward(deploy.state_dict(), x, config)).abs().max().item()
    assert diff <= 1e-6  # the same operations: measured 0
