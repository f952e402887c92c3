"""The CLI only parses: its choices are the stage modules' own, and it starts without the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import click

from dipnet_deploy import cli, compare, finetune, quantize, train


def test_choices_are_the_stage_modules_own():
    parameters = {(command.name, option.name): option.type for command in cli.main.commands.values()
                  for option in command.params}
    assert parameters[("quantize", "method")].choices == quantize.METHODS
    assert parameters[("compare", "protocol")].choices == compare.PROTOCOLS
    assert parameters[("train", "loss")].choices == tuple(train.LOSSES)
    assert parameters[("finetune", "loss")].choices == tuple(train.LOSSES)
    assert parameters[("finetune", "target")].choices == finetune.TARGETS
    assert all(isinstance(kind, click.Choice) for kind in parameters.values() if hasattr(kind, "choices"))


def test_cli_starts_without_torch_or_onnxruntime():
    code = "import sys, dipnet_deploy.cli; print(sorted({'torch', 'onnxruntime', 'onnx'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
