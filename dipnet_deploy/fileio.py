"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dipnet_deploy.errors import InputError


def ensure_parent(path: str | Path) -> Path:
    """Create the parent directory of ``path``; refuse paths that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(path, f"cannot create the output directory ({error.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise InputError(path, "output directory is not writable")
    return path


def refuse_unwritable(path: str | Path, folder: bool = False) -> None:
    """Refuse, before any work and without creating anything, an output that cannot be written.

    ``path`` is a file to write (``folder=False``: an existing folder there is refused) or a folder
    to write into; its nearest existing ancestor (itself, for a folder) must be a writable folder.
    """
    path = Path(path)
    if not folder and path.is_dir():
        raise InputError(path, "is a directory, expected a file path")
    start = path if folder else path.parent
    existing = next((p for p in (start, *start.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise InputError(path, f"cannot create the output ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot write the output ({existing} is not writable)")


def temp_beside(path: str | Path) -> Path:
    """A new, empty temporary file beside ``path`` (hidden, unique: never an existing file), for a
    writer that renames it over ``path`` when complete; the parent folder is created."""
    path = ensure_parent(path)
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise InputError(path, f"cannot write ({error.strerror})") from None
    os.close(handle)
    temp = Path(temp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    return temp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    temp = temp_beside(path)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths``; renamed over them only when the block succeeds.

    The files of one run appear together or not at all: an error or an interrupt inside the block
    leaves every target as it was. The renames run last to first.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def finite_or_null(value):
    """``value`` with every NaN or infinite float (nested in dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def json_text(payload: dict, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity, which most parsers refuse: they become null), keys in insertion order."""
    return json.dumps(finite_or_null(payload), indent=indent, sort_keys=False, allow_nan=False, default=str)


def json_bytes(payload: dict) -> bytes:
    """The project's JSON file layout: strict JSON, indented, a final newline."""
    return (json_text(payload) + "\n").encode()


def write_json_atomic(path: str | Path, payload: dict) -> None:
    write_bytes_atomic(path, json_bytes(payload))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
