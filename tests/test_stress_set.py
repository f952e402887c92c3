"""The generated stress set: deterministic, and holding what calibration photos rarely show."""

from __future__ import annotations

import hashlib

import numpy as np

from dipnet_deploy.stress_set import KINDS, palette, stress_image, write_stress_set

SMALL = ((96, 128),)


def test_palette_at_offset_zero_is_the_primaries_and_secondaries():
    expected = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255), (0, 0, 0),
                (255, 255, 255)]
    assert [tuple(c) for c in palette(0.0)] == expected
    turned = palette(30.0)[:6]
    assert all(255 in c and 0 in c for c in turned) and not {tuple(c) for c in turned} & set(expected)


def test_same_arguments_same_bytes_other_seed_other_images(tmp_path):
    first = write_stress_set(tmp_path / "a", 5, seed=3, hues=(0.0,), sizes=SMALL)
    again = write_stress_set(tmp_path / "b", 5, seed=3, hues=(0.0,), sizes=SMALL)
    other = write_stress_set(tmp_path / "c", 5, seed=4, hues=(0.0,), sizes=SMALL)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in first]
    assert digest == [hashlib.sha256(p.read_bytes()).hexdigest() for p in again]
    assert not set(digest) & {hashlib.sha256(p.read_bytes()).hexdigest() for p in other}
    assert [p.name.split("_", 3)[3].removesuffix(".png") for p in first] == list(KINDS)


def test_each_kind_holds_what_it_promises():
    images = {kind: stress_image(i, seed=1, hues=(0.0,), sizes=((240, 320),))[1] for i, kind in enumerate(KINDS)}
    for kind, image in images.items():
        assert image.shape == (240, 320, 3) and image.dtype == np.uint8, kind
    corners_of_the_cube = np.all((images["bands"] == 0) | (images["bands"] == 255), axis=2)
    assert np.mean(corners_of_the_cube) > 0.9  # flat saturated primaries/secondaries, black and white
    assert np.mean(np.all(images["line_art"] == 255, axis=2)) > 0.5  # white paper
    assert np.mean(np.all(images["line_art"] == 0, axis=2)) > 0.01  # black ink
    edges = np.abs(np.diff(images["text"].astype(int), axis=1)).max(axis=2)
    assert np.mean(edges > 128) > 0.005  # sharp strokes
    steps = np.abs(np.diff(images["gradients"].astype(int), axis=1)).max(axis=2)
    assert np.median(steps) <= 2  # smooth ramps
    colours = {tuple(c) for c in images["ui"].reshape(-1, 3)}
    assert len(colours) < 2000  # flat UI colours (antialiased labels add a few)


def test_coverage_and_evaluation_images_never_meet():
    from dipnet_deploy.stress_set import EVALUATION_HUES, EVALUATION_SEED, coverage_images

    coverage = {hashlib.sha256(image.tobytes()).hexdigest() for image in coverage_images(10)}
    evaluation = {hashlib.sha256(stress_image(i, EVALUATION_SEED, EVALUATION_HUES)[1].tobytes()).hexdigest()
                  for i in range(10)}
    assert len(coverage) == len(evaluation) == 10 and not coverage & evaluation
