"""A labelled folder of small real colour photographs: patches of scikit-learn's sample photographs.

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

The classes come in pairs of like colour (sky/lake, trees/bokeh, pagoda/petals), so colour alone
separates about half of them and texture must do the rest.

**No leakage between train and val.** Every class has a train box and a val box that do not
overlap (a region cut in two, or two separate regions), and each patch lies wholly inside one
box, so no val patch shares a pixel with a train patch.

Patches are square crops of ``patch`` source pixels at seeded random positions (the same seed
gives the same files), written as PNG: ``ROOT/train/<class>/NNN.png`` and
``ROOT/val/<class>/NNN.png``, the layout ``swavctl pretrain --data ROOT`` (which uses ``train/``)
and ``swavctl eval-linear --data ROOT`` read.
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


def _squares(box: Box, sides: tuple[int, int], count: int, rng: np.random.Generator) -> list[Box]:
    """``count`` seeded squares lying wholly inside ``box``, of sides drawn from ``sides``
    (inclusive; capped at the box's width and height)."""
    left, top, right, bottom = box
    largest = min(sides[1], right - left, bottom - top)
    if largest < sides[0]:
        raise ValueError(f"box {box} is smaller than a {sides[0]} px square")
    squares = []
    for _ in range(count):
        side = int(rng.integers(sides[0], largest + 1))
        x, y = int(rng.integers(left, right - side + 1)), int(rng.integers(top, bottom - side + 1))
        squares.append((x, y, x + side, y + side))
    return squares


def _relight(pixels: np.ndarray, rng: np.random.Generator, exposure: float, balance: float) -> np.ndarray:
    """The patch as if photographed under other light: every channel times ``exp(e + w_c)``, with
    ``e ~ U(-exposure, exposure)`` for the patch and ``w_c ~ U(-balance, balance)`` per
    channel, clipped to 0..255."""
    gains = np.exp(rng.uniform(-exposure, exposure) + rng.uniform(-balance, balance, size=3))
    return np.clip(pixels.astype(np.float64) * gains, 0, 255).round().astype(np.uint8)


def write_patch_folder(
    root: Path,
    *,
    train_per_class: int = 96,
    val_per_class: int = 24,
    patch: int = 64,
    source_sides: tuple[int, int] | None = None,
    exposure: float = 0.0,
    white_balance: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write the labelled patch folder under ``root`` (``train/`` and ``val/``); returns ``root``.

    ``train_per_class`` and ``val_per_class`` patches of ``patch`` x ``patch`` source pixels per
    class (default 480 train and 120 val images of 64 px). The same arguments write the same files.
    """
    photos = _photos()
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        pixels = np.asarray(photos[cls.photo])
        for split, boxes, count in (("train", cls.train, train_per_class), ("val", cls.val, val_per_class)):
            folder = root / split / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            shares = [count // len(boxes) + (i < count % len(boxes)) for i in range(len(boxes))]
            sides = source_sides or (patch, patch)
            squares = [q for box, n in zip(boxes, shares, strict=True) for q in _squares(box, sides, n, rng)]
            for i, (x0, y0, x1, y1) in enumerate(squares):
                crop = Image.fromarray(pixels[y0:y1, x0:x1])
                if crop.size != (patch, patch):
                    crop = crop.resize((patch, patch), Image.Resampling.BICUBIC)
                relit = _relight(np.asarray(crop), rng, exposure, white_balance)
                Image.fromarray(relit).save(folder / f"{i:03d}.png")
    return root


def boxes_overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share any pixel (half-open intervals)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
