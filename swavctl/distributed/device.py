"""Which devices a process computes on: one rule for pretraining, evaluation and inspection."""

from __future__ import annotations

import torch

from swavctl.errors import UserError
from swavctl.errors.messages import not_enough_gpus


def pick_devices(gpus: int | None, *, in_this_process: bool = False) -> list[torch.device]:
    """The devices for ``--gpus``: the CPU for 0, CUDA devices otherwise (None: 1 if CUDA is available).

    Pretraining and evaluation run one process per GPU (:mod:`swavctl.distributed.launch` starts them and
    sets each one's current CUDA device), so each process computes on ``[current device]``.
    With ``in_this_process`` (inspection) this one process uses the first ``gpus`` CUDA devices.
    """
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    if gpus < 0:
        raise UserError(f"--gpus must be 0 or more, got {gpus}")
    if gpus == 0:
        return [torch.device("cpu")]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not in_this_process:
        if available == 0:
            raise UserError(not_enough_gpus(gpus, 0))
        return [torch.device("cuda", torch.cuda.current_device())]
    if gpus > available:
        raise UserError(not_enough_gpus(gpus, available))
    return [torch.device("cuda", i) for i in range(gpus)]
