"""DeepCluster-v2: spherical k-means over the memory bank, centroids as fixed prototypes.

Caron et al. 2020 (arXiv 2006.09882, Sec. 5.1, eq. 8-9 and 11; official code
``facebookresearch/swav@06b1b7c:main_deepclusterv2.py``, DC below). The bank, the labels and the
loss are :mod:`swavctl.objective.bank`'s; this module adds the clustering, at every epoch start
(``cluster_memory``, DC:345-413), for each head h (prototype set of K_h):

1. initial centroids: K_h rows of rank 0's bank, ``randperm(N_0)[:K_h]``, broadcast (DC:352-358);
   drawn from a generator seeded by (train.seed, epoch), so a resume draws the same;
2. ``deepcluster.kmeans_iterations`` (10) rounds of E-step (argmax of cosine) and M-step (sums and
   counts all-reduced; an empty cluster keeps its centroid; rows L2-normalised), then a final
   E-step (:func:`~swavctl.clustering.spherical_kmeans`);
3. the centroids are copied into prototype set h (DC:389), and each banked image gets its
   cluster as its label (-100 for an image in no rank's bank).

The prototypes never take a gradient (their gradients are dropped after every backward: the
official ``freeze_prototypes_niters`` of 300000 outlasts every official run), so SGD, momentum and
weight decay never move them; only the copy does.
"""

from __future__ import annotations

import torch

from swavctl.clustering import initial_centroids, spherical_kmeans
from swavctl.config import Settings
from swavctl.errors import UserError
from swavctl.model.swav import SwAV
from swavctl.objective.bank import BankObjective, local_labels
from swavctl.objective.base import freeze_prototype_grads


class DeepClusterV2Objective(BankObjective):
    """DeepCluster-v2's part of a step; the rest is :class:`BankObjective`'s."""

    checkpoint_key = "deepcluster_bank"
    title = "DeepCluster-v2"

    def __init__(self, settings: Settings, *, steps_per_epoch: int, dataset_size: int) -> None:
        super().__init__(settings, steps_per_epoch=steps_per_epoch, dataset_size=dataset_size)
        self.iterations = settings.deepcluster.kmeans_iterations
        if self.bank.length < max(self.sizes):
            raise UserError(
                f"DeepCluster-v2 draws its {max(self.sizes)} initial centroids from one process's memory "
                f"bank, which holds {self.bank.length} images (steps per epoch x batch): use fewer "
                "prototypes (model.prototypes) or more images per process"
            )

    def cluster(self, epoch: int, model: SwAV) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        labels = []
        filled = self.bank.filled()
        for head, layer in enumerate(model.prototype_sets):
            rows, filled = self.bank_rows(head)
            start = initial_centroids(rows, self.sizes[head], generator)
            result = spherical_kmeans(rows, start, iterations=self.iterations)
            with torch.no_grad():
                layer.weight.copy_(result.centroids.to(layer.weight.dtype))
            labels.append(result.assignments)
        return local_labels(labels, filled)

    def after_backward(self, model: SwAV, step: int) -> None:
        freeze_prototype_grads(model)
