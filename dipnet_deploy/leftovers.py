"""A journal of the temporary files and scratch folders a run makes, so that the next run removes what a
killed run left behind (SIGKILL runs no clean-up), and only that.

Conventions:
- one record per temporary path, a small JSON file in ``journal_dir()``: the path, its device and
  inode, and the process that made it (pid and start time, so a reused pid is not taken for it);
- a record is swept only when its process is gone; its path is removed only while it is still the
  same file (device, inode and kind, no symbolic link): a name alone never makes a file ours, a file
  renamed into place (finished output) is no longer at the temporary path, and a live concurrent
  run's files are never touched;
- the journal lives in ``$DIPNET_STATE_DIR``, else ``$XDG_STATE_HOME/dipnet-deploy``, else
  ``~/.local/state/dipnet-deploy``; where it cannot be written, nothing is recorded (the run works,
  only its leftovers after a kill stay).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path

RECORD_SUFFIX = ".pending.json"
RECORD_BYTES_LIMIT = 1 << 16  # a record is a path and four numbers


def journal_dir() -> Path:
    """Where the records are kept (see the module conventions)."""
    if os.environ.get("DIPNET_STATE_DIR"):
        return Path(os.environ["DIPNET_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dipnet-deploy"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), None if it is gone;
    "" where /proc does not tell (then a live pid is taken as the same process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    return text.rsplit(")", 1)[1].split()[19]  # field 22 (starttime); the name before ")" may hold spaces


_records: dict[str, Path] = {}  # temporary path -> its record, for this process


def record(path: Path) -> None:
    """Record the new temporary file or folder ``path`` of this process; silently nothing if the journal
    cannot be written."""
    try:
        info = path.lstat()
        folder = journal_dir()
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"path": os.fsencode(path.absolute()).hex(), "device": info.st_dev, "inode": info.st_ino,
                 "folder": stat.S_ISDIR(info.st_mode), "pid": os.getpid(), "start": _process_start(os.getpid())}
        target = folder / f"{os.getpid()}-{uuid.uuid4().hex}{RECORD_SUFFIX}"
        target.write_text(json.dumps(entry))
    except OSError:
        return
    _records[str(path)] = target


def forget(path: Path) -> None:
    """Drop the record of ``path`` (it was renamed into place or removed)."""
    target = _records.pop(str(path), None)
    if target is not None:
        with contextlib.suppress(OSError):
            target.unlink()


def _read(record_path: Path) -> dict | None:
    try:
        if record_path.is_symlink() or record_path.stat().st_size > RECORD_BYTES_LIMIT:
            return None
        entry = json.loads(record_path.read_text())
        path = Path(os.fsdecode(bytes.fromhex(entry["path"])))
        return {"path": path, "device": int(entry["device"]), "inode": int(entry["inode"]),
                "folder": bool(entry["folder"]), "pid": int(entry["pid"]),
                "start": None if entry["start"] is None else str(entry["start"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_if_same(entry: dict) -> None:
    path = entry["path"]
    try:
        info = path.lstat()
    except OSError:
        return  # renamed into place, or removed: nothing left
    if (info.st_dev, info.st_ino) != (entry["device"], entry["inode"]) or stat.S_ISLNK(info.st_mode):
        return
    if entry["folder"] and stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    elif not entry["folder"] and stat.S_ISREG(info.st_mode):
        with contextlib.suppress(OSError):
            path.unlink()


def sweep() -> int:
    """Remove what killed runs left (records of processes that are gone); returns how many records were
    settled. Records of live processes, this one included, are left alone."""
    folder = journal_dir()
    try:
        records = [p for p in folder.iterdir() if p.name.endswith(RECORD_SUFFIX)]
    except OSError:
        return 0
    settled = 0
    for record_path in records:
        entry = _read(record_path)
        if entry is None:
            continue  # not a record of ours: leave it
        if entry["pid"] == os.getpid() or _process_start(entry["pid"]) in (entry["start"], ""):
            continue  # its run is still going
        _remove_if_same(entry)
        with contextlib.suppress(OSError):
            record_path.unlink()
        settled += 1
    return settled
