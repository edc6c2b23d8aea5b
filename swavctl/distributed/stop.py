"""Stopping a run on a signal: checkpoint at the next step boundary, or at once when it cannot.

SIGTERM, SIGINT and SIGUSR1 (SLURM's "time is nearly up", ``sbatch --signal=USR1@T``) stop a run
at the next step boundary, after a checkpoint; the exit status is 128 + the signal. The Python
handlers only record the signal, so a signal can never corrupt a step or a checkpoint write, and
every rank stops at the same step (the training loop agrees on the signals seen at each step).

A recorded signal needs the training loop to reach a step boundary. When it cannot, waiting
would ignore the user: SIGTERM or SIGINT

- before the loop watches (the rendezvous with peers that may never come, listing a large
  folder, loading a checkpoint: nothing new to save yet), or
- a second time, at least ``REPEAT_AFTER_S`` after the first (a peer hung inside a collective,
  so the step never ends; a Ctrl-C in a terminal reaches the workers twice within milliseconds,
  directly and forwarded by the launcher, and that is one request),

ends the process at once, with a one-line message, keeping the checkpoints already committed.
Python runs its signal handlers only between bytecodes, never inside a blocking C++ call such as
a gloo rendezvous or all-reduce, so this part is done by a watcher thread woken through
``signal.set_wakeup_fd``, which the interpreter's C-level handler writes to at once. SIGUSR1
never ends a run at once: it asks for the checkpoint and the requeue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 138}
_IMMEDIATE = frozenset({int(signal.SIGTERM), int(signal.SIGINT)})
#: Seconds after a first SIGTERM/SIGINT from which another one means "stop now".
REPEAT_AFTER_S = 2.0


class StopFlag:
    """Signal handlers that record the signals for the loop, with an immediate exit when it cannot act."""

    def __init__(self) -> None:
        self.received: set[int] = set()
        self.watching = False  # set by the training loop once it acts on signals at step boundaries
        self.finished = False  # set by the training loop after its last step (no boundary to come)
        self._first_at: float | None = None  # monotonic time of the first SIGTERM/SIGINT
        self._previous: dict[int, Any] = {}
        self._previous_wakeup: int | None = None
        self._pipe: tuple[int, int] | None = None

    @property
    def signum(self) -> int | None:
        """The signal that decides the exit status: SIGTERM over SIGINT over SIGUSR1."""
        for candidate in STOP_SIGNALS:
            if candidate in self.received:
                return int(candidate)
        return None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.add(signum)

    def install(self) -> None:
        """Install the handlers and the watcher (until :meth:`restore`); a no-op off the main thread."""
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            return
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._pipe = (read_end, write_end)
        threading.Thread(target=self._watch, args=(read_end,), name="swavctl-signals", daemon=True).start()

    def _watch(self, read_end: int) -> None:
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            for signum in data:
                if signum not in _IMMEDIATE:
                    continue
                if not self.watching:
                    self._exit_now(signum)
                if self._first_at is None:
                    self._first_at = now
                    self._say_recorded(signum)
                elif now - self._first_at >= REPEAT_AFTER_S:
                    self._exit_now(signum)

    def _say_recorded(self, signum: int) -> None:
        """Tell the user that the first SIGTERM/SIGINT was heard (rank 0 only: a terminal's Ctrl-C
        reaches every worker), and how to stop at once instead."""
        if os.environ.get("RANK", "0") != "0":
            return
        name = signal.Signals(signum).name
        with contextlib.suppress(OSError):
            os.write(
                2,
                f"\nswavctl: {name} received: checkpointing at the end of this step, then stopping "
                f"({name} again, {REPEAT_AFTER_S:g} s or more later, stops at once)\n".encode(),
            )

    def _exit_now(self, signum: int) -> None:
        name = signal.Signals(signum).name
        why = "again"
        if not self.watching:
            why = "after the last step" if self.finished else "before the first step"
        with contextlib.suppress(OSError):
            os.write(2, f"\nswavctl: {name} {why}: stopping now; committed checkpoints are kept\n".encode())
        os._exit(EXIT_SIGNAL[signal.Signals(signum)])

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup if self._previous_wakeup is not None else -1)
            for fd in self._pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipe = None


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, requeue: str | None = None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.requeue = requeue
        self.exit_code = EXIT_SIGNAL.get(signal.Signals(signum), 128 + signum)
        name = signal.Signals(signum).name
        message = f"stopped by {name} at step {step}; checkpoint {checkpoint}"
        if requeue:
            message += f"; {requeue}"
        super().__init__(message)


def first_stop_signal(received: set[int]) -> int:
    """The signal that names a stop: SIGTERM over SIGINT over SIGUSR1."""
    return next(int(s) for s in STOP_SIGNALS if s in received)


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID"))
