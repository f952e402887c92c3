"""Reading images for the pipeline, and the seed's pre/post-processing.

Every reader returns 8-bit 3-channel RGB. Gray, gray+alpha, RGBA and 16-bit inputs are
converted explicitly and the conversion is reported, never silently misread.

Size limits: an image is decoded only when its header (read lazily by Pillow) is of one of
``IMAGE_FORMATS`` and declares at most ``max_pixels()`` pixels (``DIPNET_MAX_MEGAPIXELS`` million,
default 100) and its file is no larger than such an image can be (``MAX_BYTES_PER_PIXEL`` per
allowed pixel plus ``HEADER_BYTES``); so a decompression bomb or a huge file named .png costs a
header read, not gigabytes. Then the memory it will take is estimated from the header (``ImageHeader``:
size, format, channels and bit depth as decoded, file size, a JPEG's coefficient buffer; ``decode_bytes``
for the decoding itself) and the image is refused, before decoding, when the estimate is over the budget
(``memory_budget``: ``DIPNET_MAX_MEMORY_MB``): ``check_memory``. A command that knows what an image will
cost it beyond decoding (``upscale``, ``compare``, ``train``) passes ``read_rgb8`` a ``check`` of its own;
without one, decoding it is what is checked.

PNG output is written band by band (``PngWriter``), so an upscaled image is never whole in memory.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from dipnet_deploy.errors import InputError
from dipnet_deploy.jpeg_scans import coefficient_bytes
from dipnet_deploy.memory_budget import (  # noqa: F401  (the budget's names, long read from here)
    DEFAULT_MAX_MEMORY_MB,
    MAX_MEMORY_MB_LIMIT,
    MAX_MEMORY_VARIABLE,
    MIB,
    max_memory_bytes,
    positive_setting,
    refuse_over_budget,
)
from dipnet_deploy.safety import holds_our_report

# OpenCV prints decoder complaints (several lines each) itself; our own one-line warnings say what matters
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP")  # Pillow's names of those (MPO: a camera's JPEG)
MAX_MEGAPIXELS_VARIABLE = "DIPNET_MAX_MEGAPIXELS"
DEFAULT_MAX_MEGAPIXELS = 100.0
MAX_BYTES_PER_PIXEL = 8  # 16-bit RGBA stored raw: the largest pixel we decode
HEADER_BYTES = 16 << 20  # room for metadata, colour profiles and thumbnails


@contextlib.contextmanager
def _pillow_size_check_off() -> Iterator[None]:
    """Pillow's own decompression-bomb check off for one header read, restored after: its fixed limit would
    refuse what a raised DIPNET_MAX_MEGAPIXELS allows; ours (``check_image_size``) runs on the declared size."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def max_pixels() -> int:
    """The decoded-size limit in pixels: ``DIPNET_MAX_MEGAPIXELS`` million (default 100)."""
    return int(positive_setting(MAX_MEGAPIXELS_VARIABLE, DEFAULT_MAX_MEGAPIXELS, "megapixels") * 1e6)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, before any pixel is decoded: its size, its format (Pillow's name),
    the channels and bytes per sample OpenCV's ``IMREAD_UNCHANGED`` decode will give (an upper bound where
    the header leaves it open), the file's size in bytes, and the whole-image coefficient buffer libjpeg
    decodes a multi-scan (progressive) JPEG through (``jpeg_scans``; 0 for anything else)."""

    path: Path
    width: int
    height: int
    format: str
    channels: int
    sample_bytes: int
    file_bytes: int
    coefficient_bytes: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def describe(self) -> str:
        return f"{self.width}x{self.height} ({self.pixels / 1e6:,.1f} megapixels)"


# channels OpenCV decodes for Pillow's mode of a header (palette and gray+alpha: expanded to BGR(A))
_MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "F": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1, "P": 4, "PA": 4,
                  "LA": 4, "La": 4, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4,
                  "CMYK": 4}
_MODE_SAMPLE_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}  # by IHDR colour type (palette: RGB or RGBA with tRNS)


def _decoded_layout(image: Image.Image, path: Path) -> tuple[int, int]:
    """(channels, bytes per sample) of OpenCV's decode of ``image`` (Pillow's lazily opened view of ``path``).

    Pillow reports a 16-bit RGB PNG or TIFF as "RGB": the bit depth comes from the PNG's IHDR and the
    TIFF's BitsPerSample instead. Anything unforeseen counts as 16-bit RGBA, the largest pixel read.
    """
    channels, sample_bytes = _MODE_CHANNELS.get(image.mode, 4), _MODE_SAMPLE_BYTES.get(image.mode, 1)
    if image.mode not in _MODE_CHANNELS:
        sample_bytes = 2
    if image.format == "PNG":
        with open(path, "rb") as handle:
            ihdr = handle.read(26)
        if len(ihdr) == 26 and ihdr[12:16] == b"IHDR":
            channels = _PNG_CHANNELS.get(ihdr[25], 4)
            sample_bytes = 2 if ihdr[24] == 16 else 1
    elif image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        bits = tags.get(258, 8)
        bits = max(bits) if isinstance(bits, tuple) and bits else bits
        samples = tags.get(277, 1)
        channels = max(channels, samples if samples in (1, 3, 4) else 4)
        sample_bytes = max(sample_bytes, -(-int(bits) // 8) if isinstance(bits, int) and 0 < bits <= 64 else 8)
    elif image.format in ("JPEG", "MPO") and getattr(image, "bits", 8) > 8:
        sample_bytes = 2
    return channels, sample_bytes


def read_header(path: Path) -> ImageHeader:
    """The header of the image file ``path`` (Pillow parses it; no pixels are read), after the file size and
    format checks; raises InputError for a foreign or damaged header."""
    limit = max_pixels()
    size = path.stat().st_size
    if size > MAX_BYTES_PER_PIXEL * limit + HEADER_BYTES:
        raise InputError(path, f"{size / 2**20:,.0f} MiB is more than an image within the size limit can take "
                               f"(set {MAX_MEGAPIXELS_VARIABLE} above {limit / 1e6:g} to allow larger images)")
    try:
        with warnings.catch_warnings(), _pillow_size_check_off(), Image.open(path) as image:  # the header only
            warnings.simplefilter("ignore")
            width, height = image.size
            kind = image.format
            channels, sample_bytes = _decoded_layout(image, path) if kind in IMAGE_FORMATS else (4, 2)
    except PermissionError:
        raise  # read_rgb8 says the file cannot be read
    except Exception:  # Pillow raises many types on foreign or damaged headers
        raise InputError(path, "not a readable image (unrecognized or damaged header)") from None
    if kind not in IMAGE_FORMATS:  # for these, OpenCV picks its decoder by the same signature: the size above holds
        raise InputError(path, f"not a readable image (a {kind} file; the formats read are "
                               f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    coefficients = coefficient_bytes(path) if kind in ("JPEG", "MPO") else 0  # MPO: a JPEG first
    return ImageHeader(path, width, height, kind, channels, sample_bytes, size, coefficients)


def check_image_size(path: Path) -> ImageHeader:
    """Refuse, before decoding, a file too large on disk or a header declaring more than ``max_pixels()``;
    the header."""
    header = read_header(path)
    check_pixel_count(path, header.width, header.height)
    return header


def decode_bytes(header: ImageHeader) -> int:
    """Peak bytes ``read_rgb8`` takes for the image of ``header``: the file's bytes with the decoded image twice
    (OpenCV's ``imdecode`` decodes into a buffer of its own and copies it out: measured for every format
    read), then the decoded image with its 8-bit RGB conversion (none for 8-bit 3-channel: in place). A
    multi-scan JPEG's coefficient buffer is freed before the copy, but is there beside the decoded image."""
    decoded = header.pixels * header.channels * header.sample_bytes
    eight_bit = header.pixels * header.channels
    steps = [header.file_bytes + 2 * decoded, header.file_bytes + header.coefficient_bytes + decoded]
    if header.sample_bytes > 1:
        steps.append(decoded + eight_bit)
    if header.channels != 3 or header.sample_bytes > 1:
        steps.append(eight_bit + 3 * header.pixels)
    return max(steps)


