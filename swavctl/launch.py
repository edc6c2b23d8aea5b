"""Starting ``swavctl pretrain`` and ``swavctl eval-linear``: one process, N local workers, or one
worker of torchrun / SLURM.

A :class:`Job` names what the workers run (pretraining, :func:`swavctl.train.loop.pretrain`, or an
evaluation, :func:`swavctl.eval.run.run_eval`). Three ways in, one result shape
(:class:`Outcome`), so the summary and ``--json`` do not depend on how the run was started:

1. **Inside a job** (``torchrun``, ``srun``; see :func:`swavctl.dist.detect_env`): this process is
   one worker. It joins the process group (NCCL on GPUs, gloo on CPUs, timeout
   ``dist.timeout_s``) and works; rank 0 prints the summary.
2. **``--gpus N`` (N > 1) or ``--gpus 0 --procs N`` (N > 1)**: this process becomes a
   torch.distributed.elastic agent (:func:`torch.distributed.launcher.api.elastic_launch`) that
   starts N workers on this machine, with a c10d rendezvous on 127.0.0.1 and no restarts
   (spawned: see :data:`START_METHOD_ENV`). Each worker gets the job as JSON and builds its
   own reporter (a console is not picklable); rank 0 draws the progress bar.
   Each worker leaves an :class:`Outcome` file; the agent combines them into one (naming the
   rank that failed first and why) and prints it here.
3. Otherwise: a plain single process.

Signals: pretraining workers install :class:`~swavctl.train.stop.StopFlag` before anything else,
and the agent forwards SIGTERM/SIGINT/SIGUSR1 it receives to them, so the run checkpoints at the
next step boundary and exits 143/130/138. Evaluation workers keep the default handlers: an
evaluation writes its outputs only at the end, so a signal simply ends it. When a worker fails,
the agent stops the others (SIGTERM, then SIGKILL after 30 s); with gloo the survivors see the
broken connection at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swavctl import dist, messages, scratch
from swavctl.config import Settings
from swavctl.cores import usable_cores
from swavctl.errors import UserError
from swavctl.scratch import scratch_folder
from swavctl.train.stop import EXIT_SIGNAL

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

OK, USER_ERROR, INTERRUPTED, NON_FINITE, CHECKPOINT_WRITE, CRASH, KILLED = (
    "ok",
    "user_error",
    "interrupted",
    "non_finite",
    "checkpoint_write",
    "crash",
    "killed",
)
# Which failure explains a multi-rank failure best (lower first); a failed collective is
# usually the echo of another rank's failure, so it comes last.
_PRIORITY = {USER_ERROR: 0, NON_FINITE: 1, CHECKPOINT_WRITE: 2, CRASH: 3, KILLED: 4, INTERRUPTED: 5}


@dataclass
class Outcome:
    """How a run (or one rank of it) ended.

    ``status`` is one of ``ok``, ``user_error`` (exit 2), ``interrupted`` (143/130/138),
    ``non_finite``, ``checkpoint_write``, ``crash`` or ``killed`` (exit 1). ``summary`` is the
    run summary (rank 0, ``ok`` only). ``report`` says whether this process should print it.
    """

    status: str
    exit_code: int
    message: str = ""
    rank: int = 0
    summary: dict[str, Any] | None = None
    error_type: str | None = None
    peer_failure: bool = False
    traceback: str | None = None
    report: bool = True
    ranks: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Job:
    """What the workers of a launch run: ``kind`` is ``pretrain`` or ``eval``; ``args`` are JSON-able."""

    kind: str
    args: dict[str, Any]
    use_cuda: bool
    timeout_s: float


def cuda_by_default(gpus: int | None) -> bool:
    """Whether workers use GPUs: ``--gpus`` > 0, or unset with CUDA available."""
    if gpus is not None:
        return gpus > 0
    import torch

    return torch.cuda.is_available()


def wants_cuda(settings: Settings) -> bool:
    """Whether pretraining workers train on GPUs (see :func:`cuda_by_default`)."""
    return cuda_by_default(settings.dist.gpus)


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


def run_pretrain(settings: Settings, *, fresh: bool = False) -> Outcome:
    """Run pretraining the way the environment and ``settings.dist`` ask for (see module doc)."""
    messages.check_trainable_prototypes(
        settings.method, settings.model.prototypes
    )  # before any worker starts
    job = Job(
        "pretrain",
        {"settings": settings.model_dump_json(), "fresh": fresh},
        use_cuda=wants_cuda(settings),
        timeout_s=settings.dist.timeout_s,
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


#: Process-group timeout of a multi-process evaluation (seconds), as pretraining's default.
EVAL_TIMEOUT_S = 1800.0


def run_evaluation(options: Any) -> Outcome:
    """Run ``swavctl eval-linear`` (``options``: :class:`swavctl.eval.run.EvalOptions`) as asked.

    ``--gpus N`` (N > 1) or ``--gpus 0 --procs N`` start N local workers; under torchrun or srun
    this process is one worker. The summary is rank 0's.
    """
    from swavctl.eval.run import run_eval
    from swavctl.progress import StageProgress

    job = Job(
        "eval",
        {"options": options.model_dump_json()},
        use_cuda=cuda_by_default(options.gpus),
        timeout_s=EVAL_TIMEOUT_S,
    )
    return run_job(
        job,
        gpus=options.gpus,
        procs=options.procs,
        single=lambda stop: run_eval(options, reporter=StageProgress()),
    )


def _reporter() -> Any:
    from swavctl.progress import RichReporter

    return RichReporter()


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
    from swavctl.train.checkpoint import CheckpointWriteError
    from swavctl.train.loop import NonFiniteError
    from swavctl.train.stop import Interrupted

    try:
        summary = body(stop)
    except UserError as exc:
        return Outcome(USER_ERROR, exc.exit_code, str(exc), rank, error_type="UserError")
    except Interrupted as exc:
        return Outcome(INTERRUPTED, exc.exit_code, str(exc), rank, error_type="Interrupted")
    except NonFiniteError as exc:
        return Outcome(NON_FINITE, 1, str(exc), rank, error_type="NonFiniteError")
    except CheckpointWriteError as exc:
        return Outcome(CHECKPOINT_WRITE, 1, str(exc), rank, error_type="CheckpointWriteError")
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
        if job.kind == "pretrain":
            from swavctl.train.faults import FaultHooks
            from swavctl.train.loop import pretrain

            settings = Settings.model_validate_json(job.args["settings"])
            # The fault tests' hooks are read here, at the process edge, and handed to the loop.
            faults = FaultHooks.from_env()
            return pretrain(
                settings, reporter=_reporter(), fresh=bool(job.args["fresh"]), stop=stop_flag, faults=faults
            )
        if job.kind == "eval":
            from swavctl.eval.run import EvalOptions, run_eval
            from swavctl.progress import StageProgress

            return run_eval(
                EvalOptions.model_validate_json(job.args["options"]), reporter=StageProgress(), device=device
            )
        raise ValueError(f"unknown job kind {job.kind!r}")

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


def _install_signal_handling(job: Job) -> Any:
    """Pretraining: a :class:`StopFlag` (checkpoint, then stop). Evaluation: the default handlers."""
    if job.kind == "pretrain":
        from swavctl.train.stop import StopFlag

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


def _quiet_elastic_logs() -> None:
    """torchelastic logs every shutdown step; the outcome we print says what matters."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
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

    The workers' outcomes and logs go to a scratch folder (:mod:`swavctl.scratch`), removed when
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


