"""A labelled folder of small real colour photographs: patches of scikit-learn's sample photographs.

``python -m swavctl.bench.patches DIR`` writes it (``bench/own_data_quality.py`` measures
``swavctl pretrain --data DIR`` on it; docs/benchmarks.md has the figures).

scikit-learn ships two colour photographs (``china.jpg``, a pagoda over a lake, and
``flower.jpg``, a dahlia on a blurred background; 640 x 427 each; nothing is downloaded). Each
class is a region of one of them, a texture of its own:

======== ========= ======================================================
class    source    what it shows
======== ========= ======================================================
sky      china     pale blue haze
trees    china     dark green foliage
pagoda   china     red walls, orange tiles and teal eaves
petals   flower    orange dahlia petals
bokeh    flower    the blurred teal-green background
======== ========= ======================================================

**As if photographed under other light.** Two photographs give each class one exposure and one
white balance, so colour alone would tell the classes apart (raw pixels score 1.00 on the
fast probe without it, docs/benchmarks.md). Each patch is therefore given a seeded random light:
its contrast about its mean times ``exp(U(-contrast, contrast))``, a quarter of them (``grey``)
in black and white, then every channel times ``exp(e + w_c)`` with an exposure
``e ~ U(-exposure, exposure)`` and a white balance ``w_c ~ U(-white_balance, white_balance)``,
clipped to 0..255. What is left to tell the classes apart is mostly their texture.

**No leakage between train and val.** No val box overlaps a train box of any class of the same
photograph (a region cut in two, or two separate regions), and each patch lies wholly inside
one box, so no val patch shares a pixel with a train patch.

Patches are squares of ``patch`` source pixels at seeded random positions (the same arguments
give the same files), written as PNG: ``ROOT/train/<class>/NNN.png`` and
``ROOT/val/<class>/NNN.png``, the layout ``swavctl pretrain --data ROOT`` (which uses ``train/``)
and ``swavctl eval-linear`` (train/ against val/) read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Box = (left, top, right, bottom) in source pixels of the 640 x 427 photograph.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class PatchClass:
    """One class: the photograph it is cut from, and its train and val boxes (no train box
    overlaps a val box; a split's patches are spread evenly over its boxes)."""

    name: str
    photo: str  # "china.jpg" or "flower.jpg"
    train: tuple[Box, ...]
    val: tuple[Box, ...]


#: The classes, with boxes chosen by eye on the photographs (see the module docstring).
CLASSES: tuple[PatchClass, ...] = (
    PatchClass("sky", "china.jpg", train=((335, 0, 560, 150),), val=((560, 0, 640, 125),)),
    PatchClass(
        "trees",
        "china.jpg",
        train=((380, 300, 560, 427), (0, 345, 110, 427)),
        val=((560, 300, 640, 427), (110, 345, 180, 427)),
    ),
    PatchClass("pagoda", "china.jpg", train=((110, 110, 320, 280),), val=((170, 280, 330, 365),)),
    PatchClass("petals", "flower.jpg", train=((200, 115, 415, 245),), val=((200, 245, 415, 330),)),
    PatchClass("bokeh", "flower.jpg", train=((0, 0, 160, 427),), val=((460, 0, 640, 370),)),
)


def _photos() -> dict[str, np.ndarray]:
    """The sample photographs by file name, as uint8 arrays (H x W x 3)."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return {Path(f).name: image for f, image in zip(bunch.filenames, bunch.images, strict=True)}


def _squares(box: Box, side: int, count: int, rng: np.random.Generator) -> list[Box]:
    """``count`` seeded ``side``-pixel squares lying wholly inside ``box``."""
    left, top, right, bottom = box
    if right - left < side or bottom - top < side:
        raise ValueError(f"box {box} is smaller than a {side} px square")
    xs = rng.integers(left, right - side + 1, size=count)
    ys = rng.integers(top, bottom - side + 1, size=count)
    return [(int(x), int(y), int(x) + side, int(y) + side) for x, y in zip(xs, ys, strict=True)]


@dataclass(frozen=True)
class Light:
    """The spread of the random light of each patch (module docstring); zero everywhere: as shot."""

    exposure: float = 0.6
    white_balance: float = 0.4
    contrast: float = 0.5
    grey: float = 0.25


def relight(pixels: np.ndarray, rng: np.random.Generator, light: Light) -> np.ndarray:
    """``pixels`` (H x W x 3, uint8) under a random light drawn from ``rng`` (module docstring)."""
    x = pixels.astype(np.float64)
    mean = x.mean()
    x = mean + np.exp(rng.uniform(-light.contrast, light.contrast)) * (x - mean)
    if rng.random() < light.grey:
        x = np.repeat((x @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=2)
    spread = light.white_balance
    gains = np.exp(rng.uniform(-light.exposure, light.exposure) + rng.uniform(-spread, spread, size=3))
    return np.asarray(np.clip(x * gains, 0, 255).round().astype(np.uint8))


def write_patch_folder(
    root: Path,
    *,
    train_per_class: int = 96,
    val_per_class: int = 24,
    patch: int = 64,
    light: Light | None = None,
    seed: int = 0,
) -> Path:
    """Write the labelled patch folder under ``root`` (``train/`` and ``val/``); returns ``root``.

    ``train_per_class`` and ``val_per_class`` patches of ``patch`` x ``patch`` source pixels per
    class (default 480 train and 120 val images of 64 px), under ``light`` (default
    :class:`Light`'s; ``Light(0, 0, 0, 0)``: as shot). The same arguments write the same files.
    """
    light = Light() if light is None else light
    photos = _photos()
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        pixels = np.asarray(photos[cls.photo])
        for split, boxes, count in (("train", cls.train, train_per_class), ("val", cls.val, val_per_class)):
            folder = root / split / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            shares = [count // len(boxes) + (i < count % len(boxes)) for i in range(len(boxes))]
            squares = [q for box, n in zip(boxes, shares, strict=True) for q in _squares(box, patch, n, rng)]
            for i, (x0, y0, x1, y1) in enumerate(squares):
                Image.fromarray(relight(pixels[y0:y1, x0:x1], rng, light)).save(folder / f"{i:03d}.png")
    return root


def boxes_overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share any pixel (half-open intervals)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the labelled patch folder (train/ and val/).")
    parser.add_argument("root", type=Path, help="folder to write")
    args = parser.parse_args(argv)
    write_patch_folder(args.root)
    print(f"wrote {args.root}/train (480 images) and {args.root}/val (120 images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