def check_memory(header: ImageHeader, need: int, what: str) -> None:
    """Refuse the image of ``header`` when ``need`` bytes (the estimate of what ``what``, e.g. "upscale it x2",
    takes) are over the memory budget (``memory_budget.refuse_over_budget``): one line with the pixels, the
    estimate and the variable to raise."""
    refuse_over_budget(header.path, header.describe(), need, what)


def decode_check(header: ImageHeader) -> None:
    """``read_rgb8``'s check when its caller gives none: refuse an image whose decoding is over the budget."""
    check_memory(header, decode_bytes(header), "decode it")


def check_pixel_count(path: Path, width: int, height: int) -> None:
    """Refuse an image or video frame of ``width`` x ``height`` (from a header) over ``max_pixels()``."""
    limit = max_pixels()
    if width * height > limit:
        raise InputError(path, f"{width}x{height} is {width * height / 1e6:,.1f} megapixels, over the limit "
                               f"(set {MAX_MEGAPIXELS_VARIABLE} above {limit / 1e6:g} to allow larger images)")


def read_rgb8(path: str | Path, check: Callable[[ImageHeader], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Read ``path`` as HxWx3 uint8 RGB; return it with notes on any conversion made.

    ``check`` sees the header before any pixel is decoded and may refuse the image (``check_memory``); without
    one, ``decode_check`` does. Raises InputError when the file is missing, unreadable, over the size limits
    or the memory budget, or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        header = check_image_size(path)
        (check or decode_check)(header)
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    del data  # the file's bytes: not kept while the pixels are converted
    if image is None:
        raise InputError(path, "not a readable image (corrupt, truncated or unsupported format)")
    notes: list[str] = []
    if image.dtype == np.uint16:
        image = cv2.convertScaleAbs(image, alpha=1 / 257)  # round(x / 257), exact for every 16-bit value
        notes.append("16-bit converted to 8-bit")
    elif image.dtype != np.uint8:
        raise InputError(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
        notes.append("gray replicated to RGB")
    elif image.shape[2] == 2:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., 0]), cv2.COLOR_GRAY2RGB)
        notes.append("gray+alpha: alpha dropped, gray replicated to RGB")
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
        notes.append("alpha channel dropped")
    else:
        cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: no second copy of the pixels
    return image, notes


