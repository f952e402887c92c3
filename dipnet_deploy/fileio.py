"""File output: atomic (a temporary file beside the target, then rename), sealed, and cleaned up after a kill.

Conventions:
- every file is written under a temporary name and renamed over its target when complete;
- a write that fails for lack of room (full disk, quota, file-size limit, read-only or failing
  device: ``WRITE_FAILURES``) is one ``InputError`` naming the target;
- every JSON and checkpoint we write carries a ``seal``: the sha256 of its own content, which a
  file of the user's does not carry by accident (``safety.written_by_us`` checks it);
- every temporary file and scratch folder is recorded in a journal (``leftovers.py``), so that the
  next run removes what a killed run (SIGKILL) left, and only that;
- every folder made for an output (``make_folders``) inside a ``removing_empty_folders`` block (the CLI
  runs each command in one) is removed at the end of the block if it is still empty: a failed or
  interrupted run leaves no empty folders behind, and never removes one it did not make.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dipnet_deploy import leftovers
from dipnet_deploy.errors import InputError, WriteError

# errno values that mean "the output could not be stored", as opposed to a bug or a bad input
WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
SEAL_KEY = "seal"
SEAL_PREFIX = "sha256:"
_JSON_SEAL_SALT = b"dipnet-deploy sealed JSON v1\n"
_CHECKPOINT_SEAL_SALT = b"dipnet-deploy sealed checkpoint v1\n"


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is an OSError of ``WRITE_FAILURES`` (no room, read-only, device failing)."""
    return isinstance(error, OSError) and error.errno in WRITE_FAILURES


@contextlib.contextmanager
def write_failures_named(path: str | Path) -> Iterator[None]:
    """Turn a ``WRITE_FAILURES`` error inside the block into one ``WriteError`` naming ``path``."""
    try:
        yield
    except OSError as error:
        if not is_write_failure(error):
            raise
        raise WriteError(path, f"cannot write ({error.strerror or os.strerror(error.errno)})") from None


def refuse_without_room(folder: str | Path, size: int) -> None:
    """Raise ``WriteError`` if a file of ``size`` bytes cannot be written in ``folder`` (tried, then removed).

    For a library that fails to save a file with an error of its own type (onnxruntime's "serialization
    failed"): the caller asks this whether the cause was the room to write, and says so in one line."""
    with write_failures_named(folder):
        handle, name = tempfile.mkstemp(dir=folder, prefix=".room-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as probe:
                for _ in range(0, size, 1 << 20):
                    probe.write(b"\0" * min(1 << 20, size))
                probe.flush()
                os.fsync(probe.fileno())
        finally:
            os.unlink(name)


_made_folders: list[list[tuple[str, int, int]]] = []  # per open removing_empty_folders block: (path, device, inode)


def make_folders(folder: str | Path) -> None:
    """``folder`` and its missing parents made (``mkdir -p``); each one made here is recorded in the innermost
    ``removing_empty_folders`` block. A folder that exists, or that another process makes meanwhile, is not."""
    folder = Path(folder)
    missing = []
    for candidate in (folder, *folder.parents):
        if os.path.isdir(candidate):
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        try:
            os.mkdir(candidate)
        except FileExistsError:
            if not os.path.isdir(candidate):
                raise
            continue  # another process made it between the look and the mkdir: not ours
        if _made_folders:
            info = os.lstat(candidate)
            _made_folders[-1].append((os.path.abspath(candidate), info.st_dev, info.st_ino))


@contextlib.contextmanager
def removing_empty_folders() -> Iterator[None]:
    """At the end of the block, however it ends, remove every folder ``make_folders`` made in it that is still
    empty, deepest first, and only while it is the very folder made (same device and inode, not a link): an
    output that was never written leaves no folder of ours, and a file put there keeps its folder."""
    _made_folders.append([])
    try:
        yield
    finally:
        for path, device, inode in reversed(_made_folders.pop()):
            with contextlib.suppress(OSError):  # gone, replaced, or not empty: not ours to remove
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) == (device, inode) and stat.S_ISDIR(info.st_mode):
                    os.rmdir(path)  # refuses a folder that is not empty


