"""Image folders on disk, torch-free: which files are images, and the folder a run reads.

Kept apart from :mod:`swavctl.data.images` (decoding, which needs torch and torchvision) so that a
command can refuse a missing or empty data folder before it imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from swavctl.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


def list_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursively, following folder links), in sorted order."""
    return list(_iter_image_files(root, ordered=True))


def resolve_image_root(path: str | Path, *, prefer: str = "train") -> tuple[Path, bool]:
    """Check a data folder and pick the folder to read.

    Returns (folder, used_subfolder): when ``path`` holds a ``prefer`` subfolder (``train/`` in an
    ImageNet-style root), that subfolder is used. Raises :class:`UserError` for a missing path,
    a file, or a folder without images.
    """
    root = Path(path).expanduser()
    check_data_folder(root)
    sub = root / prefer
    used_sub = sub.is_dir()
    folder = sub if used_sub else root
    if not any(True for _ in _iter_image_files(folder)):
        raise no_images(folder)
    return folder, used_sub


def check_data_folder(root: Path, hint: str = "") -> None:
    """Refuse a data path that does not exist or is not a folder (``hint`` ends the message)."""
    if not root.exists():
        raise UserError(f"data folder does not exist: {root}{hint}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder: {root}{hint}")


def no_images(folder: Path, hint: str = "") -> UserError:
    """The error for a data folder without image files (``hint`` ends the message)."""
    return UserError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}{hint}")


def _iter_image_files(root: Path, *, ordered: bool = False) -> Iterator[Path]:
    """Image files under ``root``, hidden names skipped, following folder links.

    A folder reached twice (a link to an ancestor, or two links to one folder) is read once:
    without that a link loop lists every image once per level, up to the kernel's link limit.
    """
    seen: set[tuple[int, int]] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if ordered:
            dirnames.sort()
            filenames = sorted(filenames)
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(folder) / name


def class_of(path: Path, root: Path) -> str | None:
    """The ImageFolder class of ``path`` (its first folder under ``root``), or None at top level."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None
