"""Progress of a command's stages (feature passes, training epochs, Sinkhorn passes, grids).

``eval-linear`` and ``inspect-clusters`` run as a few long stages. Each stage is opened with
:meth:`StageProgress.stage` and advanced through the callable it yields:

    with progress.stage("extract", len(paths), "images") as advance:
        for batch in loader:
            ...
            advance(len(batch), note="3 skipped")

On a terminal every stage gets a rich bar on stderr (so ``--json`` output on stdout stays
clean). Elsewhere (a log file, a CI job) a stage prints a line every :data:`LOG_EVERY_S`
seconds while it runs and one line with its count and time when it ends. :class:`QuietStages`
says nothing, for library use and tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Seconds between the progress lines of a running stage when stderr is not a terminal.
LOG_EVERY_S = 10.0


class Advance(Protocol):
    """Advance a stage by ``n`` units; a non-empty ``note`` replaces the stage's note."""

    def __call__(self, n: int = 1, note: str = "") -> None: ...


class StageReporter(Protocol):
    """What the stage-based commands tell the outside world."""

    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def stage(self, name: str, total: int, unit: str = "steps") -> AbstractContextManager[Advance]: ...


def _ignore(n: int = 1, note: str = "") -> None:
    return None


class QuietStages:
    """Says nothing."""

    def info(self, message: str) -> None:
        return None

    def warn(self, message: str) -> None:
        return None

    @contextmanager
    def stage(self, name: str, total: int, unit: str = "steps") -> Iterator[Advance]:
        yield _ignore


class StageProgress:
    """A rich bar per stage on a terminal; timed lines otherwise. Messages and yellow warnings."""

    def __init__(
        self,
        console: Console | None = None,
        *,
        quiet: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        self.quiet = quiet
        self.clock = clock  # seconds; what the timed lines are spaced by

    @property
    def live(self) -> bool:
        """Whether stages draw bars (a terminal, not quiet)."""
        return not self.quiet and self.console.is_terminal

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

    @contextmanager
    def stage(self, name: str, total: int, unit: str = "steps") -> Iterator[Advance]:
        """Yields ``advance(n=1, note="")``; when not drawing bars, reports the stage as it goes."""
        progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}", markup=False),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        task = progress.add_task(name, total=total, note="")
        done, note_now = 0, ""
        start = last_line = self.clock()

        def advance(n: int = 1, note: str = "") -> None:
            nonlocal done, note_now, last_line
            done += n
            if note:
                note_now = note
            progress.update(task, advance=n, note=note_now)
            if not self.live and not self.quiet and self.clock() - last_line >= LOG_EVERY_S:
                last_line = self.clock()
                self.info(f"{name} {done}/{total} {unit}" + (f", {note_now}" if note_now else ""))

        with progress:
            yield advance
            # A stage may end early (a balanced solve converges): show it complete.
            progress.update(task, total=max(done, 1), completed=done)
        if not self.live:
            seconds = self.clock() - start
            self.info(f"{name}: {done} {unit} in {seconds:.1f} s" + (f", {note_now}" if note_now else ""))