def _ranks_label(ranks: list[int]) -> str:
    """``rank 3``, or ``ranks 0, 2-5, 7`` (consecutive ranks as ranges): 100 ranks in one line."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    parts: list[str] = []
    start = previous = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == previous + 1:
            previous = r
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if r is not None:
            start = previous = r
    return "ranks " + ", ".join(parts)


def _status_text(outcome: Outcome) -> str:
    if outcome.status == KILLED:
        return outcome.message
    if outcome.peer_failure:
        return f"stopped when a peer failed (exit status {outcome.exit_code})"
    return f"{outcome.status} (exit status {outcome.exit_code})"


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


def combine_outcomes(
    outcomes: Mapping[int, Outcome],
    world: int,
    *,
    failures: Mapping[int, str] | None = None,
    received: int | None = None,
) -> Outcome:
    """One outcome for the whole run: rank 0's when all ranks agree, else the failure that explains it.

    ``failures`` are the agent's exit descriptions of ranks that failed (for ranks that left no
    outcome, e.g. killed by SIGKILL); ``received`` is a signal the agent itself got.
    """
    failures = failures or {}
    full: dict[int, Outcome] = {}
    stop_codes = {code: signal.Signals(signum).name for signum, code in EXIT_SIGNAL.items()}
    peer_failed = any(o.status not in (OK, INTERRUPTED) for o in outcomes.values())
    for rank_ in range(world):
        if rank_ in outcomes:
            full[rank_] = outcomes[rank_]
            continue
        code = failures.get(rank_, "").removeprefix("exit status ")
        stopped = code.isdigit() and int(code) in stop_codes
        if stopped and received is None and peer_failed:
            # The launcher's own SIGTERM after a peer failed (the worker's StopFlag exits 143 at once).
            full[rank_] = Outcome(
                KILLED, 1, "stopped by the launcher after a peer failed", rank_, error_type="Killed",
                peer_failure=True,
            )  # fmt: skip
            continue
        if received in EXIT_SIGNAL or stopped:
            # The worker stopped at once on a repeated (or early) stop signal, as its StopFlag does:
            # an interruption with the signal's status, not a crash.
            exit_code = EXIT_SIGNAL[signal.Signals(received)] if received in EXIT_SIGNAL else int(code)
            full[rank_] = Outcome(
                INTERRUPTED,
                exit_code,
                f"stopped at once by {stop_codes[exit_code]}",
                rank_,
                error_type="Interrupted",
            )
            continue
        how = failures.get(rank_) or (
            f"stopped by the launcher after {signal.Signals(received).name}"
            if received
            else "killed by a signal such as SIGKILL or the out-of-memory killer, or a crash of Python itself"
        )
        full[rank_] = Outcome(KILLED, 1, f"exited without a report ({how})", rank_, error_type="Killed")
    statuses = {str(r): _status_text(o) for r, o in full.items()}
    if all(o.status == OK for o in full.values()):
        result = full[0]
        result.ranks = statuses
        return result
    first = full[0]
    agreed = all(o.status == first.status and o.message == first.message for o in full.values())
    if agreed:
        first.ranks = statuses
        first.report = True
        first.message += f" [all {world} ranks stopped, exit status {first.exit_code}]"
        return first
    failed = [o for o in full.values() if o.status != OK]
    primary = min(failed, key=lambda o: (_PRIORITY.get(o.status, 9) + (10 if o.peer_failure else 0), o.rank))
    alike: dict[str, list[int]] = {}
    for r, text in statuses.items():
        if int(r) != primary.rank:
            alike.setdefault(text, []).append(int(r))
    others = [f"{_ranks_label(ranks)}: {text}" for text, ranks in alike.items()]
    message = f"rank {primary.rank} failed: {primary.message}"
    if others:
        message += "; other ranks: " + ", ".join(others)
    return Outcome(
        primary.status,
        primary.exit_code if primary.exit_code else 1,
        message,
        primary.rank,
        error_type=primary.error_type,
        peer_failure=primary.peer_failure,
        traceback=primary.traceback,
        report=True,
        ranks=statuses,
    )
