"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Caron et al. 2021 (DINO, arXiv 2104.14294, Sec. 4.1 and ``eval_knn.py``): features are
L2-normalised; for a query q the k train features with the highest cosine similarity
``s_i = <q, x_i>`` vote for their class with weight ``exp(s_i / T)``, T = 0.07, k = 20:

    score_c(q) = sum_{i in top-k(q)} exp(s_i / T) * [y_i = c]

The predicted class is the argmax; top-5 ranks the classes by score. No training is involved,
so the number measures the feature geometry directly. :func:`run_mode` is ``--mode knn``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from swavctl.distributed import dist
from swavctl.eval.options import KNN_K, KNN_TEMPERATURE

if TYPE_CHECKING:
    from swavctl.eval.context import EvalContext, ModeResult


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int | None = None,
) -> torch.Tensor:
    """Class vote scores (Q, C) of each query; see the module docstring for the formula.

    ``k`` is capped at the number of train features. Queries are processed ``chunk`` at a time so
    the (chunk x N) similarity matrix stays small (default: at most 2**26 entries, 256 MiB).
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    k = min(k, train.shape[0])
    if chunk is None:
        chunk = max(1, min(1024, 2**26 // max(1, train.shape[0])))
    out = torch.zeros(query_features.shape[0], num_classes, device=train.device)
    for start in range(0, query_features.shape[0], chunk):
        query = F.normalize(query_features[start : start + chunk].to(train.device).float(), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        out[start : start + chunk].scatter_add_(1, labels[idx], weights)
    return out


def run_mode(ctx: EvalContext, out: Path) -> ModeResult | None:
    """``--mode knn``: centre-view features of train and val, then :func:`knn_scores` on rank 0."""
    o = ctx.options
    train_f, train_y, _ = ctx.features(ctx.images("train", augment=False), "train features")
    val_f, val_y, val_idx = ctx.features(ctx.images("val", augment=False), "val features")
    if not dist.is_main():
        return None
    start = time.perf_counter()
    scores = knn_scores(
        train_f, train_y, val_f, num_classes=ctx.split.num_classes, k=o.k, temperature=o.temperature
    )
    ctx.timings["classifier"] = time.perf_counter() - start
    k = min(o.k, train_f.shape[0])
    extra = {"knn": {"k": k, "temperature": o.temperature}, "summary": {"k": k}}
    return scores, val_y, val_idx, int(train_f.shape[0]), extra
