"""The benchmark's labelled patch folder: its layout, no train/val overlap, the same files every time."""

from __future__ import annotations

import hashlib
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

from swavctl.bench.patches import CLASSES, Light, boxes_overlap, relight, write_patch_folder


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_no_val_box_touches_a_train_box_of_the_same_photograph() -> None:
    for a, b in product(CLASSES, CLASSES):
        if a.photo == b.photo:
            assert not any(boxes_overlap(t, v) for t in a.train for v in b.val), (a.name, b.name)
    assert boxes_overlap((0, 0, 10, 10), (9, 9, 20, 20))
    assert not boxes_overlap((0, 0, 10, 10), (10, 0, 20, 10))


def test_the_folder_has_its_classes_splits_and_sizes_and_is_reproducible(tmp_path: Path) -> None:
    root = write_patch_folder(tmp_path / "a", train_per_class=5, val_per_class=3)
    for split, count in (("train", 5), ("val", 3)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(c.name for c in CLASSES)
        for cls in CLASSES:
            files = sorted((root / split / cls.name).glob("*.png"))
            assert len(files) == count
            with Image.open(files[0]) as image:
                assert (image.size, image.mode) == ((64, 64), "RGB")
    small = {"train_per_class": 5, "val_per_class": 3}
    assert _digest(root) == _digest(write_patch_folder(tmp_path / "b", **small))
    assert _digest(root) != _digest(write_patch_folder(tmp_path / "c", **small, seed=1))


def test_the_light_changes_colour_and_contrast_only() -> None:
    pixels = np.random.default_rng(0).integers(40, 200, size=(8, 8, 3)).astype(np.uint8)
    rng = np.random.default_rng(0)
    assert np.array_equal(relight(pixels, rng, Light(0, 0, 0, 0)), pixels)  # as shot
    grey = relight(pixels, rng, Light(0, 0, 0, grey=1.0))
    assert np.abs(grey.astype(int) - grey[..., :1]).max() == 0  # black and white
    exposure_only = Light(exposure=0.5, white_balance=0, contrast=0, grey=0)
    brighter = relight(pixels, np.random.default_rng(3), exposure_only)
    gain = float(np.median(brighter / pixels))
    kept = brighter < 255
    assert gain != 1 and np.abs(brighter - pixels * gain)[kept].max() <= 1  # one gain for all
