"""The SwAV network: backbone, projection head and prototypes (arXiv 2006.09882, Sec. 3).

This module knows nothing of devices, DDP, autocast or checkpoints; the training loop wraps
those at the edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swavctl.model.backbones import build_backbone


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear(d, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out), the official layout.

    With ``hidden_dim == 0`` the head is a single Linear(d, out). The linear layers keep their
    biases, as in the official checkpoints, so those import without loss.
    """
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def equal_size_runs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Split crop indices into runs of consecutive crops with equal size: [(start, end), ...]."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[start]:
            runs.append((start, i))
            start = i
    return runs


class SwAV(nn.Module):
    """Backbone + projection head + prototypes (a bias-free linear layer with unit-norm rows).

    ``forward(crops)`` takes a list of V tensors (B x 3 x s_v x s_v) and returns the
    L2-normalised embeddings z (V*B x D) and the prototype scores z C^T (V*B x K), crops in order.
    The backbone runs once per run of equal-size crops (the multi-resolution forward).
    """

    def __init__(self, arch: str, hidden_dim: int, embedding_dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch)
        self.head = projection_head(self.feature_dim, hidden_dim, embedding_dim)
        self.prototypes = nn.Linear(embedding_dim, num_prototypes, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype row in place, without gradient (done before every step)."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1, p=2))

    def features(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all crops, concatenated in crop order."""
        sizes = [int(c.shape[-1]) for c in crops]
        outputs = [self.backbone(torch.cat(list(crops[start:end]))) for start, end in equal_size_runs(sizes)]
        return torch.cat(outputs)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The L2-normalised projection z of backbone features."""
        return F.normalize(self.head(features), dim=1, p=2)

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.embed(self.features(crops))
        return embeddings, self.prototypes(embeddings)