def list_images(directory: str | Path, warn: Callable[[str], None] = print) -> list[Path]:
    """Files under ``directory`` (recursive) with an image suffix, sorted by path.

    Folders holding one of our reports are skipped (their figures are not data), and linked
    folders are not entered (no loops); linked files are listed. A subfolder that cannot be read
    is skipped with a warning naming it (``warn``); ``directory`` itself unreadable is an error.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "not a directory")
    if holds_our_report(directory):
        raise InputError(directory, "is a dipnet-deploy report folder (metrics.json), not a folder of images")
    try:
        os.listdir(directory)
    except OSError as error:
        raise InputError(directory, f"cannot read the folder ({error.strerror})") from None
    found = []
    for folder, subfolders, names in os.walk(directory, onerror=lambda error: warn(unreadable_folder(error))):
        subfolders[:] = [name for name in subfolders if not holds_our_report(Path(folder) / name)]
        found += [Path(folder) / name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    for path in sorted(found):
        if not path.is_file():
            warn(not_a_file(path))
    return sorted(path for path in found if path.is_file())


def silent(_message: str) -> None:
    """A ``warn`` that says nothing: for listings made only to check collisions (the reading run warns)."""


def not_a_file(path: Path) -> str:
    """The warning for a listed name that is no regular file (a FIFO, a device, a dangling link)."""
    what = "a link to nothing" if path.is_symlink() and not path.exists() else "not a regular file"
    return f"warning: skipped {path}: {what}"


def unreadable_folder(error: OSError) -> str:
    """The warning for a folder ``os.walk`` could not list (its ``onerror`` argument)."""
    return f"warning: skipped {error.filename}: cannot read the folder ({error.strerror})"


def usable_images(paths: Iterable[Path], warn: Callable[[str], None],
                  problem: Callable[[np.ndarray], str | None] = lambda _rgb: None, skipped: list[str] | None = None,
                  say_notes: bool = False, check: Callable[[ImageHeader], None] | None = None
                  ) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, HxWx3 uint8 RGB) of each readable image of ``paths`` for which ``problem(rgb)`` is None.

    Every other one is skipped with a warning naming it (``warn``) and its reason appended to
    ``skipped``, an image over the memory budget too (``read_rgb8``'s ``check``) before it is decoded; with
    ``say_notes``, conversions (gray, alpha, 16-bit) are reported as notes. One image is decoded at a time.
    """
    max_memory_bytes()  # a budget that is no number of MiB ends the run at once, before any image is skipped for it
    for path in paths:
        try:
            rgb, notes = read_rgb8(path, check)
        except InputError as error:
            reason = str(error)
        else:
            if (why := problem(rgb)) is None:
                for note in notes if say_notes else ():
                    warn(f"note: {path}: {note}")
                yield path, rgb
                continue
            reason = f"{path}: {why}"
        if skipped is not None:
            skipped.append(reason)
        warn(f"warning: skipped {reason}")


