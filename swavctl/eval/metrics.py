"""Classification metrics from class scores: top-k accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (N,): the true label is among the ``k`` highest scores (k is capped at the class count).

    Ties are broken by ``torch.topk``'s order, as in the official evaluation code.
    """
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels.view(-1, 1)).any(dim=1)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass
class Accuracy:
    """Top-1, top-5 (top-min(5, C)), per-class top-1 (None for classes without val images), confusion."""

    top1: float
    top5: float
    top5_k: int
    per_class: list[float | None]
    confusion: torch.Tensor
    n: int


def accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Accuracy:
    """All metrics of class ``scores`` (N, C) against integer ``labels`` (N,)."""
    scores = scores.detach().float().cpu()
    labels = labels.detach().long().cpu()
    n = int(labels.numel())
    if n == 0:
        raise ValueError("no validation images to score")
    top1 = topk_correct(scores, labels, 1)
    top5 = topk_correct(scores, labels, 5)
    confusion = confusion_matrix(scores.argmax(dim=1), labels, num_classes)
    totals = confusion.sum(dim=1)
    per_class = [
        float(confusion[c, c]) / float(totals[c]) if int(totals[c]) > 0 else None for c in range(num_classes)
    ]
    return Accuracy(
        top1=float(top1.float().mean()),
        top5=float(top5.float().mean()),
        top5_k=min(5, num_classes),
        per_class=per_class,
        confusion=confusion,
        n=n,
    )
