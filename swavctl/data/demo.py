"""The built-in demo dataset: scikit-learn's bundled handwritten digits, written as PNG files.

1,797 real 8x8 grayscale digits (0-16 intensity), upscaled to ``DEMO_SIZE`` px and written once into
a cache folder as an ImageFolder tree with a seeded, class-stratified ``train/`` and ``val/`` split.
Nothing is downloaded: the images ship inside scikit-learn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "demo"
DEMO_SIZE = 32
DEMO_VAL_FRACTION = 0.2
DEMO_SEED = 0
_VERSION = "digits-v1"


def cache_root() -> Path:
    """The swavctl cache folder: ``$SWAVCTL_CACHE`` or ``~/.cache/swavctl``."""
    env = os.environ.get("SWAVCTL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "swavctl"


def demo_dataset() -> Path:
    """Return the demo ImageFolder root (with ``train/`` and ``val/``), writing it on first use."""
    root = cache_root() / _VERSION
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        _write_digits(staging)
        (staging / ".complete").write_text("ok\n")
        try:
            os.replace(staging, root)
        except OSError:  # another process finished first
            if not (root / ".complete").exists():
                shutil.rmtree(root, ignore_errors=True)
                os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_digits(target: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images  # (1797, 8, 8) in 0..16
    labels = digits.target
    rng = np.random.default_rng(DEMO_SEED)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        is_val[members[: round(len(members) * DEMO_VAL_FRACTION)]] = True
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        split = "val" if is_val[index] else "train"
        folder = target / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        gray.resize((DEMO_SIZE, DEMO_SIZE), Image.Resampling.BICUBIC).save(folder / f"{index:04d}.png")


def anchored_data_path(path: str | None) -> str | None:
    """``path`` made absolute against the current folder (``demo``, empty and None unchanged).

    Runs record their settings; a relative folder recorded there would be read against whatever
    folder a later ``eval-linear`` or ``inspect-clusters`` runs from.
    """
    if not path or path == DEMO_NAME:
        return path
    return str(Path(path).expanduser().absolute())


def resolve_data_path(path: str) -> Path:
    """Map the name ``demo`` to the demo folder; other paths are returned as given."""
    return demo_dataset() if path == DEMO_NAME else Path(path).expanduser()
