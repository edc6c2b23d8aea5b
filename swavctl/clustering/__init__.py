"""Clustering for DeepCluster-v2 and SeLa-v2 (arXiv 2006.09882, §5.1 and App. D): the pure math.

Torch-only functions with explicit arguments; no settings, no training loop. Reductions go
through :mod:`swavctl.distributed.dist`, so each function is a single-process computation without a process
group and a dataset-wide one with it.

* :mod:`~swavctl.clustering.spherical_kmeans`: DeepCluster-v2's k-means (``cluster_memory``);
* :mod:`~swavctl.clustering.offline_sinkhorn`: SeLa's Sinkhorn-Knopp over the whole bank;
* :mod:`~swavctl.clustering.hard_label_loss`: cross-entropy against hard labels on every crop;
* :mod:`~swavctl.clustering.bank`: the per-rank memory bank and the gather of labels;
* :mod:`~swavctl.clustering.sela_schedule`: SeLa's balanced initial labels and solve schedule.
"""

from __future__ import annotations

from swavctl.clustering.bank import MemoryBank, gather_dataset_labels
from swavctl.clustering.hard_label_loss import IGNORE_INDEX, hard_label_loss
from swavctl.clustering.offline_sinkhorn import OfflineSinkhornResult, offline_sinkhorn
from swavctl.clustering.sela_schedule import balanced_initial_labels, sela_solve_epochs, sela_solve_steps
from swavctl.clustering.spherical_kmeans import (
    KMeansResult,
    assign_to_nearest,
    initial_centroids,
    spherical_kmeans,
)

__all__ = [
    "IGNORE_INDEX",
    "KMeansResult",
    "MemoryBank",
    "OfflineSinkhornResult",
    "assign_to_nearest",
    "balanced_initial_labels",
    "gather_dataset_labels",
    "hard_label_loss",
    "initial_centroids",
    "offline_sinkhorn",
    "sela_solve_epochs",
    "sela_solve_steps",
    "spherical_kmeans",
]
