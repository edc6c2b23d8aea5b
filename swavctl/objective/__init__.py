"""Training objectives, one module per method, each an :class:`~swavctl.objective.base.Objective`.

``swav.py`` is SwAV (online Sinkhorn codes, swapped prediction, the queue in ``queue.py``); the
methods of the same lineage (DeepCluster-v2, SeLa-v2) sit beside it as siblings. The training loop
gets its objective from :func:`build_objective` and calls only the interface in ``base.py``.
"""

from __future__ import annotations

import torch

from swavctl.config import Settings
from swavctl.objective.base import Objective, ObjectiveOutput, StepInputs
from swavctl.objective.swav import SwAVObjective

__all__ = ["Objective", "ObjectiveOutput", "StepInputs", "SwAVObjective", "build_objective"]


def build_objective(settings: Settings, *, queue_per_rank: int, device: torch.device) -> Objective:
    """The objective ``settings`` train with, its memory on ``device``.

    SwAV is the only method so far; a ``method`` setting choosing among siblings is decided here,
    and nowhere in the loop.
    """
    return SwAVObjective.from_settings(settings, queue_per_rank=queue_per_rank).to(device)
