"""What decoding a JPEG holds beyond its pixels, read from the markers before its first scan (no pixel decoded).

libjpeg (OpenCV's JPEG decoder) decodes a JPEG whose image comes in several scans (progressive, or sequential
with the components in scans of their own) through a coefficient buffer of the whole image: one coefficient
(two bytes) per sample of every component, its blocks padded to whole MCUs, zeroed and resident before the
first row comes out; for a 4:2:0 photo that is some 3 bytes a pixel, for 4:4:4 some 6. A single-scan
sequential JPEG is decoded a row of blocks at a time and holds none (``coefficient_bytes`` is 0).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOF0..SOF15
PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}  # its multi-scan buffer keeps a 4-byte difference per sample
SCAN = 0xDA
END = 0xD9
NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn: markers without a segment


def _segments(handle) -> tuple[int, bytes] | None:
    """The next (marker, segment) of the marker stream ``handle`` is at; None at its end or where it breaks."""
    byte = handle.read(1)
    while byte and byte != b"\xff":  # bytes between segments: libjpeg skips them too
        byte = handle.read(1)
    while byte == b"\xff":  # fill bytes
        byte = handle.read(1)
    if not byte:
        return None
    marker = byte[0]
    if marker in NO_LENGTH or marker == END:
        return marker, b""
    size = handle.read(2)
    if len(size) < 2 or struct.unpack(">H", size)[0] < 2:
        return None
    length = struct.unpack(">H", size)[0] - 2
    if marker in FRAME_MARKERS or marker == SCAN:
        return marker, handle.read(length)
    handle.seek(length, 1)
    return marker, b""


def buffer_bytes(marker: int, frame: bytes) -> int:
    """Bytes of libjpeg's whole-image buffer for the frame header (SOFn segment) ``frame`` of marker ``marker``."""
    if len(frame) < 6:
        return 0
    height, width, count = struct.unpack(">HHB", frame[1:6])
    factors = [(max(1, f >> 4), max(1, f & 15)) for f in frame[7:6 + 3 * count:3]]  # (h, v) of each component
    if not factors:
        return 0
    h_max, v_max = max(h for h, _ in factors), max(v for _, v in factors)
    per_sample = 4 if marker in LOSSLESS else 2
    total = 0
    for h, v in factors:  # blocks of each component, rounded up to its MCU share (libjpeg's virtual arrays)
        across = math.ceil(math.ceil(width * h / (h_max * 8)) / h) * h
        down = math.ceil(math.ceil(height * v / (v_max * 8)) / v) * v
        total += across * down * 64 * per_sample
    return total


def coefficient_bytes(path: Path) -> int:
    """Bytes of the whole-image coefficient buffer decoding the JPEG ``path`` takes (0 for a single-scan
    sequential one). A header that ends or breaks before its first scan counts the buffer (the decoder gives up
    before allocating it, or the estimate errs on the large side)."""
    frame = None
    with open(path, "rb") as handle:
        if handle.read(2) != b"\xff\xd8":
            return 0
        while (segment := _segments(handle)) is not None:
            marker, data = segment
            if marker in FRAME_MARKERS and frame is None:
                frame = (marker, data)
            elif marker == SCAN and frame is not None:
                components = len(frame[1]) >= 6 and frame[1][5]
                if frame[0] not in PROGRESSIVE and data[:1] and data[0] >= components:
                    return 0  # every component in the first scan, and no progression: decoded row by row
                return buffer_bytes(*frame)
            elif marker == END:
                break
    return buffer_bytes(*frame) if frame is not None else 0
