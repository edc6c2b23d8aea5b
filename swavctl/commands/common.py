"""Shared pieces of the commands: option aliases declared once, error rendering."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)

DataOpt = Annotated[
    str | None,
    typer.Option("--data", metavar="DIR", help="Image folder (train/ is used if present), or 'demo'."),
]
OutOpt = Annotated[
    str | None,
    typer.Option("--out", metavar="DIR", help="Output folder (default: a new folder under runs/)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
GpusOpt = Annotated[
    int | None, typer.Option("--gpus", metavar="N", help="GPUs to use (default: 1 if CUDA is available).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override any setting: --set a.b=value (repeatable)."),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise (status 2 by default)."""
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def finish(outcome: Any, show: Callable[[dict[str, Any]], None]) -> None:
    """Render a launch's :class:`~swavctl.distributed.outcomes.Outcome` and exit with its status.

    ``show`` prints the summary.
    """
    from swavctl.distributed import launch, outcomes

    code = outcome.exit_code
    if outcome.report:
        if outcome.status == outcomes.OK and outcome.summary is not None:
            show(outcome.summary)
        elif outcome.status == outcomes.INTERRUPTED:
            err.print(outcome.message, markup=False)
        elif outcome.status != outcomes.OK:
            prefix = f"[rank {outcome.rank}] " if launch.group_still_open() and outcome.rank else ""
            note = ""
            if outcome.status in (outcomes.CRASH, outcomes.KILLED):  # a bug or a dead worker
                from swavctl.commands.usage import internal_note

                note = internal_note(outcome.traceback or outcome.message)
            err.print(f"error: {prefix}{outcome.message}{note}", markup=False)
    if code and launch.group_still_open():
        launch.exit_now(code)  # a failed job worker: leave without tearing down the group
    if code:
        raise typer.Exit(code)
