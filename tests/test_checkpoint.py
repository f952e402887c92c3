"""Checkpoint loading: layouts, inference of the variant, strict refusal of bad files."""

import pytest
import torch

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.checkpoint import infer_config, load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.errors import InputError

from .conftest import random_train_model


def test_official_x4_loads_strictly_and_is_inferred(official_x4):
    raw = torch.load(official_x4, weights_only=True)
    reference = DIPNet(PRESETS["x4-ntire"])
    reference.load_state_dict(raw, strict=True)
    loaded = load_checkpoint(official_x4)
    assert loaded.config == PRESETS["x4-ntire"]
    assert not loaded.training_form and loaded.source == "state_dict"
    x = torch.rand(1, 3, 40, 44)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference.eval()(x))


def test_basicsr_prefers_params_ema_and_strips_module_prefix(tmp_path):
    config = PRESETS["x2"]
    ema, plain = DIPNet(config), DIPNet(config)
    path = tmp_path / "net_g.pth"
    torch.save({"params": plain.state_dict(),
                "params_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}, path)
    loaded = load_checkpoint(path)
    assert loaded.source == "params_ema"
    assert torch.equal(loaded.model.conv_1.weight, ema.conv_1.weight)


def test_training_form_is_detected_and_folded(x2_training_checkpoint):
    loaded = load_checkpoint(x2_training_checkpoint)
    assert loaded.training_form and loaded.config.expansion == 40
    assert loaded.config.replace(expansion=64) == PRESETS["x2"]
    unfolded = random_train_model(PRESETS["x2"].replace(expansion=40))  # the fixture's weights (same seed)
    x = torch.rand(1, 3, 29, 35, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (loaded.model(x) - unfolded(x)).abs().max().item()
    assert diff <= 1e-6  # computed here, not the loader's own fold_max_abs_diff; measured ~1e-7


def test_infer_config_from_shapes():
    model = random_train_model(PRESETS["x4-ntire"].replace(expansion=50))
    config = infer_config(model.state_dict())
    assert (config.feature_channels, config.mid_channels, config.upscale, config.esa, config.expansion) == \
        (44, 38, 4, True, 50)


def test_mismatched_preset_names_key_and_both_shapes(tmp_path):
    path = tmp_path / "x2.pth"
    torch.save(DIPNet(PRESETS["x2"]).state_dict(), path)
    with pytest.raises(InputError, match=r"conv_1.weight: checkpoint \[32, 3, 3, 3\], model \[44, 3, 3, 3\]"):
        load_checkpoint(path, preset="x4-ntire")


def test_a_meta_tensor_is_refused_in_one_line(tmp_path):
    """A tensor without values (device "meta") has nothing to fold or check: refused, not a traceback."""
    state = random_train_model(PRESETS["x2"]).state_dict()
    state["conv_1.weight"] = state["conv_1.weight"].to("meta")
    path = tmp_path / "meta.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match="conv_1.weight is a meta tensor"):
        load_checkpoint(path)


def test_weights_that_overflow_a_forward_are_refused_by_export(tmp_path):
    """Finite weights of 1e38 give an infinite output: export says so about the checkpoint instead of failing
    its check with 'differs by nan'."""
    from dipnet_deploy.export import ExportOptions, export

    state = random_train_model(PRESETS["x2"]).state_dict()
    state["conv_1.weight"] = torch.full_like(state["conv_1.weight"], 1e38)
    path = tmp_path / "huge.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match="not finite"):
        export(load_checkpoint(path), tmp_path / "m.onnx", ExportOptions(40, 40))
    assert not (tmp_path / "m.onnx").exists()
