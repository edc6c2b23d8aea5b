"""Pretraining as a launcher job: :func:`run_pretrain` runs it as the environment asks.

One process, N local workers, or one worker of torchrun / SLURM (:mod:`swavctl.distributed.launch`).
Each worker runs :func:`work`; the fault tests' hooks are read here, at the process edge, and
handed to the loop.
"""

from __future__ import annotations

from typing import Any

from swavctl.config import Settings
from swavctl.distributed.launch import Job, cuda_by_default, run_job
from swavctl.distributed.outcomes import Outcome
from swavctl.errors import messages


def wants_cuda(settings: Settings) -> bool:
    """Whether pretraining workers train on GPUs (see :func:`cuda_by_default`)."""
    return cuda_by_default(settings.dist.gpus)


def run_pretrain(settings: Settings, *, fresh: bool = False) -> Outcome:
    """Run pretraining the way the environment and ``settings.dist`` ask for."""
    messages.check_trainable_prototypes(
        settings.method, settings.model.prototypes
    )  # before any worker starts
    job = Job(
        "swavctl.train.job:work",
        {"settings": settings.model_dump_json(), "fresh": fresh},
        use_cuda=wants_cuda(settings),
        timeout_s=settings.dist.timeout_s,
        stop_flag=True,
    )
    from swavctl.train.faults import FaultHooks
    from swavctl.train.loop import pretrain

    return run_job(
        job,
        gpus=settings.dist.gpus,
        procs=settings.dist.procs,
        single=lambda stop: pretrain(
            settings, reporter=_reporter(), fresh=fresh, stop=stop, faults=FaultHooks.from_env()
        ),
    )


def work(args: dict[str, Any], device: Any, stop: Any) -> Any:
    """One worker's pretraining (``args`` as :func:`run_pretrain` made them); its summary."""
    from swavctl.train.faults import FaultHooks
    from swavctl.train.loop import pretrain

    settings = Settings.model_validate_json(args["settings"])
    # The fault tests' hooks are read here, at the process edge, and handed to the loop.
    faults = FaultHooks.from_env()
    return pretrain(settings, reporter=_reporter(), fresh=bool(args["fresh"]), stop=stop, faults=faults)


def _reporter() -> Any:
    from swavctl.reporting.progress import RichReporter

    return RichReporter()