def ensure_parent(path: str | Path) -> Path:
    """Create the parent directory of ``path`` (``make_folders``); refuse paths that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file path")
    try:
        make_folders(path.parent)
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
    writer that renames it over ``path`` when complete; the parent folder is created. It is recorded
    in the leftovers journal (``leftovers.forget`` once it is renamed or removed)."""
    path = ensure_parent(path)
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise InputError(path, f"cannot write ({error.strerror})") from None
    os.close(handle)
    temp = Path(temp_name)
    leftovers.record(temp)
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
        with write_failures_named(path):
            yield temp
            try:
                os.replace(temp, path)
            except FileNotFoundError:  # the temporary went with it
                raise WriteError(path, "cannot write: its folder was removed or renamed during the run") from None
    finally:
        temp.unlink(missing_ok=True)
        leftovers.forget(temp)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A new private folder in the system's temporary directory, removed after the block (and by the
    next run if this one is killed: it is recorded in the leftovers journal)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    except OSError as error:
        raise InputError(tempfile.gettempdir(), f"cannot make a scratch folder ({error.strerror})") from None
    leftovers.record(folder)
    try:
        with write_failures_named(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        leftovers.forget(folder)


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


def _layout(payload: dict) -> bytes:
    return (json_text(payload) + "\n").encode()


def json_bytes(payload: dict) -> bytes:
    """The project's JSON file layout: strict JSON, indented, a final newline, and last a ``seal`` key
    (``json_seal`` of the rest), so that ``safety`` can tell our files from a user's."""
    payload = {key: value for key, value in payload.items() if key != SEAL_KEY}
    return _layout({**payload, SEAL_KEY: json_seal(payload)})


def json_seal(payload: dict) -> str:
    """``sha256:HEX`` of ``payload`` (without its seal) in the project's JSON layout."""
    return SEAL_PREFIX + hashlib.sha256(_JSON_SEAL_SALT + _layout(payload)).hexdigest()


def sealed_json(data: bytes) -> dict | None:
    """The JSON object in ``data`` if it is exactly what ``json_bytes`` writes (layout and seal), else None."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get(SEAL_KEY), str):
        return None
    rest = {key: value for key, value in document.items() if key != SEAL_KEY}
    try:
        return document if document[SEAL_KEY] == json_seal(rest) and _layout(document) == data else None
    except (ValueError, TypeError, RecursionError):
        return None


def write_json_atomic(path: str | Path, payload: dict) -> None:
    write_bytes_atomic(path, json_bytes(payload))


def checkpoint_seal(payload: dict) -> str:
    """``sha256:HEX`` of a checkpoint's weights (``params``, ``params_ema``: names, dtypes, shapes, bytes),
    ``iter`` and ``config``: what makes a ``train``/``finetune`` checkpoint ours."""
    import torch

    digest = hashlib.sha256(_CHECKPOINT_SEAL_SALT)
    digest.update(json_text({"iter": payload.get("iter"), "config": payload.get("config")}, indent=None).encode())
    for key in ("params", "params_ema"):
        weights = payload.get(key)
        if not isinstance(weights, dict):
            continue
        for name in sorted(weights, key=str):
            tensor = weights[name]
            if not isinstance(tensor, torch.Tensor):
                return ""  # not a state dict: never ours
            digest.update(f"{key}/{name}/{tensor.dtype}/{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return SEAL_PREFIX + digest.hexdigest()


def write_checkpoint(path: str | Path, payload: dict) -> None:
    """``torch.save`` of ``payload`` with its ``seal`` (``checkpoint_seal``), written atomically to ``path``."""
    import torch

    buffer = io.BytesIO()  # serialized in memory, so that a full disk is an OSError of our own write
    torch.save({**payload, SEAL_KEY: checkpoint_seal(payload)}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
