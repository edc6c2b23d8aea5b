"""Rich rendering of a run's progress and messages (stderr, so ``--json`` output stays clean)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from swavctl import dist


class RichReporter:
    """Progress bar with loss, loss/ln K, samples/s, data wait and prototypes used; warnings in yellow.

    Only rank 0 draws the bar; warnings from every rank are printed with the rank.
    """

    def __init__(self, console: Console | None = None, *, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: Any = None
        self._warned: set[str] = set()

    def _prefix(self) -> str:
        return f"[rank {dist.rank()}] " if dist.is_distributed() else ""

    def info(self, message: str) -> None:
        if not self.quiet and dist.is_main():
            self.console.print(f"{self._prefix()}{message}", markup=False, highlight=False)

    def warn(self, message: str) -> None:
        if message in self._warned:
            return
        self._warned.add(message)
        self.console.print(
            f"{self._prefix()}warning: {message}", style="yellow", markup=False, highlight=False
        )

    def start(self, total_steps: int, done_steps: int) -> None:
        if self.quiet or not dist.is_main():
            return
        self._progress = Progress(
            TextColumn("[bold]pretrain"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self._progress.start()
        self._task = self._progress.add_task("steps", total=total_steps, completed=done_steps, stats="")

    def step(self, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        stats = (
            f"loss {record['loss']:.3f} ({record['loss_over_lnk']:.2f} lnK) lr {record['lr']:.3g} "
            f"{record['samples_per_s']:.0f} img/s wait {record['data_wait_fraction']:.0%} "
            f"protos {record['prototypes_used']}{' queue' if record['queue_in_use'] else ''}"
        )
        self._progress.update(self._task, completed=record["step"], stats=stats)
        if not self.console.is_terminal and record["step"] % 50 == 0:
            self.console.print(f"step {record['step']}: {stats}", markup=False, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)
