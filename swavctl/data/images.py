"""Finding and decoding image files.

Decoding uses ``torchvision.io`` (JPEG, PNG, GIF, WebP) and falls back to Pillow for the rest
(BMP, TIFF, ...). Every image comes out as a uint8 RGB tensor (3 x H x W), whatever its mode:
grayscale, palette, RGBA (alpha dropped) or 16-bit (its top 8 bits, as torchvision scales a
16-bit PNG, whatever the container). EXIF orientation is not applied: pixels are used as stored,
as the official code's ``ImageFolder`` (PIL) does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from swavctl.errors import UserError

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (warning on every call);
# they remain the fastest decoders available without another dependency, and Pillow is the fallback.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


class BadImage(Exception):
    """A file that could not be decoded as an image."""


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
    if not root.exists():
        raise UserError(f"data folder does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder: {root}")
    sub = root / prefer
    used_sub = sub.is_dir()
    folder = sub if used_sub else root
    if not any(True for _ in _iter_image_files(folder)):
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    return folder, used_sub


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


def decode_bytes(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Decode encoded image bytes to a uint8 RGB tensor (3 x H x W); raises :class:`BadImage`."""
    if not data:
        raise BadImage("empty file")
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        if "Unsupported image file" not in str(exc):
            raise BadImage(str(exc).split(",")[-1].strip() or "cannot decode") from None
        image = _decode_with_pillow(data)
    if image.dim() == 4:  # animated GIF: the first frame
        image = image[0]
    if image.dtype != torch.uint8:
        image = TF.to_dtype(image, torch.uint8, scale=True)
    if image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise BadImage(f"unexpected decoded shape {tuple(image.shape)}")
    return image


def _decode_with_pillow(data: bytes) -> torch.Tensor:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                import numpy as np

                # 16-bit samples (Pillow's 32-bit "I" mode holds them too): the top byte, the same
                # rule for every image and every container (torchvision's for a 16-bit PNG).
                array = np.asarray(pil, dtype=np.int64).clip(0, 65535) >> 8
                gray = torch.from_numpy(array.astype(np.uint8))
                return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
            rgb = pil.convert("RGB")
            return TF.pil_to_tensor(rgb)
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # not an OSError: it would escape a worker
        raise BadImage(f"too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"not a readable image ({exc})") from None


def decode_file(path: Path) -> torch.Tensor:
    """Read and decode one image file; raises :class:`BadImage` for anything unreadable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror})") from None
    return decode_bytes(data, str(path))
