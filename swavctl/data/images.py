"""Finding and decoding image files.

Decoding uses ``torchvision.io`` (JPEG, PNG, GIF, WebP) and falls back to Pillow for the rest
(BMP, TIFF, ...). Every image comes out as a uint8 RGB tensor (3 x H x W), whatever its mode:
grayscale, palette, RGBA (alpha dropped) or 16-bit (its top 8 bits, as torchvision scales a
16-bit PNG, whatever the container). EXIF orientation is not applied: pixels are used as stored,
as the official code's ``ImageFolder`` (PIL) does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (warning on every call);
# they remain the fastest decoders available without another dependency, and Pillow is the fallback.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)


class BadImage(Exception):
    """A file that could not be decoded as an image."""


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
