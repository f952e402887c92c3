"""Reading images for the pipeline, and the seed's pre/post-processing.

Every reader returns 8-bit 3-channel RGB. Gray, gray+alpha, RGBA and 16-bit inputs are
converted explicitly and the conversion is reported, never silently misread.

Size limits: an image is decoded only when its header (read lazily by Pillow) is of one of
``IMAGE_FORMATS`` and declares at most ``max_pixels()`` pixels (``DIPNET_MAX_MEGAPIXELS`` million,
default 100) and its file is no larger than such an image can be (``MAX_BYTES_PER_PIXEL`` per
allowed pixel plus ``HEADER_BYTES``); so a decompression bomb or a huge file named .png costs a
header read, not gigabytes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dipnet_deploy.errors import InputError
from dipnet_deploy.safety import holds_our_report

# OpenCV prints decoder complaints (several lines each) itself; our own one-line warnings say what matters
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP")  # Pillow's names of those (MPO: a camera's JPEG)
MAX_MEGAPIXELS_VARIABLE = "DIPNET_MAX_MEGAPIXELS"
DEFAULT_MAX_MEGAPIXELS = 100.0
MAX_BYTES_PER_PIXEL = 8  # 16-bit RGBA stored raw: the largest pixel we decode
HEADER_BYTES = 16 << 20  # room for metadata, colour profiles and thumbnails

Image.MAX_IMAGE_PIXELS = None  # Pillow's own bomb check would stop raised limits; ours is in check_image_size


def max_pixels() -> int:
    """The decoded-size limit in pixels: ``DIPNET_MAX_MEGAPIXELS`` million (default 100)."""
    text = os.environ.get(MAX_MEGAPIXELS_VARIABLE, "")
    try:
        megapixels = float(text) if text else DEFAULT_MAX_MEGAPIXELS
    except ValueError:
        megapixels = math.nan
    if not (math.isfinite(megapixels) and megapixels > 0):
        raise InputError(MAX_MEGAPIXELS_VARIABLE, f"{text!r} is not a positive number of megapixels")
    return int(megapixels * 1e6)


def check_image_size(path: Path) -> None:
    """Refuse, before decoding, a file too large on disk or a header declaring more than ``max_pixels()``."""
    limit = max_pixels()
    size = path.stat().st_size
    if size > MAX_BYTES_PER_PIXEL * limit + HEADER_BYTES:
        raise InputError(path, f"{size / 2**20:,.0f} MiB is more than an image within the size limit can take "
                               f"(set {MAX_MEGAPIXELS_VARIABLE} above {limit / 1e6:g} to allow larger images)")
    try:
        with warnings.catch_warnings(), Image.open(path) as image:  # parses the header; pixels stay on disk
            warnings.simplefilter("ignore")
            width, height = image.size
            kind = image.format
    except PermissionError:
        raise  # read_rgb8 says the file cannot be read
    except Exception:  # Pillow raises many types on foreign or damaged headers
        raise InputError(path, "not a readable image (unrecognized or damaged header)") from None
    if kind not in IMAGE_FORMATS:  # for these, OpenCV picks its decoder by the same signature: the size above holds
        raise InputError(path, f"not a readable image (a {kind} file; the formats read are "
                               f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    check_pixel_count(path, width, height)


def check_pixel_count(path: Path, width: int, height: int) -> None:
    """Refuse an image or video frame of ``width`` x ``height`` (from a header) over ``max_pixels()``."""
    limit = max_pixels()
    if width * height > limit:
        raise InputError(path, f"{width}x{height} is {width * height / 1e6:,.1f} megapixels, over the limit "
                               f"(set {MAX_MEGAPIXELS_VARIABLE} above {limit / 1e6:g} to allow larger images)")


def read_rgb8(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read ``path`` as HxWx3 uint8 RGB; return it with notes on any conversion made.

    Raises InputError when the file is missing, unreadable, over the size limits or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        check_image_size(path)
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
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
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
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
                  say_notes: bool = False) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, HxWx3 uint8 RGB) of each readable image of ``paths`` for which ``problem(rgb)`` is None.

    Every other one is skipped with a warning naming it (``warn``) and its reason appended to
    ``skipped``; with ``say_notes``, conversions (gray, alpha, 16-bit) are reported as notes.
    One image is decoded at a time.
    """
    for path in paths:
        try:
            rgb, notes = read_rgb8(path)
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
