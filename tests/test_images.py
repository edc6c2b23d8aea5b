"""Decoding every supported format and mode to uint8 RGB, and rejecting what is not an image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swavctl.data.images import BadImage, decode_bytes
from swavctl.errors import UserError
from swavctl.files.image_folder import class_of, list_images, resolve_image_root

RGB = np.random.default_rng(0).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "P"),
        ("PNG", "RGBA"),
        ("PNG", "LA"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("BMP", "L"),
        ("WEBP", "RGB"),
        ("WEBP", "RGBA"),
        ("TIFF", "RGB"),
    ],
)
def test_formats_and_modes_decode_to_rgb(fmt: str, mode: str) -> None:
    source = Image.fromarray(RGB).convert(mode)
    image = decode_bytes(encode(source, fmt))
    assert image.dtype == torch.uint8 and image.shape == (3, 9, 7)
    if fmt in ("PNG", "BMP", "TIFF", "GIF") and mode in ("RGB", "L", "P"):
        # Lossless: equals Pillow's own RGB conversion.
        expected = torch.from_numpy(np.array(source.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(image, expected)


def test_sixteen_bit_png_scales_to_eight_bits() -> None:
    values = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    image = decode_bytes(encode(Image.fromarray(values), "PNG"))
    assert image.dtype == torch.uint8
    assert image[0].tolist() == [[0, 100], [255, 7]]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


@pytest.mark.parametrize("peak", [200, 65535])
def test_sixteen_bit_tiff_scales_as_png_whatever_its_content(peak: int) -> None:
    """The top byte for every image: a dark 16-bit TIFF (all samples < 256) is not read as 8-bit."""
    values = np.array([[0, 100], [peak, 7]], dtype=np.uint16)
    png, tiff = (decode_bytes(encode(Image.fromarray(values), fmt)) for fmt in ("PNG", "TIFF"))
    assert torch.equal(tiff, png)
    assert tiff[0].tolist() == [[0, 0], [peak >> 8, 0]]


def test_a_decompression_bomb_is_a_bad_image_not_a_crash() -> None:
    """182 megapixels in a 33 KB file: Pillow's DecompressionBombError is no OSError, and escaped
    the data workers (killing the run even with data.on_bad_image=skip)."""
    bomb = io.BytesIO()
    Image.new("1", (14000, 13000)).save(bomb, "TIFF", compression="tiff_deflate")
    with pytest.raises(BadImage, match="too large to decode safely"):
        decode_bytes(bomb.getvalue())


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)).convert("P") for v in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = decode_bytes(buffer.getvalue())
    assert image.shape == (3, 4, 4)


def test_one_pixel_image() -> None:
    assert decode_bytes(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")).flatten().tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello, not an image",
        encode(Image.fromarray(RGB), "JPEG")[:60],
        b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
    ],
)
def test_bad_payloads_raise_bad_image(payload: bytes) -> None:
    with pytest.raises(BadImage):
        decode_bytes(payload)


def test_listing_and_root_resolution(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ("a/x.PNG", "a/deep/y.jpg", "b.webp", ".hidden/z.png", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["b.webp", "a/x.PNG", "a/deep/y.jpg"]
    # Links: a loop back to an ancestor, and a second link to one folder, are each read once.
    (tmp_path / "a" / "deep" / "loop").symlink_to(tmp_path / "a")
    (tmp_path / "c").symlink_to(tmp_path / "a" / "deep")
    again = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert sorted(Path(p).name for p in again) == ["b.webp", "x.PNG", "y.jpg"], again
    (tmp_path / "a" / "deep" / "loop").unlink()
    (tmp_path / "c").unlink()
    assert class_of(tmp_path / "a" / "deep" / "y.jpg", tmp_path) == "a"
    assert class_of(tmp_path / "b.webp", tmp_path) is None
    assert resolve_image_root(tmp_path) == (tmp_path, False)
    (tmp_path / "train" / "c").mkdir(parents=True)
    (tmp_path / "train" / "c" / "i.png").write_bytes(b"x")
    assert resolve_image_root(tmp_path) == (tmp_path / "train", True)
    with pytest.raises(UserError, match="does not exist"):
        resolve_image_root(tmp_path / "nope")