class PngWriter:
    """An 8-bit RGB PNG written to ``handle`` band by band (``write`` each band of rows, top to bottom, then
    ``close``): only one band is in memory at a time, never the whole image.

    Every row uses the Sub filter and the stream is deflated at level 1 with the RLE strategy: OpenCV's
    defaults for ``cv2.imwrite``/``imencode`` of a PNG, so files are about the size theirs are, as fast.
    The pixels decode exactly (any PNG reader); the bytes are not OpenCV's (another deflate library).
    """

    ROWS = 64  # rows filtered and deflated at once: the encoder's own memory is that many rows, twice
    CHUNK = 1 << 20  # the largest IDAT chunk written

    def __init__(self, handle: BinaryIO, width: int, height: int):
        if not (0 < width < 2**31 and 0 < height < 2**31):
            raise ValueError(f"a PNG cannot be {width}x{height}")
        self.handle, self.width, self.height, self.rows = handle, width, height, 0
        handle.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB, not interlaced
        self.deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)

    def _chunk(self, kind: bytes, data) -> None:
        self.handle.write(struct.pack(">I", len(data)) + kind)
        self.handle.write(data)
        self.handle.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))

    def _idat(self, data: bytes) -> None:
        for start in range(0, len(data), self.CHUNK):
            self._chunk(b"IDAT", memoryview(data)[start:start + self.CHUNK])

    def write(self, band: np.ndarray) -> None:
        """The next ``band`` (rows x width x 3 uint8 RGB) of the image."""
        if band.dtype != np.uint8 or band.ndim != 3 or band.shape[1:] != (self.width, 3):
            raise ValueError(f"a band of the {self.width} px wide image must be rows x {self.width} x 3 uint8, "
                             f"not {band.dtype} {band.shape}")
        if self.rows + band.shape[0] > self.height:
            raise ValueError(f"more than the {self.height} rows declared")
        filtered = np.empty((min(self.ROWS, band.shape[0]), 1 + 3 * self.width), np.uint8)
        filtered[:, 0] = 1  # filter type Sub: each byte minus the byte one pixel to its left (mod 256)
        for start in range(0, band.shape[0], self.ROWS):
            rows = band[start:start + self.ROWS].reshape(-1, 3 * self.width)
            out = filtered[:len(rows)]
            out[:, 1:4] = rows[:, :3]
            np.subtract(rows[:, 3:], rows[:, :-3], out=out[:, 4:])
            self._idat(self.deflate.compress(out))
        self.rows += band.shape[0]

    def close(self) -> None:
        """End the image (every declared row must have been written)."""
        if self.rows != self.height:
            raise ValueError(f"{self.rows} of the {self.height} rows declared were written")
        self._idat(self.deflate.flush())
        self._chunk(b"IEND", b"")


def vendor_preprocess(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """The vendor seed's input: cv2.resize (bilinear) to (W, H), RGB, CHW, float32/255, batch axis."""
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    return (resized.transpose(2, 0, 1).astype(np.float32) / 255.0)[None]


def to_uint8_rgb(output: np.ndarray) -> np.ndarray:
    """Model output [1, 3, H, W] in [0, 1] -> HxWx3 uint8 RGB, rounded (never truncated)."""
    chw = np.asarray(output)[0]
    return np.round(np.clip(chw * 255.0, 0, 255)).astype(np.uint8).transpose(1, 2, 0)


def vendor_postprocess(output: np.ndarray) -> np.ndarray:
    """The vendor seed's output: squeeze, RGB->BGR, CHW->HWC, clip(x*255), round, uint8."""
    return np.ascontiguousarray(to_uint8_rgb(output)[..., ::-1])
