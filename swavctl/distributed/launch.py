"""Starting a job's workers: one process, N local workers, or one worker of torchrun / SLURM.

A :class:`Job` names the function its workers run, as ``module:function`` (pretraining,
:mod:`swavctl.train.job`, or an evaluation, :mod:`swavctl.eval.job`): the launcher imports no
job. Three ways in, one result shape (:class:`~swavctl.distributed.outcomes.Outcome`), so the
summary and ``--json`` do not depend on how the run was started:

1. **Inside a job** (``torchrun``, ``srun``; see :func:`swavctl.distributed.dist.detect_env`):
   this process is one worker. It joins the process group (NCCL on GPUs, gloo on CPUs, timeout
   ``dist.timeout_s``) and works; rank 0 prints the summary.
2. **``--gpus N`` (N > 1) or ``--gpus 0 --procs N`` (N > 1)**: this process becomes a
   torch.distributed.elastic agent (:func:`torch.distributed.launcher.api.elastic_launch`) that
   starts N workers on this machine, with a c10d rendezvous on 127.0.0.1 and no restarts
   (spawned: see :data:`START_METHOD_ENV`). Each worker gets the job as JSON and builds its
   own reporter (a console is not picklable); rank 0 draws the progress bar.
   Each worker leaves an :class:`Outcome` file; the agent combines them into one (naming the
   rank that failed first and why) and prints it here.
3. Otherwise: a plain single process.

Signals: pretraining workers install :class:`~swavctl.distributed.stop.StopFlag` before anything
else, and the agent forwards SIGTERM/SIGINT/SIGUSR1 it receives to them, so the run checkpoints at the
next step boundary and exits 143/130/138. Evaluation workers keep the default handlers: an
evaluation writes its outputs only at the end, so a signal simply ends it. When a worker fails,
the agent stops the others (SIGTERM, then SIGKILL after 30 s); with gloo the survivors see the
broken connection at once.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swavctl.distributed import dist, scratch
from swavctl.distributed.cores import usable_cores
from swavctl.distributed.outcomes import (
    CRASH,
    INTERRUPTED,
    OK,
    USER_ERROR,
    Outcome,
    ReportedFailure,
    combine_outcomes,
)
from swavctl.distributed.scratch import scratch_folder
from swavctl.distributed.stop import Interrupted, StopFlag
from swavctl.errors import UserError, messages

# Seconds the agent gives workers to checkpoint and exit after it forwards a signal. A worker that
# failed makes the agent stop the others with SIGTERM and SIGKILL after torchelastic's own 30 s.
SIGNAL_GRACE_S = 120
# Start method of local workers: "spawn", for CPU workers too. A fork copies the agent while its
# rendezvous store's threads run, and a lock one of them holds stays locked in the child: 1 of 60
# --procs 3 launches hung for good in a worker's TCPStore constructor (on a futex; the others
# waited in the gloo rendezvous), 0 of 60 spawned (docs/multi-node.md). Spawning costs one torch
# import per worker (about 2.5 s more per launch here) and is what torchrun does. The environment
# variable overrides it ("fork" starts faster and may hang).
START_METHOD_ENV = "SWAVCTL_START_METHOD"
# Name of the launcher's scratch folders in the temporary directory (outcomes and worker logs).
SCRATCH_PREFIX = "swavctl-launch-"


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Job:
    """What the workers of a launch run.

    ``work`` names the function every worker runs, as ``module:function``, which a worker process
    imports: ``work(args, device, stop)`` returns the run summary (``args`` are JSON-able, ``device``
    is this worker's, ``stop`` its :class:`StopFlag` or None). With ``stop_flag`` (pretraining) a
    worker installs a :class:`StopFlag` before anything else, so a signal is a checkpoint request;
    without it (an evaluation) the default handlers stay.
    """

    work: str
    args: dict[str, Any]
    use_cuda: bool
    timeout_s: float
    stop_flag: bool


def cuda_by_default(gpus: int | None) -> bool:
    """Whether workers use GPUs: ``--gpus`` > 0, or unset with CUDA available."""
    if gpus is not None:
        return gpus > 0
    import torch

    return torch.cuda.is_available()


def processes_asked(gpus: int | None, procs: int) -> int:
    """The processes ``--gpus``/``--procs`` ask for (one per GPU, or ``procs`` CPU workers), unchecked."""
    return gpus if gpus and gpus > 1 else procs


def plan_local_workers(gpus: int | None, procs: int) -> int:
    """How many worker processes to start on this machine for ``--gpus``/``--procs`` (1 = no launcher)."""
    if gpus is not None and gpus > 0:
        if procs > 1:
            raise UserError(
                f"--procs {procs} is for CPU workers (--gpus 0); on GPUs use --gpus N for N processes"
            )
        if gpus > 1:
            import torch

            found = torch.cuda.device_count()
            if found < gpus:
                raise UserError(messages.not_enough_gpus(gpus, found))
        return gpus
    if gpus is None and procs > 1 and cuda_by_default(gpus):
        raise UserError(f"--procs {procs} is for CPU workers: add --gpus 0 (or use --gpus N on GPUs)")
    return procs


def run_job(job: Job, *, gpus: int | None, procs: int, single: Any) -> Outcome:
    """Run ``job`` as the environment and ``--gpus``/``--procs`` ask: a job worker, local workers
    (:func:`plan_local_workers`), or ``single(stop)`` in this process.

    In a single process, bugs propagate with their traceback; user errors become an Outcome.
    """
    env = dist.detect_env()
    if env is not None:
        return _run_as_job_worker(job, env=env, launched=processes_asked(gpus, procs))
    nprocs = plan_local_workers(gpus, procs)
    if nprocs > 1:
        return launch_local(job, nprocs=nprocs)
    return _guarded(single, rank=0)


# ---------------------------------------------------------------------------------------------
# One worker


def _is_peer_failure(exc: BaseException) -> bool:
    """Heuristic: is this the failed collective that follows another rank's death?"""
    import torch.distributed as torch_dist

    dist_error = getattr(torch_dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    needles = (
        "connection closed by peer",
        "connection reset",
        "broken pipe",
        "gloo",
        "nccl",
        "socket",
        "timed out",
    )
    return any(needle in text for needle in needles)


def _guarded(body: Any, *, rank: int, stop: Any = None, reraise_bugs: bool = True) -> Outcome:
    """Run ``body(stop)`` and turn how it ended into an :class:`Outcome`."""
    try:
        summary = body(stop)
    except UserError as exc:
        return Outcome(USER_ERROR, exc.exit_code, str(exc), rank, error_type="UserError")
    except Interrupted as exc:
        return Outcome(INTERRUPTED, exc.exit_code, str(exc), rank, error_type="Interrupted")
    except ReportedFailure as exc:  # a non-finite loss, a checkpoint that could not be written
        return Outcome(exc.status, 1, str(exc), rank, error_type=type(exc).__name__)
    except Exception as exc:
        if reraise_bugs:
            raise
        return Outcome(
            CRASH,
            1,
            f"{type(exc).__name__}: {exc}".strip().splitlines()[0],
            rank,
            error_type=type(exc).__name__,
            peer_failure=_is_peer_failure(exc),
            traceback=traceback.format_exc(),
        )
    return Outcome(OK, 0, "", rank, summary=summary if isinstance(summary, dict) else summary.as_dict())


def _job_body(job: Job, env: dist.DistEnv, *, announce_join: bool = False) -> Any:
    """``body(stop)`` for :func:`_guarded`: join the process group, then run the job's work.

    With ``announce_join`` (a worker of torchrun or srun, whose peers may be slow to come or never
    come), rank 0 says where it waits for them, just before the blocking join: the signal handlers
    are already installed, so from that line on a Ctrl-C or SIGTERM ends the wait at once.
    """

    def body(stop_flag: Any) -> Any:
        if announce_join and env.rank == 0:
            print(
                f"waiting for all {env.world_size} processes to join the process group at "
                f"{env.master_addr}:{env.master_port} (rank 0; gives up after dist.timeout_s = "
                f"{job.timeout_s:g} s)",
                file=sys.stderr,
                flush=True,
            )
        device = dist.init_process_group(env, use_cuda=job.use_cuda, timeout_s=job.timeout_s)
        return _work(job)(job.args, device, stop_flag)

    return body


def _work_as_worker(job: Job, *, env: dist.DistEnv, stop: Any, announce_join: bool = False) -> Outcome:
    """Join the group, do the job, and report; never raises (a crash becomes an Outcome)."""
    body = _job_body(job, env, announce_join=announce_join)
    outcome = _guarded(body, rank=env.rank, stop=stop, reraise_bugs=False)
    if outcome.status == CRASH:
        prefix = f"[rank {env.rank}] "
        if outcome.peer_failure:
            print(f"{prefix}stopped: {outcome.message}", file=sys.stderr, flush=True)
        elif outcome.traceback:
            print("".join(prefix + line + "\n" for line in outcome.traceback.splitlines()), file=sys.stderr)
    # A worker reports on rank 0, or when it is the one that broke: a crash, or a user error met on
    # this rank only (an unreadable image with data.on_bad_image=error, data missing on one node),
    # which under torchrun or srun no other process can name. An error every rank meets alike is
    # then printed by each, marked with its rank.
    outcome.report = env.rank == 0 or (outcome.status in (CRASH, USER_ERROR) and not outcome.peer_failure)
    return outcome


def _work(job: Job) -> Any:
    """The function ``job.work`` names (``module:function``)."""
    module, _, name = job.work.partition(":")
    return getattr(importlib.import_module(module), name)


def _install_signal_handling(job: Job) -> Any:
    """Pretraining: a :class:`StopFlag` (checkpoint, then stop). Evaluation: the default handlers."""
    if job.stop_flag:
        stop = StopFlag()
        stop.install()
        return stop
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
    return None


def group_still_open() -> bool:
    """True while this process is in a process group (a failed job worker does not leave it)."""
    import torch.distributed as torch_dist

    return torch_dist.is_available() and torch_dist.is_initialized()


def exit_now(code: int) -> None:
    """Leave without tearing down a process group whose peers may be gone (that can hang)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _run_as_job_worker(job: Job, *, env: dist.DistEnv, launched: int) -> Outcome:
    """This process is one worker of torchrun or srun."""
    stop = _install_signal_handling(job)
    if env.rank == 0 and launched > 1 and launched != env.local_world_size:
        print(
            f"note: {env.source} started {env.local_world_size} workers on this node; --gpus/--procs "
            f"{launched} only chooses GPU or CPU workers here",
            file=sys.stderr,
        )
    outcome = _work_as_worker(job, env=env, stop=stop, announce_join=True)
    if outcome.exit_code == 0:
        dist.destroy_process_group()
    return outcome


def _elastic_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a worker started by :func:`launch_local` (a forked or spawned process)."""
    job = Job(**payload["job"])
    stop = _install_signal_handling(job)  # first: for pretraining, a signal is now a checkpoint request
    scratch.join(Path(payload["outcome_dir"]))  # the folder stays while this worker lives
    _apply_thread_count()
    env = dist.detect_env()
    if env is None:  # pragma: no cover - elastic always sets RANK/WORLD_SIZE/LOCAL_RANK
        raise RuntimeError("worker started without RANK/WORLD_SIZE/LOCAL_RANK")
    outcome = _work_as_worker(job, env=env, stop=stop)
    target = Path(payload["outcome_dir"]) / f"rank-{env.rank}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(outcome.to_json())
    tmp.replace(target)
    if outcome.exit_code != 0:
        if outcome.status == USER_ERROR:
            _wait_for_peer_outcomes(Path(payload["outcome_dir"]), env.world_size, USER_ERROR_GRACE_S)
        exit_now(outcome.exit_code)
    dist.destroy_process_group()
    return {"status": outcome.status}


#: Seconds a local worker that met a user error waits for the other workers' outcomes before it
#: exits. The agent stops the other workers as soon as one exits: without the wait, an error that
#: every rank meets (a class missing from train/) was told by the rank that got there first, and
#: the others as killed, whenever one rank's imports ran slower than another's by more than the
#: agent's 0.2 s poll (seen on a loaded 2-core machine). A user error met on one rank only (its
#: peers blocked in a collective) exits after the wait.
USER_ERROR_GRACE_S = 10.0


def _wait_for_peer_outcomes(folder: Path, world: int, limit_s: float) -> None:
    """Return when every rank's outcome file is in ``folder``, or after ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if all((folder / f"rank-{rank_}.json").exists() for rank_ in range(world)):
            return
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The local launcher


#: torch's loggers that report a local run's shutdown: torchelastic logs every step of it, and
#: ``torch.multiprocessing.spawn`` warns "Terminating process N via signal SIGTERM" when one worker
#: exits while another is still on its way out (both had reported the same user error, a few ms
#: apart). The outcome we print says what matters.
QUIETED_LOGGERS = ("torch.distributed", "torch.multiprocessing")


def _quiet_elastic_logs() -> None:
    """Silence :data:`QUIETED_LOGGERS` below CRITICAL in this (the launching) process."""
    for name in [*QUIETED_LOGGERS, *logging.root.manager.loggerDict]:
        if name.startswith(QUIETED_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _apply_thread_count() -> None:
    """Use ``OMP_NUM_THREADS`` threads in this worker.

    A forked worker (``SWAVCTL_START_METHOD=fork``) inherits the parent's torch, whose thread pool
    size was fixed before the launcher set the variable; without this, N workers each ran the
    parent's thread count and spin-waited on each other (2 CPU workers on 2 cores were 2x slower
    than one process).
    """
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))


def crowded_cpu_note(processes: int, cores: int) -> str | None:
    """A warning when the launcher starts more CPU worker processes than it has cores.

    Each step ends in all-reduces, so every step waits for the slowest process, and processes
    that share a core take turns: the run is slower than with one process per core. More
    processes than cores only serve to try the distributed path on a small machine.
    """
    if processes <= cores:
        return None
    return (
        f"{processes} CPU worker processes share {cores} core{'s' if cores != 1 else ''}: every step waits "
        f"for the slowest, so this is slower than {'one process' if cores == 1 else f'--procs {cores}'}"
    )


def launch_local(job: Job, *, nprocs: int) -> Outcome:
    """Start ``nprocs`` workers of ``job`` here (torch.distributed.elastic); combine their outcomes.

    The workers' outcomes and logs go to a scratch folder (:mod:`swavctl.distributed.scratch`), removed when
    the launch ends, or by a later launch when this one was killed.
    """
    cores = usable_cores()
    crowded = None if job.use_cuda else crowded_cpu_note(nprocs, cores)
    if crowded:
        print(f"warning: {crowded}", file=sys.stderr)
    saved_env = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS",)}
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nprocs))  # threads per worker
    started = time.monotonic()
    try:
        with scratch_folder(SCRATCH_PREFIX) as outcome_dir:
            outcomes, failures, received = _run_elastic(job, nprocs, outcome_dir)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    combined = combine_outcomes(outcomes, nprocs, failures=failures, received=received)
    combined.summary = combined.summary if combined.status == OK else None
    if combined.status != OK:
        combined.message += f" [after {time.monotonic() - started:.1f} s]"
    return combined


def _run_elastic(
    job: Job, nprocs: int, outcome_dir: Path
) -> tuple[dict[int, Outcome], dict[int, str], int | None]:
    """Run the workers through torch.distributed.elastic: their outcomes, failures and any signal."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_elastic_logs()  # after the imports: they set their loggers' levels
    payload = {"job": asdict(job), "outcome_dir": str(outcome_dir)}
    start_method = os.environ.get(START_METHOD_ENV) or "spawn"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"swavctl-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method=start_method,
        logs_specs=DefaultLogsSpecs(log_dir=str(outcome_dir / "logs")),
        local_addr="127.0.0.1",
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        shutdown_timeout=SIGNAL_GRACE_S,
    )
    failures: dict[int, str] = {}
    received: int | None = None
    try:
        elastic_launch(config, _elastic_worker)(payload)
    except ChildFailedError as exc:
        for rank_, failure in exc.failures.items():
            failures[rank_] = _describe_exit(failure.exitcode)
    except SignalException as exc:
        received = int(exc.sigval)
    return _read_outcomes(outcome_dir, nprocs), failures, received


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _read_outcomes(folder: Path, nprocs: int) -> dict[int, Outcome]:
    found: dict[int, Outcome] = {}
    for rank_ in range(nprocs):
        path = folder / f"rank-{rank_}.json"
        with contextlib.suppress(OSError, ValueError, TypeError):
            found[rank_] = Outcome.from_json(path.read_text())
    return found
