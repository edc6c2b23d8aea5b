"""Training objectives, one module per method, each an :class:`~swavctl.objective.base.Objective`.

``swav.py`` is SwAV (online Sinkhorn codes, swapped prediction, the queue in ``queue.py``); the
methods of the same lineage sit beside it as siblings: ``deepcluster_v2.py`` and ``sela_v2.py``, on
the memory bank, labels and loss they share in ``bank.py``. The training loop
gets its objective from :func:`build_objective` and calls only the interface in ``base.py``.
"""

from __future__ import annotations

import torch

from swavctl.config import Settings
from swavctl.config.method_settings import DEEPCLUSTER_V2, SELA_V2
from swavctl.objective.base import Objective, ObjectiveOutput, StepInputs
from swavctl.objective.deepcluster_v2 import DeepClusterV2Objective
from swavctl.objective.sela_v2 import SelaV2Objective
from swavctl.objective.swav import SwAVObjective

__all__ = [
    "DeepClusterV2Objective",
    "Objective",
    "ObjectiveOutput",
    "SelaV2Objective",
    "StepInputs",
    "SwAVObjective",
    "build_objective",
]


def build_objective(
    settings: Settings,
    *,
    queue_per_rank: int,
    device: torch.device,
    steps_per_epoch: int = 1,
    dataset_size: int = 0,
) -> Objective:
    """The objective of ``settings.method``, its memory on ``device``: the one place that picks
    the method (the loop never names one).

    ``queue_per_rank`` sizes SwAV's queue; ``steps_per_epoch`` and ``dataset_size`` the others'
    memory bank (L = steps x batch rows per rank) and their labels (one per image).
    """
    if settings.method == DEEPCLUSTER_V2:
        objective: Objective = DeepClusterV2Objective(
            settings, steps_per_epoch=steps_per_epoch, dataset_size=dataset_size
        )
    elif settings.method == SELA_V2:
        objective = SelaV2Objective(settings, steps_per_epoch=steps_per_epoch, dataset_size=dataset_size)
    else:
        objective = SwAVObjective.from_settings(settings, queue_per_rank=queue_per_rank)
    return objective.to(device)
