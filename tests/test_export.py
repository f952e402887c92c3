"""Export: graph contents, ONNX-vs-PyTorch parity, the size facts, determinism, bad input."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dipnet_deploy.archs.dipnet_arch import DIPNet
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.model_stats import onnx_summary, torch_conv_macs

from .conftest import random_train_model


def ort_vs_unfolded(onnx_path, reference, height, width):
    x = np.random.default_rng(5).random((1, 3, height, width), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    return float(np.abs(got - want).max())


def test_x2_graph_is_clean_and_matches_the_unfolded_model(x2_training_checkpoint, tmp_path):
    loaded = load_checkpoint(x2_training_checkpoint)
    result = export(loaded, tmp_path / "x2.onnx", ExportOptions(height=48, width=80))
    graph = onnx.load(str(result.onnx_path))
    ops = {node.op_type for node in graph.graph.node}
    assert ops == {"Conv", "LeakyRelu", "Add", "DepthToSpace"}
    assert sum(node.op_type == "Conv" for node in graph.graph.node) == 19
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 48, 80]
    assert [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim] == [1, 3, 96, 160]
    unfolded = random_train_model(PRESETS["x2"].replace(expansion=40))  # same seed as the fixture
    # computed here, not read from the card (export refuses above 1e-4, so its own figure cannot fail a test)
    assert ort_vs_unfolded(result.onnx_path, unfolded, 48, 80) <= 1e-5  # measured ~2e-7
    card = json.loads(result.card_path.read_text())
    assert card["params"] == 93_664 and card["training_form"]


def test_x4_official_graph_and_parity(official_x4, tmp_path):
    loaded = load_checkpoint(official_x4)
    result = export(loaded, tmp_path / "x4.onnx", ExportOptions(height=64, width=96))
    summary = onnx_summary(onnx.load(str(result.onnx_path)))
    assert set(summary["ops"]) == {"Conv", "LeakyRelu", "Add", "DepthToSpace", "MaxPool", "Resize", "Sigmoid", "Mul"}
    assert summary["params"] == 243_252
    reference = DIPNet(PRESETS["x4-ntire"])
    reference.load_state_dict(torch.load(official_x4, weights_only=True))
    assert ort_vs_unfolded(result.onnx_path, reference.eval(), 64, 96) <= 1e-5  # measured ~2e-7


def test_size_facts_at_1080p():
    model = DIPNet(PRESETS["x2"])
    # Hand count: conv_1 3->32, 12 rep convs (4 x [32->24, 24->24, 24->32]), 4 c5 1x1 32->32, conv_2 32->32,
    # upsampler 32->12, all 3x3 but c5, per LR pixel; the vendor's "431.604 GFlops" is this x 2 / 0.9e9.
    per_pixel = 9 * (3 * 32 + 4 * (32 * 24 + 24 * 24 + 24 * 32) + 32 * 32 + 32 * 12) + 4 * 32 * 32
    assert torch_conv_macs(model, 1080, 1920) == per_pixel * 1080 * 1920 == 194_221_670_400
    assert torch_conv_macs(model, 37, 53) == per_pixel * 37 * 53


def test_cli_export_1080p_json_and_byte_identical(invoke, x2_training_checkpoint, tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    code, out, err = invoke("export", "--checkpoint", x2_training_checkpoint, "-o", first, "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["params"] == 93_664 and summary["macs"] == 194_221_670_400 and summary["gflops"] == 388.4
    assert summary["input_shape"] == [1, 3, 1080, 1920] and summary["output_shape"] == [1, 3, 2160, 3840]
    code, _, err = invoke("export", "--checkpoint", x2_training_checkpoint, "-o", second, "--height", "1080")
    assert code == 0, err
    assert first.read_bytes() == second.read_bytes()
    info_code, info_out, _ = invoke("info", first, "--json")
    info = json.loads(info_out.strip().splitlines()[-1])
    assert info_code == 0 and info["macs"] == 194_221_670_400 and info["params"] == 93_664


def _write(path, payload):
    torch.save(payload, path)
    return path


BAD_EXPORTS = {
    "missing file": lambda d: ["--checkpoint", d / "nope.pth"],
    "text file": lambda d: ["--checkpoint", (d / "notes.pth").write_text("hello") and d / "notes.pth"],
    "truncated": lambda d: ["--checkpoint", (d / "t.pth").write_bytes(
        _write(d / "full.pth", DIPNet(PRESETS["x2"]).state_dict()).read_bytes()[:3000]) and d / "t.pth"],
    "a list": lambda d: ["--checkpoint", _write(d / "list.pth", [torch.zeros(3)])],
    "no tensors": lambda d: ["--checkpoint", _write(d / "empty.pth", {"params": {}, "iter": 3})],
    "missing key": lambda d: ["--checkpoint", _write(d / "miss.pth", {
        k: v for k, v in DIPNet(PRESETS["x2"]).state_dict().items() if k != "conv_2.weight"})],
    "unexpected key": lambda d: ["--checkpoint", _write(d / "extra.pth", {
        **DIPNet(PRESETS["x2"]).state_dict(), "block_1.c9.weight": torch.zeros(2)})],
    "wrong preset": lambda d: ["--checkpoint", _write(d / "x2.pth", DIPNet(PRESETS["x2"]).state_dict()),
                               "--preset", "x4-ntire"],
    "output under a file": lambda d: ["--checkpoint", _write(d / "ok.pth", DIPNet(PRESETS["x2"]).state_dict()),
                                      "-o", (d / "afile").write_text("x") and d / "afile" / "m.onnx"],
    "output is a dir": lambda d: ["--checkpoint", _write(d / "ok2.pth", DIPNet(PRESETS["x2"]).state_dict()),
                                  "-o", d],
    "tiny shape": lambda d: ["--checkpoint", _write(d / "ok3.pth", DIPNet(PRESETS["x2"]).state_dict()),
                             "--height", "4", "-o", d / "tiny.onnx"],
    "unknown preset": lambda d: ["--preset", "x3"],
}

EXPECTED_WORDS = {
    "missing file": "no such", "text file": "not a PyTorch checkpoint", "truncated": "not a PyTorch checkpoint",
    "a list": "not a state dict", "no tensors": "holds no tensors", "missing key": "missing key conv_2.weight",
    "unexpected key": "unexpected key block_1.c9.weight", "wrong preset": "shape mismatch for conv_1.weight",
    "output under a file": "cannot create", "output is a dir": "is a directory", "tiny shape": "too small",
    "unknown preset": "'x3' is not one of",
}


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
def test_bad_export_input_gets_one_line_and_exit_2(case, invoke, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args = BAD_EXPORTS[case](work)
    before = set(work.rglob("*"))
    code, out, err = invoke("export", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and EXPECTED_WORDS[case] in lines[0], err
    assert "Traceback" not in err
    assert not [p for p in set(work.rglob("*")) - before if p.suffix in (".onnx", ".json", ".tmp")]
