"""Recipe of the default calibration set in ``calibration/`` (``make calibration``).

Five natural colour photos that scikit-image ships inside its wheel (no download), all free of
copyright restrictions; see calibration/README.md. They are copied byte for byte.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SOURCES = {
    "astronaut.png": "Eileen Collins, NASA; public domain",
    "chelsea.png": "Chelsea the cat, Stefan van der Walt; CC0",
    "coffee.png": "coffee cup, Rachel Michetti; CC0",
    "rocket.jpg": "SpaceX launch; released into the public domain",
    "hubble_deep_field.jpg": "Hubble deep field, NASA; public domain",
}


def build(target: Path) -> list[Path]:
    import skimage.data

    source_dir = Path(skimage.data.__file__).parent
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SOURCES:
        shutil.copyfile(source_dir / name, target / name)
        written.append(target / name)
    return written


if __name__ == "__main__":
    for path in build(Path(sys.argv[1] if len(sys.argv) > 1 else "calibration")):
        print(f"wrote {path}")
