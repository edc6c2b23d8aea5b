"""SeLa-v2: offline Sinkhorn-Knopp over the memory bank, learned prototypes.

Caron et al. 2020 (arXiv 2006.09882, App. D, eq. 10 and 12): SeLa (Asano et al., ICLR 2020) with
SwAV's improvements. The official repository has no SeLa-v2 code (issue #59 says: start from
DeepCluster-v2, replace k-means by Sinkhorn-Knopp and drop the centroid copy), so this module is
that: the bank, labels and loss are :mod:`swavctl.objective.bank`'s, and at every epoch start each
head h's labels solve SeLa's equal-partition problem over the whole (sharded) bank with the
current prototypes (:func:`~swavctl.clustering.offline_sinkhorn`, in float64, the row sums
all-reduced so the equipartition holds over the dataset).

The choices the paper leaves open (methods-reference §3), as made here:

1. epsilon and the stop: ``P = exp(s / sela.epsilon)`` with ``s`` the cosine of bank row and
   prototype; epsilon = tau / lambda, and the default 0.004 is SeLa's lambda = 25 at tau = 0.1.
   SeLa's stop: ``sum_i |c_i / c_new,i - 1| <= sela.tolerance`` (0.1), checked every
   ``sela.check_every`` (10) iterations, at most ``sela.max_iterations``;
2. hard codes: one label per image, ``argmax_k Q_ki`` (SeLa's, and what DeepCluster-v2 trains on);
3. head h clusters bank crop ``h mod len(swav.assignment_crops)`` and every crop is trained on the
   label, as in DeepCluster-v2;
4. epoch 0's labels: the ``init_memory`` pass, then the Sinkhorn solve with the initial (random)
   prototypes, not SeLa's random balanced labels;
5. prototypes: learned by SGD with the rest (LARC and weight decay alike), L2-normalised before
   every step as SwAV's, their gradients dropped for the first ``swav.freeze_prototypes_steps``;
6. the solve is global (sums over images all-reduced), not per rank;
7. images in no bank (the sampler's dropped tail) are ignored (-100), as in DeepCluster-v2;
8. memory: the solve reads the bank in blocks and keeps a per-rank N_local x K float64 kernel only
   when it is at most 128 MiB; never an N x K matrix over the dataset.
"""

from __future__ import annotations

import torch

from swavctl.clustering import offline_sinkhorn
from swavctl.config import Settings
from swavctl.model.swav import SwAV
from swavctl.objective.bank import BankObjective, local_labels
from swavctl.objective.base import freeze_prototype_grads


class SelaV2Objective(BankObjective):
    """SeLa-v2's part of a step; the rest is :class:`BankObjective`'s."""

    checkpoint_key = "sela_bank"
    title = "SeLa-v2"

    def __init__(self, settings: Settings, *, steps_per_epoch: int, dataset_size: int) -> None:
        super().__init__(settings, steps_per_epoch=steps_per_epoch, dataset_size=dataset_size)
        sela = settings.sela
        self.epsilon, self.tolerance = sela.epsilon, sela.tolerance
        self.check_every, self.max_iterations = sela.check_every, sela.max_iterations
        self.freeze_prototypes_steps = settings.swav.freeze_prototypes_steps

    def cluster(self, epoch: int, model: SwAV) -> torch.Tensor:
        model.normalize_prototypes()
        labels = []
        filled = self.bank.filled()
        for head, layer in enumerate(model.prototype_sets):
            rows, filled = self.bank_rows(head)
            result = offline_sinkhorn(
                rows,
                layer.weight.detach(),
                epsilon=self.epsilon,
                tol=self.tolerance,
                check_every=self.check_every,
                max_iterations=self.max_iterations,
            )
            labels.append(result.labels)
        return local_labels(labels, filled)

    def before_forward(self, model: SwAV) -> None:
        model.normalize_prototypes()

    def after_backward(self, model: SwAV, step: int) -> None:
        if step < self.freeze_prototypes_steps:
            freeze_prototype_grads(model)
