"""A stress set the project draws itself: the images an upscaler meets every day and calibration photos
rarely show (saturated flat colours, sharp edges, line art, text, gradients, pure black and white, UI).

Conventions:
- images are HxWx3 uint8 RGB, drawn with OpenCV from ``(seed, hue_offset)`` alone: the same arguments
  give the same pixels (and the same PNG bytes) on every machine;
- ``hue_offset`` (degrees) turns the whole palette: 0 puts the saturated colours on the primaries and
  secondaries (0, 60, ..., 300 degrees); images for evaluation are drawn with another seed and offset
  than any that fed calibration or training, so a method cannot pass by having seen them;
- ``KINDS`` cycle over the images, and sizes cycle over ``SIZES`` (HR pixels; the larger ones span
  several tiles of a 1080p model at x2, the smaller fit in one and exercise padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

KINDS = ("bands", "line_art", "text", "gradients", "ui")
# Coverage images (fed to calibration and fine-tuning as range coverage) and evaluation images never share
# a seed or a palette: seed 0 at hue offsets 0 and 30 degrees feeds; seed 1 at 15 and 45 degrees evaluates.
COVERAGE_SEED, COVERAGE_HUES = 0, (0.0, 30.0)
EVALUATION_SEED, EVALUATION_HUES = 1, (15.0, 45.0)
SIZES = ((480, 640), (720, 1280), (600, 800), (1200, 2100))
SATURATED_STEPS = 6  # hues per turn of the palette: primaries and secondaries at hue_offset 0


def palette(hue_offset: float) -> np.ndarray:
    """(8, 3) uint8 RGB: six fully saturated colours at ``hue_offset + k * 60`` degrees, then black and white."""
    colours = []
    for k in range(SATURATED_STEPS):
        hue = (hue_offset + k * 360.0 / SATURATED_STEPS) % 360.0
        sector, fraction = divmod(hue / 60.0, 1.0)
        rising, falling = round(255 * fraction), round(255 * (1 - fraction))
        colours.append([(255, rising, 0), (falling, 255, 0), (0, 255, rising),
                        (0, falling, 255), (rising, 0, 255), (255, 0, falling)][int(sector)])
    return np.array(colours + [(0, 0, 0), (255, 255, 255)], dtype=np.uint8)


def _colour(colours: np.ndarray, index: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in colours[index % len(colours)])


def _bands(rng: np.random.Generator, height: int, width: int, colours: np.ndarray) -> np.ndarray:
    """Flat saturated bands with sharp edges, straight and slanted, some a single pixel apart."""
    image = np.empty((height, width, 3), np.uint8)
    edges = np.sort(rng.choice(np.arange(1, width), size=int(rng.integers(6, 14)), replace=False))
    for i, (start, stop) in enumerate(zip([0, *edges], [*edges, width])):
        image[:, start:stop] = _colour(colours, int(rng.integers(0, len(colours))) if i % 3 else i)
    for _ in range(int(rng.integers(3, 7))):  # slanted stripes across the bands
        x0, x1 = (int(v) for v in rng.integers(-width // 2, width + width // 2, size=2))
        thickness = int(rng.choice([1, 2, 5, 17, 40]))
        cv2.line(image, (x0, 0), (x1, height - 1), _colour(colours, int(rng.integers(0, 8))), thickness,
                 lineType=cv2.LINE_8)
    return image


def _line_art(rng: np.random.Generator, height: int, width: int, colours: np.ndarray) -> np.ndarray:
    """Black ink on white: outlines, hatching and one-pixel lines, as in comics and drawings."""
    image = np.full((height, width, 3), 255, np.uint8)
    ink = (0, 0, 0)
    for _ in range(int(rng.integers(15, 30))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(8, max(9, min(height, width) // 4)))
        cv2.circle(image, centre, radius, ink, int(rng.choice([1, 2, 3])), lineType=cv2.LINE_AA)
    spacing = int(rng.integers(3, 7))
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    for offset in range(0, min(height, width) // 2, spacing):  # a hatched square
        cv2.line(image, (left + offset, top), (left, top + offset), ink, 1, lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(20, 40))):
        points = rng.integers(0, [width, height], size=(int(rng.integers(2, 6)), 2)).astype(np.int32)
        cv2.polylines(image, [points], False, ink, 1, lineType=cv2.LINE_8)
    if rng.random() < 0.5:  # a flat tone area, as in manga screentones
        cv2.rectangle(image, (left, top), (left + width // 5, top + height // 5), _colour(colours, 0), -1)
    return image


def _text(rng: np.random.Generator, height: int, width: int, colours: np.ndarray) -> np.ndarray:
    """Lines of text at several sizes, black on white, white on black and coloured on coloured."""
    image = np.full((height, width, 3), 255, np.uint8)
    fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:;-"))
    y = 0
    while y < height:
        scale = float(rng.choice([0.4, 0.6, 1.0, 1.6, 2.5]))
        line_height = int(30 * scale) + 4
        background, ink = [((255,) * 3, (0,) * 3), ((0,) * 3, (255,) * 3),
                           (_colour(colours, int(rng.integers(0, 6))), _colour(colours, int(rng.integers(0, 8))))][
            int(rng.integers(0, 3))]
        image[y:y + line_height] = background
        text = "".join(rng.choice(letters, size=int(rng.integers(20, 90))))
        cv2.putText(image, text, (4, y + line_height - 6), fonts[int(rng.integers(0, len(fonts)))], scale, ink,
                    int(rng.choice([1, 2])), lineType=cv2.LINE_AA)
        y += line_height
    return image


def _gradients(rng: np.random.Generator, height: int, width: int, colours: np.ndarray) -> np.ndarray:
    """Smooth linear and radial ramps between saturated colours, black and white (banding-prone)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle))
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1.0)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    radial = np.clip(np.hypot(yy - cy, xx - cx) / (0.6 * max(height, width)), 0, 1)
    a, b, c = (colours[int(i)].astype(np.float64) for i in rng.choice(len(colours), size=3, replace=False))
    image = a * (1 - ramp[..., None]) + b * ramp[..., None]
    half = width // 2
    image[:, half:] = (c * (1 - radial[..., None]) + a * radial[..., None])[:, half:]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _ui(rng: np.random.Generator, height: int, width: int, colours: np.ndarray) -> np.ndarray:
    """Flat UI: panels, buttons with one-pixel borders, pure black and white areas, small labels."""
    image = np.full((height, width, 3), _colour(colours, 7 if rng.random() < 0.5 else 6), np.uint8)
    for _ in range(int(rng.integers(10, 25))):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        w, h = int(rng.integers(8, max(9, width // 3))), int(rng.integers(8, max(9, height // 4)))
        cv2.rectangle(image, (x, y), (x + w, y + h), _colour(colours, int(rng.integers(0, 8))), -1)
        cv2.rectangle(image, (x, y), (x + w, y + h), _colour(colours, int(rng.integers(6, 8))), 1)
        cv2.putText(image, "OK" if rng.random() < 0.5 else "Cancel", (x + 3, y + min(h - 2, 14)),
                    cv2.FONT_HERSHEY_PLAIN, 0.9, _colour(colours, int(rng.integers(0, 8))), 1, lineType=cv2.LINE_AA)
    return image


DRAW: dict[str, Callable[[np.random.Generator, int, int, np.ndarray], np.ndarray]] = {
    "bands": _bands, "line_art": _line_art, "text": _text, "gradients": _gradients, "ui": _ui}


def stress_image(index: int, seed: int, hues: tuple[float, ...], sizes=SIZES) -> tuple[str, np.ndarray]:
    """The ``index``-th image drawn from ``(seed, hues)``: every kind once at the first hue offset, then at
    the next, and so on; its kind and RGB pixels."""
    kind = KINDS[index % len(KINDS)]
    height, width = sizes[index % len(sizes)]
    rng = np.random.default_rng([seed, index])
    return kind, DRAW[kind](rng, height, width, palette(hues[(index // len(KINDS)) % len(hues)]))


def coverage_images(count: int) -> list[np.ndarray]:
    """The range-coverage images calibration and fine-tuning add to the user's (``COVERAGE_SEED``)."""
    return [stress_image(index, COVERAGE_SEED, COVERAGE_HUES)[1] for index in range(count)]


def write_stress_set(folder: str | Path, count: int, seed: int = EVALUATION_SEED, hues: tuple[float, ...] = EVALUATION_HUES,
                     sizes=SIZES, progress=lambda items, description, total: items) -> list[Path]:
    """Write ``count`` PNGs ``stress_SEED_INDEX_KIND.png`` into ``folder`` (created); their paths. The
    defaults draw the evaluation images, which never fed calibration or fine-tuning."""
    from dipnet_deploy.fileio import write_bytes_atomic

    folder = Path(folder)
    paths = []
    for index in progress(range(count), "stress set", count):
        kind, image = stress_image(index, seed, hues, sizes)
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok, "OpenCV could not encode a PNG of a plain uint8 image"
        path = folder / f"stress_{seed}_{index:03d}_{kind}.png"
        write_bytes_atomic(path, data.tobytes())
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m dipnet_deploy.stress_set FOLDER [--count N] [--seed S] [--hues H,H]``: write an evaluation set."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the generated stress set (PNG) into FOLDER. The defaults "
                                                 "draw the evaluation images, never the coverage ones.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED)
    parser.add_argument("--hues", default=",".join(f"{h:g}" for h in EVALUATION_HUES),
                        help="hue offsets in degrees, comma-separated")
    args = parser.parse_args(argv)
    hues = tuple(float(h) for h in args.hues.split(","))
    for path in write_stress_set(args.folder, args.count, args.seed, hues):
        print(path)


if __name__ == "__main__":
    main()
