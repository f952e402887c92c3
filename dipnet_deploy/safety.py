"""What a run may write: never over one of its inputs, never twice to the same file, never into a foreign folder.

Conventions:
- two paths are the same file when ``os.path.samefile`` says so (hard and symbolic links included)
  or, when either does not exist yet, when their fully resolved paths are equal (a dangling link
  counts as its target);
- an output replaces only an earlier file of ours (``written_by_us``), never one of the user's,
  whether the user named the path or the tool derived it (a model card, the default ranges file);
- "ours" is decided by content a user's file does not carry by accident: a JSON exactly in our
  layout whose ``seal`` is the sha256 of the rest (``fileio.json_bytes``), an ONNX whose sealed card
  records its sha256, a checkpoint whose ``seal`` is the sha256 of its weights, iteration and
  config (``fileio.checkpoint_seal``). A name, a ``tool`` field or a set of keys proves nothing;
- a folder is one of our reports when it holds a sealed ``metrics.json`` of our schema that records
  the sha256 of every other report file (``our_report_files``); data listings skip such folders,
  and ``compare`` replaces a report file only while it still has the recorded content.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dipnet_deploy.checkpoint_archive import load_archive
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import SEAL_KEY, checkpoint_seal, sealed_json, sha256_file

METRICS_SCHEMA_PREFIX = "dipnet-deploy-metrics/"
JSON_BYTES_LIMIT = 1 << 26  # our cards, ranges and metrics are far smaller; a larger JSON is not ours


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (links followed); see the module conventions."""
    return file_identity(a) == file_identity(b)


def file_identity(path: str | Path) -> tuple:
    """What ``same_file`` compares: (device, inode) of an existing file (hard and symbolic links included),
    else where the path would land once resolved (a dangling link counts as its target)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # does not exist (yet), or cannot be a path at all
        try:
            return ("path", str(Path(path).resolve()))
        except RuntimeError:  # a loop of symbolic links: it lands nowhere, and writing there fails in one line
            return ("path", str(Path(path).absolute()))
    return ("file", info.st_dev, info.st_ino)


def refuse_collisions(outputs: Iterable[tuple[str, Path]], inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse the first output that is the same file as an input or as an earlier output.

    ``outputs`` and ``inputs`` are (role, path) pairs; the role names the option or the derived
    file (e.g. ``--output``, ``model card``) so that the one-line error says which is which. Each path
    is looked up once (``file_identity``): linear in the number of files, for folders of thousands.
    """
    by_identity: dict[tuple, tuple[str, Path]] = {}
    for role, path in inputs:
        by_identity.setdefault(file_identity(path), (role, Path(path)))
    seen: dict[tuple, tuple[str, Path]] = {}
    for role, path in outputs:
        path = Path(path)
        identity = file_identity(path)
        if identity in by_identity:
            other_role, other = by_identity[identity]
            raise InputError(path, f"{role} is the same file as {other_role} {other}; refusing to overwrite an input")
        if identity in seen:
            raise InputError(path, f"{role} and {seen[identity][0]} are the same file; give them different names")
        seen[identity] = (role, path)


def our_report_files(directory: str | Path) -> dict[str, str] | None:
    """The report files (name -> sha256) that the sealed ``metrics.json`` in ``directory`` records, or None
    when there is no such ``metrics.json`` of ours."""
    document = our_json(Path(directory) / "metrics.json")
    if document is None or not str(document.get("schema", "")).startswith(METRICS_SCHEMA_PREFIX):
        return None
    files = document.get("files")
    if not isinstance(files, dict) or not all(isinstance(name, str) and "/" not in name and name not in ("", ".", "..")
                                              and isinstance(digest, str) and len(digest) == 64
                                              for name, digest in files.items()):
        return None
    return files


def holds_our_report(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``metrics.json`` written by ``compare`` (``our_report_files``)."""
    return our_report_files(directory) is not None


def written_by_us(path: str | Path) -> bool:
    """Whether the existing file ``path`` is one dipnet-deploy wrote: a JSON of ours (a model card,
    a ranges file: its ``tool`` names dipnet-deploy), an ONNX whose card beside it records its
    sha256, or a ``train``/``finetune`` checkpoint."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        card = our_json(path.with_suffix(".json"))
        return card is not None and card.get("onnx_sha256") == _sha256(path)
    if path.suffix.lower() in (".pth", ".pt"):
        return _our_checkpoint(path)
    return our_json(path) is not None


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


def our_json(path: Path) -> dict | None:
    """The JSON object in the regular file ``path`` if we wrote it (sealed, ``fileio.sealed_json``), else None.
    Our JSON files are small: a larger file is not read, nor a link or anything but a regular file."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > JSON_BYTES_LIMIT:
            return None
        with open(path, "rb") as handle:
            data = handle.read(JSON_BYTES_LIMIT + 1)
    except OSError:
        return None
    document = sealed_json(data)
    return document if document is not None and str(document.get("tool", "")).startswith("dipnet-deploy") else None


def _sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _our_checkpoint(path: Path) -> bool:
    try:
        if path.is_symlink() or not path.is_file():
            return False
        data = load_archive(path)  # bounded before torch.load: an output path may hold a crafted file
    except Exception:  # a foreign or damaged file: not ours
        return False
    return isinstance(data, dict) and isinstance(data.get(SEAL_KEY), str) and data[SEAL_KEY] == checkpoint_seal(data)
