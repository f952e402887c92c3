"""What a run may write: never over one of its inputs, never twice to the same file, never into a foreign folder.

Conventions:
- two paths are the same file when ``os.path.samefile`` says so (hard and symbolic links included)
  or, when either does not exist yet, when their fully resolved paths are equal (a dangling link
  counts as its target);
- an output replaces only an earlier file of ours (``written_by_us``), never one of the user's,
  whether the user named the path or the tool derived it (a model card, the default ranges file);
- a folder is one of our reports when it holds a ``metrics.json`` whose ``schema`` starts with
  ``METRICS_SCHEMA_PREFIX``; data listings skip such folders and ``compare`` only ever replaces
  its own files in them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from dipnet_deploy.errors import InputError

METRICS_SCHEMA_PREFIX = "dipnet-deploy-metrics/"
CHECKPOINT_BYTES_LIMIT = 1 << 30  # our checkpoints are a few MB; a larger file at an output path is not ours


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (links followed); see the module conventions."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would land
        return Path(a).resolve() == Path(b).resolve()


def refuse_collisions(outputs: Iterable[tuple[str, Path]], inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse the first output that is the same file as an input or as an earlier output.

    ``outputs`` and ``inputs`` are (role, path) pairs; the role names the option or the derived
    file (e.g. ``--output``, ``model card``) so that the one-line error says which is which.
    """
    inputs = [(role, Path(path)) for role, path in inputs]
    seen: list[tuple[str, Path]] = []
    for role, path in outputs:
        path = Path(path)
        for other_role, other in inputs:
            if same_file(path, other):
                raise InputError(path, f"{role} is the same file as {other_role} {other}; refusing to overwrite an input")
        for other_role, other in seen:
            if same_file(path, other):
                raise InputError(path, f"{role} and {other_role} are the same file; give them different names")
        seen.append((role, path))


def holds_our_report(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``metrics.json`` written by ``compare``."""
    document = _small_json(Path(directory) / "metrics.json")
    return document is not None and str(document.get("schema", "")).startswith(METRICS_SCHEMA_PREFIX)


def written_by_us(path: str | Path) -> bool:
    """Whether the existing file ``path`` is one dipnet-deploy wrote: a JSON of ours (a model card,
    a ranges file: its ``tool`` names dipnet-deploy), an ONNX whose card beside it records its
    sha256, or a ``train``/``finetune`` checkpoint."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        card = _our_json(path.with_suffix(".json"))
        return card is not None and card.get("onnx_sha256") == _sha256(path)
    if path.suffix.lower() in (".pth", ".pt"):
        return _our_checkpoint(path)
    return _our_json(path) is not None


def refuse_replacing_foreign(outputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse, before any work, an output path that holds a file dipnet-deploy did not write.

    ``outputs``: (role, path) pairs. An earlier run's own file is replaced (re-running a stage works);
    a file of the user's that happens to be there is never touched.
    """
    for role, path in outputs:
        path = Path(path)
        if (path.exists() or path.is_symlink()) and not written_by_us(path):
            raise InputError(path, f"exists and was not written by dipnet-deploy; refusing to replace it with the "
                                   f"{role} (move or delete it first, or choose another path)")


def _small_json(path: Path) -> dict | None:
    """The JSON object in the regular file ``path``, or None; our JSON files are small: never read a huge one."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read(1 << 24))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _our_json(path: Path) -> dict | None:
    document = _small_json(path)
    return document if document is not None and str(document.get("tool", "")).startswith("dipnet-deploy") else None


def _sha256(path: Path) -> str | None:
    from dipnet_deploy.fileio import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def _our_checkpoint(path: Path) -> bool:
    import torch

    try:
        if not path.is_file() or path.stat().st_size > CHECKPOINT_BYTES_LIMIT:
            return False
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or damaged file: not ours
        return False
    return isinstance(data, dict) and {"params", "iter", "config", "schedule"} <= data.keys()
