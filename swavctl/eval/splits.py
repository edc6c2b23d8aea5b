"""Labelled splits for evaluation: ImageFolder discovery, seeded stratified splits, label subsets.

An evaluation folder is either ImageNet-style (``DIR/train/<class>/*`` and ``DIR/val/<class>/*``)
or a single ImageFolder (``DIR/<class>/*``), which is split into train and val with a seeded,
class-stratified fraction. Class indices follow torchvision's ``ImageFolder``: the train class
folder names in sorted order.

The label subsets of the semi-supervised protocol (Caron et al. 2020, Sec. 4.1, 1% and 10% of
the ImageNet labels) are drawn from the train split only, so they never overlap val, and are
class-balanced: every class contributes ``max(1, round(fraction * n_train / n_classes))`` images
(fewer only where a class has fewer images, which is reported).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swavctl.errors import UserError
from swavctl.eval.options import SPLIT_SEED, VAL_SPLIT
from swavctl.files.image_folder import IMAGE_SUFFIXES, check_data_folder, class_of, list_images


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: int


@dataclass
class EvalSplit:
    """The train and val samples of an evaluation, with the class names (index = label)."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    root: Path
    layout: str  # "train/val" or "single folder (val-split F)"
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _class_images(folder: Path) -> tuple[dict[str, list[Path]], int]:
    """{class name: sorted image paths} under ``folder``, and the count of top-level images."""
    by_class: dict[str, list[Path]] = {}
    loose = 0
    for path in list_images(folder):
        name = class_of(path, folder)
        if name is None:
            loose += 1
            continue
        by_class.setdefault(name, []).append(path)
    return by_class, loose


class NoClassesError(UserError):
    """A folder that should hold labelled images has no class subfolders."""


def _no_classes(folder: Path) -> NoClassesError:
    return NoClassesError(
        f"no classes: {folder} holds no class subfolders with images "
        f"(expected {folder}/<class>/<image>, image types {', '.join(sorted(IMAGE_SUFFIXES))})"
    )


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """A boolean mask choosing ``round(fraction * n_c)`` items of every class ``c``, seeded.

    Each class's members are permuted with ``numpy.random.default_rng([seed, c])``, so the
    choice in one class does not depend on the other classes.
    """
    labels_arr = np.asarray(labels, dtype=np.int64)
    chosen = np.zeros(len(labels_arr), dtype=bool)
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        rng = np.random.default_rng([seed, int(c)])
        members = rng.permutation(members)
        chosen[members[: int(round(len(members) * fraction))]] = True
    return chosen


def discover(root: Path, *, val_split: float = VAL_SPLIT, seed: int = SPLIT_SEED) -> EvalSplit:
    """Find the labelled train and val images under ``root``.

    ``root/train`` and ``root/val`` are used when both exist. Otherwise the folder itself (or its
    ``train/`` alone) is split: a seeded class-stratified ``val_split`` fraction becomes val.
    Raises :class:`UserError` for a missing folder, no classes, fewer than two classes, or a
    class in val that train does not have.
    """
    root = root.expanduser()
    check_data_folder(root)
    notes: list[str] = []
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        train_by, loose_train = _class_images(train_dir)
        val_by, loose_val = _class_images(val_dir)
        if not train_by:
            raise _no_classes(train_dir)
        if not val_by:
            raise _no_classes(val_dir)
        missing = sorted(set(val_by) - set(train_by))
        if missing:
            shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise UserError(
                f"{len(missing)} class(es) in {val_dir} are missing from {train_dir}: {shown}; "
                "a classifier cannot predict a class it never saw"
            )
        classes = sorted(train_by)
        index = {name: i for i, name in enumerate(classes)}
        train = [Sample(p, index[c]) for c in classes for p in train_by[c]]
        val = [Sample(p, index[c]) for c in sorted(val_by) for p in val_by[c]]
        absent = [c for c in classes if c not in val_by]
        if absent:
            notes.append(f"{len(absent)} train class(es) have no val images (e.g. '{absent[0]}')")
        loose = loose_train + loose_val
        layout = "train/val"
    else:
        folder = train_dir if train_dir.is_dir() else root
        if not 0.0 < val_split < 1.0:
            raise UserError(f"--val-split must be in (0, 1), got {val_split}")
        by_class, loose = _class_images(folder)
        if not by_class:
            raise _no_classes(folder)
        classes = sorted(by_class)
        samples = [Sample(p, i) for i, c in enumerate(classes) for p in by_class[c]]
        is_val = stratified_split([s.label for s in samples], val_split, seed)
        train = [s for s, v in zip(samples, is_val, strict=True) if not v]
        val = [s for s, v in zip(samples, is_val, strict=True) if v]
        layout = f"single folder, seeded stratified val split {val_split:g} (seed {seed})"
        if not val:
            raise UserError(
                f"{folder}: too few images for a val split of {val_split:g}; "
                "add images or use train/ and val/"
            )
        root = folder
    if len(classes) < 2:
        raise UserError(
            f"{root}: found a single class '{classes[0]}'; classification needs at least 2 classes"
        )
    if loose:
        notes.append(f"ignored {loose} image(s) outside class subfolders")
    return EvalSplit(classes, train, val, root, layout, notes)


def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held_out) of a seeded class-stratified hold-out part of the train split.

    Used by the fast probe to choose its hyper-parameters without ever looking at val. A class
    with a single image stays in the fit part.
    """
    held = stratified_split(labels, fraction, seed + 1_000_003)
    return np.flatnonzero(~held), np.flatnonzero(held)


def per_class_quota(labels: Sequence[int], fraction: float) -> int:
    """Images per class of a balanced subset with ``fraction`` of the labels: ``max(1, round(f*N/C))``."""
    counts = Counter(int(x) for x in labels)
    return max(1, int(round(fraction * len(labels) / max(1, len(counts)))))


def label_subset(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Sorted indices of a seeded, class-balanced subset holding ``fraction`` of the labels.

    Every class gives the same number of images, :func:`per_class_quota`; a class with fewer
    images gives all it has, and a note says so. Same labels, fraction and seed give the same
    subset. Returns (indices, notes).
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--label-fraction must be in (0, 1], got {fraction}")
    labels_arr = np.asarray(labels, dtype=np.int64)
    quota = per_class_quota(labels_arr.tolist(), fraction)
    chosen: list[np.ndarray] = []
    short: list[int] = []
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        rng = np.random.default_rng([seed, int(c), 7])
        if len(members) < quota:
            short.append(int(c))
        chosen.append(rng.permutation(members)[:quota])
    notes = []
    if short:
        notes.append(f"{len(short)} class(es) have fewer than {quota} train images; all of theirs are used")
    return np.sort(np.concatenate(chosen)), notes
