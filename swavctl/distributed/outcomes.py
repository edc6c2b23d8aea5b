"""How a launched run ended: one :class:`Outcome` per rank, combined into one for the run.

The launcher (:mod:`swavctl.distributed.launch`) gives every way of starting a run (one process,
local workers, a worker of torchrun or srun) this one result shape, so the summary and ``--json``
do not depend on how the run was started. A failure that has a status of its own (a non-finite
loss, a checkpoint that could not be written) is a :class:`ReportedFailure`; any other exception
is a crash.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from swavctl.distributed.stop import EXIT_SIGNAL

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


class ReportedFailure(Exception):
    """A failure the launcher reports by its :attr:`status` (exit status 1), not as a crash."""

    status: ClassVar[str] = CRASH


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
