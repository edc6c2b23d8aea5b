"""Cluster health: how the images spread over the prototypes, and how the prototypes relate.

All functions are pure and work on per-prototype sizes ``n_k`` (k = 1..K, empty ones included)
or on the prototype matrix C (K x D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def size_entropy(sizes: np.ndarray) -> float:
    """Entropy (nats) of the assignment distribution ``p_k = n_k / N``: ``H = -sum_k p_k ln p_k``.

    ``H = ln K`` when every prototype gets the same number of images, ``0`` when one gets all.
    """
    counts = np.asarray(sizes, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: one cluster gives -0.0, printed "-0.000"


def entropy_ratio(sizes: np.ndarray) -> float:
    """``H / ln K``: 1 for a perfectly even spread over all K prototypes, 0 for one cluster."""
    k = len(sizes)
    return size_entropy(sizes) / math.log(k) if k > 1 else 0.0


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of the sizes over all K prototypes (empty ones count):

        G = sum_i sum_j |n_i - n_j| / (2 K^2 mean(n)),

    computed as ``G = 2 sum_i i n_(i) / (K sum n) - (K + 1) / K`` on the ascending sizes ``n_(i)``,
    i = 1..K. 0 means equal sizes; ``(K - 1) / K`` means one prototype holds everything.
    """
    values = np.sort(np.asarray(sizes, dtype=np.float64))
    k = len(values)
    total = values.sum()
    if k == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, k + 1, dtype=np.float64)
    return float(2.0 * (ranks * values).sum() / (k * total) - (k + 1) / k)


def largest_over_median(sizes: np.ndarray) -> float | None:
    """Largest cluster size over the median size of the non-empty prototypes (None when all are empty).

    Empty prototypes are left out of the median (they are counted separately), so the number says
    how uneven the clusters that exist are: 1 is perfectly even.
    """
    counts = np.asarray(sizes, dtype=np.float64)
    used = counts[counts > 0]
    if used.size == 0:
        return None
    return float(used.max() / np.median(used))


@dataclass
class PrototypeSimilarity:
    """Each prototype's nearest other prototype, and the pairs above the duplicate threshold."""

    nearest: np.ndarray  # K, int: index of the most similar other prototype
    nearest_cosine: np.ndarray  # K, float: its cosine similarity
    duplicates: list[tuple[int, int, float]]  # (i, j, cosine) with i < j and cosine > threshold
    threshold: float


def prototype_similarity(
    prototypes: torch.Tensor, *, threshold: float = 0.95, rows: int = 1024
) -> PrototypeSimilarity:
    """Cosine similarities between prototypes (rows normalised here), ``rows`` rows of K x K at a time.

    Memory is ``rows x K`` numbers; pairs with cosine strictly above ``threshold`` are near-duplicates.
    """
    weight = torch.nn.functional.normalize(prototypes.detach().double().cpu(), dim=1, p=2)
    k = weight.shape[0]
    if k < 2:
        raise ValueError("need at least two prototypes")
    nearest = np.zeros(k, dtype=np.int64)
    nearest_cos = np.zeros(k, dtype=np.float64)
    duplicates: list[tuple[int, int, float]] = []
    for start in range(0, k, rows):
        block = weight[start : start + rows] @ weight.t()  # rows x K
        index = torch.arange(block.shape[0])
        block[index, index + start] = -math.inf  # not its own neighbour
        best = block.max(dim=1)
        nearest[start : start + block.shape[0]] = best.indices.numpy()
        nearest_cos[start : start + block.shape[0]] = best.values.numpy()
        hits = torch.nonzero(block > threshold)
        for r, j in hits.tolist():
            i = start + r
            if i < j:
                duplicates.append((i, j, float(block[r, j])))
    duplicates.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    return PrototypeSimilarity(nearest, nearest_cos, duplicates, threshold)
