"""Pictures with Pillow only: one member grid per prototype and a chart of cluster sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from swavctl.files.atomic import write_atomic

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
ACCENT = (52, 101, 164)
SECOND = (230, 145, 56)
PLACEHOLDER = (220, 220, 220)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=8)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Member:
    """One image in a grid, with a caption under its left edge (the confidence) and a tag under its
    right edge (the label), either of them optional."""

    path: Path
    caption: str = ""
    tag: str = ""


def thumbnail(path: Path, size: int) -> Image.Image:
    """The image fitted into a ``size`` square (aspect kept, padded); a grey tile if unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return Image.new("RGB", (size, size), PLACEHOLDER)
    small = max(rgb.size) < size
    # Small images (the 32 px digits) are enlarged without blurring; large ones are filtered.
    method = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
    return ImageOps.pad(rgb, (size, size), method=method, color=PLACEHOLDER)


def cluster_grid(
    title: str,
    rows: Sequence[tuple[str, Sequence[Member]]],
    out: Path,
    *,
    columns: int,
    thumb: int = 64,
) -> None:
    """A PNG with a title line and one labelled row of thumbnails per (row label, members)."""
    gap, label_width, caption_height = 4, 104, 14
    title_height = 26
    width = label_width + columns * (thumb + gap) + gap
    row_height = thumb + caption_height + gap
    height = title_height + len(rows) * row_height + gap
    canvas = Image.new("RGB", (max(width, 320), height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap + 2, 6), title, fill=INK, font=_font(14))
    for r, (label, members) in enumerate(rows):
        top = title_height + r * row_height
        draw.text((gap + 2, top + thumb // 2 - 6), label, fill=MUTED, font=_font(12))
        if not members:
            draw.text((label_width, top + thumb // 2 - 6), "(none)", fill=MUTED, font=_font(12))
        for c, member in enumerate(members[:columns]):
            left = label_width + c * (thumb + gap)
            canvas.paste(thumbnail(member.path, thumb), (left, top))
            if member.caption:
                draw.text((left, top + thumb + 1), member.caption, fill=MUTED, font=_font(10))
            if member.tag:
                tag = member.tag if len(member.tag) <= 12 else member.tag[:11] + "~"
                tag_width = draw.textlength(tag, font=_font(10))
                draw.text((left + thumb - tag_width, top + thumb + 1), tag, fill=INK, font=_font(10))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda handle: canvas.save(handle, format="PNG", optimize=True))


def _nice_step(span: float, ticks: int = 5) -> float:
    """A 1-2-5 step that cuts ``span`` into about ``ticks`` intervals."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return float(factor * power)
    return float(10 * power)


def _axes(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], y_max: float, title: str, x_label: str
) -> float:
    """Draw a frame with y ticks up to ``y_max``; returns the y value at the top of the frame."""
    left, top, right, bottom = box
    step = _nice_step(y_max)
    y_top = max(step, math.ceil(y_max / step) * step)
    draw.text((left, top - 22), title, fill=INK, font=_font(13))
    value = 0.0
    while value <= y_top + 1e-9:
        y = bottom - (bottom - top) * value / y_top
        draw.line([(left - 4, y), (right, y)], fill=(235, 235, 235))
        text = f"{value:g}"
        width = draw.textlength(text, font=_font(10))
        draw.text((left - 7 - width, y - 6), text, fill=MUTED, font=_font(10))
        value += step
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK)
    label_width = draw.textlength(x_label, font=_font(11))
    draw.text(((left + right - label_width) / 2, bottom + 18), x_label, fill=MUTED, font=_font(11))
    return y_top


def size_chart(sizes: np.ndarray, out: Path, *, assignment: str) -> None:
    """Two panels: sizes by rank (largest first, with the even share N/K), and a histogram of sizes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    k, total = len(sizes), int(sizes.sum())
    width, height = 900, 560
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    # Panel 1: every prototype's size, largest first.
    left, top, right, bottom = 70, 40, width - 20, 240
    ranked = np.sort(sizes)[::-1]
    peak = float(max(int(ranked.max()) if k else 0, 1))
    y_top = _axes(draw, (left, top, right, bottom), peak, f"cluster sizes ({assignment}), largest first", "")
    bar = (right - left) / max(k, 1)
    for i, size in enumerate(ranked.tolist()):
        if size:
            y = bottom - (bottom - top) * size / y_top
            if bar >= 3:
                pad = min(2.0, bar * 0.15)
                draw.rectangle([left + i * bar + pad, y, left + (i + 1) * bar - pad, bottom], fill=ACCENT)
            else:  # thousands of prototypes: one line each (the sizes are sorted, so they form an envelope)
                x = left + i * bar
                draw.line([(x, y), (x, bottom)], fill=ACCENT)
    if k:
        even = total / k
        y = bottom - (bottom - top) * even / y_top
        for x in range(left, right, 10):
            draw.line([(x, y), (min(x + 5, right), y)], fill=SECOND, width=2)
        draw.text((right - 150, y - 16), f"even share N/K = {even:.1f}", fill=SECOND, font=_font(11))
    draw.text(
        (left, bottom + 4), f"{k} prototypes, {int((sizes == 0).sum())} empty", fill=MUTED, font=_font(11)
    )

    # Panel 2: how many prototypes have each size. Bins of integer width w: the first bar counts the
    # empty prototypes, bar j >= 1 the sizes in [1 + (j - 1) w, 1 + j w).
    left, top, right, bottom = 70, 320, width - 20, height - 50
    upper = max(int(sizes.max()) if k else 1, 1)
    w = max(1, math.ceil(upper / 30))
    nbins = math.ceil(upper / w)
    bin_of = (sizes[sizes > 0] - 1) // w
    counts = [int((sizes == 0).sum())] + np.bincount(bin_of, minlength=nbins)[:nbins].tolist()
    x_label = "cluster size" if w == 1 else f"cluster size (bins of {w})"
    y_top = _axes(
        draw, (left, top, right, bottom), float(max(max(counts), 1)), "histogram of cluster sizes", x_label
    )
    bar = (right - left) / len(counts)
    pad = min(2.0, bar * 0.15)
    for i, count in enumerate(counts):
        if count:
            y = bottom - (bottom - top) * count / y_top
            colour = SECOND if i == 0 else ACCENT
            draw.rectangle([left + i * bar + pad, y, left + (i + 1) * bar - pad, bottom], fill=colour)
    every = max(1, len(counts) // 10)
    for i in range(len(counts)):
        if i == 0 or (i - 1) % every == 0:
            text = "0" if i == 0 else str(1 + (i - 1) * w)
            tw = draw.textlength(text, font=_font(10))
            draw.text((left + (i + 0.5) * bar - tw / 2, bottom + 3), text, fill=MUTED, font=_font(10))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda handle: canvas.save(handle, format="PNG", optimize=True))
