"""Evaluation as a launcher job: :func:`run_evaluation` runs ``swavctl eval-linear`` as asked.

``--gpus N`` (N > 1) or ``--gpus 0 --procs N`` start N local workers; under torchrun or srun this
process is one worker (:mod:`swavctl.distributed.launch`). Each worker runs :func:`work`.
"""

from __future__ import annotations

from typing import Any

from swavctl.distributed.launch import Job, cuda_by_default, run_job
from swavctl.distributed.outcomes import Outcome

#: Process-group timeout of a multi-process evaluation (seconds), as pretraining's default.
EVAL_TIMEOUT_S = 1800.0


def run_evaluation(options: Any) -> Outcome:
    """Run ``swavctl eval-linear`` (``options``: :class:`swavctl.eval.options.EvalOptions`) as asked.

    ``--gpus N`` (N > 1) or ``--gpus 0 --procs N`` start N local workers; under torchrun or srun
    this process is one worker. The summary is rank 0's.
    """
    from swavctl.eval.run import run_eval
    from swavctl.reporting.progress import StageProgress

    job = Job(
        "swavctl.eval.job:work",
        {"options": options.model_dump_json()},
        use_cuda=cuda_by_default(options.gpus),
        timeout_s=EVAL_TIMEOUT_S,
        stop_flag=False,
    )
    return run_job(
        job,
        gpus=options.gpus,
        procs=options.procs,
        single=lambda stop: run_eval(options, reporter=StageProgress()),
    )


def work(args: dict[str, Any], device: Any, stop: Any) -> Any:
    """One worker's evaluation (``args`` as :func:`run_evaluation` made them); its summary."""
    from swavctl.eval.options import EvalOptions
    from swavctl.eval.run import run_eval
    from swavctl.reporting.progress import StageProgress

    return run_eval(EvalOptions.model_validate_json(args["options"]), reporter=StageProgress(), device=device)
