"""Progress and messages of an evaluation, drawn with rich on stderr (``--json`` keeps stdout clean)."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


class Task(Protocol):
    def advance(self, amount: int = 1, status: str = "") -> None: ...


class Reporter(Protocol):
    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def task(self, name: str, total: int) -> AbstractContextManager[Task]: ...


class _NullTask:
    def advance(self, amount: int = 1, status: str = "") -> None:
        return None


class QuietReporter:
    """Says nothing (library use and tests)."""

    def info(self, message: str) -> None:
        return None

    def warn(self, message: str) -> None:
        return None

    @contextmanager
    def task(self, name: str, total: int) -> Iterator[Task]:
        yield _NullTask()


class _RichTask:
    def __init__(
        self, progress: Progress | None, task_id: object, console: Console, name: str, total: int
    ) -> None:
        self._progress = progress
        self._id = task_id
        self._console = console
        self._name = name
        self._total = total
        self._done = 0
        self._last_print = time.monotonic()

    def advance(self, amount: int = 1, status: str = "") -> None:
        self._done += amount
        if self._progress is not None:
            self._progress.update(self._id, advance=amount, status=status)  # type: ignore[arg-type]
        elif status and time.monotonic() - self._last_print > 10:
            # Not a terminal (a log file): a line every 10 s instead of a bar.
            self._last_print = time.monotonic()
            self._console.print(
                f"{self._name} {self._done}/{self._total} {status}", markup=False, highlight=False
            )


class RichReporter:
    """A rich progress bar per phase on stderr; messages and yellow warnings."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    def info(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

    @contextmanager
    def task(self, name: str, total: int) -> Iterator[Task]:
        if not self.console.is_terminal:
            yield _RichTask(None, None, self.console, name, total)
            return
        progress = Progress(
            TextColumn(f"[bold]{name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        with progress:
            task_id = progress.add_task(name, total=total, status="")
            yield _RichTask(progress, task_id, self.console, name, total)
