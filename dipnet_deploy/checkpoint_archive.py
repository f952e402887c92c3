"""What ``torch.load`` may be handed: a checkpoint's size checked from its zip archive's declarations alone,
before anything is unpacked (shared by loading a checkpoint and by telling whether an output is ours).

A checkpoint is PyTorch's zip archive (since PyTorch 1.6; the older pickle format is refused); its zip
directory, its records (as unpacked) and its pickle may declare at most ``MAX_DIRECTORY_BYTES``,
``MAX_CHECKPOINT_BYTES`` and ``MAX_PICKLE_BYTES``.
"""

from __future__ import annotations

import struct
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO

from dipnet_deploy.errors import InputError

# The largest checkpoint written (`train` of x4-ntire: training form, EMA copy and Adam state) is 6 MiB,
# its pickle 28 KiB and zip directory 16 KiB (221 records): each limit is 40 times or more that.
MAX_CHECKPOINT_BYTES = 256 << 20
MAX_PICKLE_BYTES = 4 << 20  # a pickle builds objects dozens of times its size: kept to a few MiB
MAX_DIRECTORY_BYTES = 1 << 20  # zipfile builds an object of some 400 bytes per 46-byte directory entry
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickle of torch's magic number



def load_archive(path: Path):
    """``torch.load(weights_only=True)`` of ``path`` once ``check_archive`` passes it, with torch's warnings
    silenced: rebuilding quantized tensors (qint8...) or old storage types warns in several lines, and such
    weights are then refused in one line (``checkpoint.check_state_dict``), or the file is not ours."""
    import torch

    check_archive(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def check_archive(path: Path) -> None:
    """Refuse, from the zip archive's declarations alone, a file ``torch.load`` must not unpack: not a zip
    (the legacy format is named), a directory, records or pickle over the module's limits."""
    with open(path, "rb") as handle:
        head = handle.read(len(LEGACY_MAGIC))
        if not head.startswith(ZIP_MAGIC):
            raise InputError(path, "saved in PyTorch's legacy format (before 1.6), which is not read: load it and "
                                   "save it again with a current PyTorch" if head == LEGACY_MAGIC else
                                   "not a PyTorch checkpoint (not a zip archive)")
        directory = _zip_directory_bytes(handle)
    if directory is None:
        raise InputError(path, "not a PyTorch checkpoint (a damaged zip archive: no end record)")
    if directory > MAX_DIRECTORY_BYTES:
        raise InputError(path, f"its zip directory takes {directory / 2**20:,.1f} MiB, more than a DIPNet checkpoint "
                               f"needs (at most {MAX_DIRECTORY_BYTES >> 20} MiB)")
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as error:
        raise InputError(path, f"not a PyTorch checkpoint (a damaged zip archive: {error})") from None
    unpacked = sum(record.file_size for record in records)
    pickle = sum(record.file_size for record in records if record.filename.endswith("data.pkl"))
    for size, limit, what in ((unpacked, MAX_CHECKPOINT_BYTES, "its records unpack to"),
                              (pickle, MAX_PICKLE_BYTES, "its pickle takes")):
        if size > limit:
            raise InputError(path, f"{what} {size / 2**20:,.1f} MiB, more than a DIPNet checkpoint needs "
                                   f"(at most {limit >> 20} MiB)")


def _zip_directory_bytes(handle: BinaryIO) -> int | None:
    """The size of the central directory a zip's end record declares (its zip64 form where present), read
    as ``zipfile`` finds it: the last end signature within 64 KiB of comment; None without one."""
    size = handle.seek(0, 2)
    handle.seek(max(0, size - 22 - 0xFFFF))
    tail = handle.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    zip64 = tail[at - 76:at - 20] if at >= 76 and tail[at - 20:at - 16] == b"PK\x06\x07" else b""
    if zip64.startswith(b"PK\x06\x06"):  # zip64 end record, right before its locator: 8-byte fields
        return struct.unpack_from("<Q", zip64, 40)[0]
    return struct.unpack_from("<L", tail, at + 12)[0]
