"""The SwAV network: backbone, projection head and prototypes (arXiv 2006.09882, Sec. 3).

This module knows nothing of devices, DDP, autocast or checkpoints; the training loop wraps
those at the edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


#: The scores of one forward pass: one tensor (V*B x K) for a single prototype set, a list of
#: them (V*B x K_h, one per set) for several.
Scores = torch.Tensor | list[torch.Tensor]


def prototype_set_sizes(prototypes: int | Sequence[int]) -> list[int]:
    """The size of each prototype set of ``model.prototypes``: ``K`` gives ``[K]``, a list itself."""
    return [prototypes] if isinstance(prototypes, int) else [int(k) for k in prototypes]


def prototype_set_keys(sets: int) -> list[str]:
    """The state-dict key of each prototype set's weight (K_h x D) of a model with ``sets`` sets.

    One set keeps the layout every SwAV model has had, ``prototypes.weight``; several sets are
    ``prototypes.0.weight``, ``prototypes.1.weight``, ... (an ``nn.ModuleList``). A one-element
    list of sizes is one set, so it has the one-set key: the layout follows the number of sets.
    """
    if sets < 1:
        raise ValueError(f"a model has at least one prototype set, got {sets}")
    return ["prototypes.weight"] if sets == 1 else [f"prototypes.{h}.weight" for h in range(sets)]


def as_score_sets(scores: Scores) -> list[torch.Tensor]:
    """The scores of :meth:`SwAV.forward` as one tensor per prototype set, whatever their number."""
    return list(scores) if isinstance(scores, list) else [scores]


class PrototypeSets(nn.ModuleList):
    """Several prototype sets C_h, one bias-free ``nn.Linear(D, K_h)`` each (keys ``h.weight``).

    The official ``MultiPrototypes`` (DeepCluster-v2, SeLa-v2): ``forward(z)`` gives the list
    ``[z C_h^T for each h]``. There is no one ``weight``: reading it raises an AttributeError
    that points at :attr:`SwAV.prototype_sets`, so code written for one set fails clearly here.
    """

    def __init__(self, embedding_dim: int, sizes: Sequence[int]) -> None:
        super().__init__(nn.Linear(embedding_dim, k, bias=False) for k in sizes)

    def forward(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        return [layer(embeddings) for layer in self]

    @property
    def weight(self) -> torch.Tensor:
        raise AttributeError(_NO_ONE_WEIGHT.format(len(self)))

    def __getattr__(self, name: str) -> Any:
        if name == "weight":  # the property's AttributeError lands here; keep its message
            raise AttributeError(_NO_ONE_WEIGHT.format(len(self)))
        return super().__getattr__(name)


_NO_ONE_WEIGHT = (
    "a model with {} prototype sets has no single prototypes.weight: use model.prototype_sets[h].weight"
)


class SwAV(nn.Module):
    """Backbone + projection head + prototypes (bias-free linear layers with unit-norm rows).

    ``forward(crops)`` takes a list of V tensors (B x 3 x s_v x s_v) and returns the
    L2-normalised embeddings z (V*B x D) and the prototype scores z C^T, crops in order (row
    ``v*B + b`` is crop v of sample b). The backbone runs once per run of equal-size crops (the
    multi-resolution forward).

    ``num_prototypes`` is K (one set, SwAV's C of K x D: ``self.prototypes`` is one
    ``nn.Linear`` and the scores one V*B x K tensor) or a list of set sizes ``[K_0, K_1, ...]``
    (several sets C_h, as DeepCluster-v2 and SeLa-v2 use, e.g. 3 x 3000: ``self.prototypes`` is a
    :class:`PrototypeSets` of ``nn.Linear(D, K_h)`` and the scores a list with one V*B x K_h tensor
    per set, the official ``MultiPrototypes`` output). A one-element list is one set.
    :attr:`prototype_sets` and :func:`as_score_sets` give either case as a list.
    """

    prototypes: nn.Linear | PrototypeSets

    def __init__(
        self, arch: str, hidden_dim: int, embedding_dim: int, num_prototypes: int | Sequence[int]
    ) -> None:
        super().__init__()
        sizes = prototype_set_sizes(num_prototypes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"prototype set sizes must be positive, got {sizes}")
        self.backbone, self.feature_dim = build_backbone(arch)
        self.head = projection_head(self.feature_dim, hidden_dim, embedding_dim)
        if len(sizes) == 1:
            self.prototypes = nn.Linear(embedding_dim, sizes[0], bias=False)
        else:
            self.prototypes = PrototypeSets(embedding_dim, sizes)
        self.normalize_prototypes()

    @property
    def prototype_sets(self) -> list[nn.Linear]:
        """The prototype layers, one per set (one element for a single set)."""
        if isinstance(self.prototypes, nn.Linear):
            return [self.prototypes]
        return [layer for layer in self.prototypes if isinstance(layer, nn.Linear)]

    @property
    def prototype_weights(self) -> torch.Tensor | list[torch.Tensor]:
        """The prototype weights as :meth:`forward`'s scores come: one K x D tensor for one set, a
        list of K_h x D tensors for several."""
        weights = [layer.weight for layer in self.prototype_sets]
        return weights[0] if isinstance(self.prototypes, nn.Linear) else weights

    @property
    def prototype_sizes(self) -> list[int]:
        """K_h of each set, in set order."""
        return [layer.out_features for layer in self.prototype_sets]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype row of every set in place, without gradient (done before
        every SwAV step)."""
        for layer in self.prototype_sets:
            layer.weight.copy_(F.normalize(layer.weight, dim=1, p=2))

    def features(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all crops, concatenated in crop order."""
        sizes = [int(c.shape[-1]) for c in crops]
        outputs = [self.backbone(torch.cat(list(crops[start:end]))) for start, end in equal_size_runs(sizes)]
        return torch.cat(outputs)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The L2-normalised projection z of backbone features."""
        return F.normalize(self.head(features), dim=1, p=2)

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Scores]:
        embeddings = self.embed(self.features(crops))
        return embeddings, self.prototypes(embeddings)
