"""What an evaluation writes: ``eval.json``, a confusion-matrix picture (drawn with Pillow) and the
per-image predictions (``predictions.csv``).

Each file is replaced atomically, and ``eval.json`` is the commit marker: an evaluation removes
it before it starts and writes it last, so a folder with an ``eval.json`` holds one evaluation's
files, and one without it holds no complete evaluation.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from swavctl.files.atomic import write_atomic, write_text_atomic

EVAL_JSON = "eval.json"
CONFUSION_PNG = "confusion.png"
PREDICTIONS_CSV = "predictions.csv"


def write_predictions_csv(
    path: Path, files: Sequence[Path], labels: Sequence[str], scores: torch.Tensor, classes: Sequence[str]
) -> None:
    """One row per scored val image: ``path,label,prediction,top_score`` (written atomically).

    ``top_score`` is the predicted class's score: a logit (linear, fast, finetune) or a k-NN vote
    weight (knn).
    """
    top_score, predicted = scores.float().max(dim=1)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "label", "prediction", "top_score"])
    for file, label, pred, score in zip(files, labels, predicted.tolist(), top_score.tolist(), strict=True):
        writer.writerow([str(file), label, classes[pred], f"{score:.6g}"])
    write_text_atomic(path, text.getvalue())


def _blue(fraction: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    f = min(1.0, max(0.0, fraction))
    return (int(round(255 - 227 * f)), int(round(255 - 197 * f)), int(round(255 - 99 * f)))


def confusion_image(confusion: torch.Tensor, classes: Sequence[str], title: str) -> Any:
    """A PIL image of the row-normalised confusion matrix (rows: true class, columns: predicted).

    Each cell's shade is the fraction of the true class predicted as the column's class. Class
    names and per-cell percentages are drawn when the cells are large enough to hold them.
    """
    from PIL import Image, ImageDraw, ImageFont

    counts = confusion.double()
    c = counts.shape[0]
    rows = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    frac = (counts / rows).tolist()
    cell = max(1, min(48, 960 // max(1, c)))
    font = ImageFont.load_default()
    label_room = 0
    show_names = cell >= 12
    if show_names:
        label_room = min(120, 8 + 7 * max(len(str(name)) for name in classes))
    top = 28 + (label_room if show_names else 0)
    left = 8 + label_room
    width = left + c * cell + 8
    height = top + c * cell + 24
    image = Image.new("RGB", (max(width, 320), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=font)
    for i in range(c):
        for j in range(c):
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_blue(frac[i][j]))
            if cell >= 28 and counts[i, j] > 0:
                text = f"{100 * frac[i][j]:.0f}"
                ink = "white" if frac[i][j] > 0.5 else "black"
                draw.text((x0 + 3, y0 + cell // 2 - 5), text, fill=ink, font=font)
    if show_names:
        for i, name in enumerate(classes):
            short = str(name)[:16]
            draw.text((8, top + i * cell + cell // 2 - 5), short, fill="black", font=font)
            # Column names, written vertically by rotating a small text image.
            text_img = Image.new("RGB", (label_room, cell), "white")
            ImageDraw.Draw(text_img).text((2, cell // 2 - 5), short, fill="black", font=font)
            rotated = text_img.rotate(90, expand=True)
            image.paste(rotated, (left + i * cell, 28))
    draw.text((8, height - 18), "rows: true class, columns: predicted class", fill="black", font=font)
    return image


def write_confusion_png(path: Path, confusion: torch.Tensor, classes: Sequence[str], title: str) -> None:
    """Save :func:`confusion_image` as a PNG."""
    image = confusion_image(confusion, classes, title)
    write_atomic(path, lambda handle: image.save(handle, format="PNG"))
