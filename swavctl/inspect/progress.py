"""Rich progress for the inspection stages, on stderr (so ``--json`` keeps stdout clean)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


class StageProgress:
    """One bar per stage while the terminal shows them; a line per finished stage otherwise."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        self.quiet = quiet
        self._live = not quiet and self.console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self._live,
        )

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", style="yellow", markup=False)

    @contextmanager
    def stage(self, name: str, total: int, unit: str) -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, note="")``; reports the stage's count and time when it ends."""
        task = self._progress.add_task(name, total=total, note="")
        done = [0]
        note_text = [""]
        start = time.perf_counter()

        def advance(n: int = 1, note: str = "") -> None:
            done[0] += n
            if note:
                note_text[0] = note
            self._progress.update(task, advance=n, note=note)

        yield advance
        # A stage may end early (the balanced solve converges): show it complete.
        self._progress.update(task, total=max(done[0], 1), completed=done[0])
        seconds = time.perf_counter() - start
        if not self._live:
            extra = f", {note_text[0]}" if note_text[0] else ""
            self.info(f"{name}: {done[0]} {unit} in {seconds:.1f} s{extra}")
