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
    assert diff <= 1e-5


def test_fold_rep_conv_matches_explicit_branches_in_not_equal_out():
    in_ch, out_ch, width = 3, 7, 5  # out > in: identity maps output i to input i mod 3
    g = torch.Generator().manual_seed(0)
    w3, wm, wa = torch.randn(width, in_ch, 3, 3, generator=g), torch.randn(out_ch, width, 1, 1, generator=g), \
        torch.randn(out_ch, in_ch, 1, 1, generator=g)
    x = torch.randn(1, in_ch, 9, 11, generator=g, dtype=torch.float64)
    branches = F.conv2d(F.conv2d(x, w3.double(), padding=1), wm.double()) + F.conv2d(x, wa.double())
    identity = torch.stack([x[0, i % in_ch] for i in range(out_ch)])[None]
    folded = F.conv2d(x, fold_rep_conv(w3, wm, wa).double(), padding=1)
    assert torch.allclose(folded, branches + identity, atol=1e-5)


def test_fold_state_dict_keys_are_the_deploy_keys():
    train_model = random_train_model(PRESETS["x2"].replace(expansion=48))
    folded = fold_state_dict(train_model.state_dict())
    assert set(folded) == set(DIPNet(PRESETS["x2"]).state_dict())
    assert folded["block_1.c1_r.weight"].shape == (24, 32, 3, 3)
    assert folded["block_1.c3_r.weight"].shape == (32, 24, 3, 3)


def test_preset_param_counts():
    assert count_params(DIPNet(PRESETS["x2"])) == 93_664
    assert count_params(DIPNet(PRESETS["x4-ntire"])) == 243_252
