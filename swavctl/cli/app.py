"""The ``swavctl`` command line: parse, build validated settings, call one core function, render.

Each command lives in its own module under ``swavctl.commands``; this file only registers them.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Annotated

import typer

from swavctl import __version__
from swavctl.commands.bench import bench_app
from swavctl.commands.eval import eval_linear_command
from swavctl.commands.export import export_command
from swavctl.commands.inspect import inspect_clusters_command
from swavctl.commands.presets import presets_app
from swavctl.commands.pretrain import pretrain_command
from swavctl.commands.usage import run_app

app = typer.Typer(
    name="swavctl",
    help="SwAV self-supervised pretraining, evaluation, cluster inspection and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"swavctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """SwAV self-supervised pretraining, evaluation, cluster inspection and export."""


app.command("pretrain", epilog="Every setting with its meaning: swavctl presets show defaults.")(
    pretrain_command
)
app.command("eval-linear")(eval_linear_command)
app.command("linear-eval", hidden=True, help="Alias of eval-linear.")(eval_linear_command)
app.command("inspect-clusters")(inspect_clusters_command)
app.command("cluster-inspect", hidden=True, help="Alias of inspect-clusters.")(inspect_clusters_command)
app.command("export")(export_command)
app.add_typer(presets_app, name="presets")
app.add_typer(bench_app, name="bench")


def _interrupted(signum: int, frame: object) -> None:
    """SIGINT outside the training loop (which installs its own handlers): say so, then stop.

    Typer turns a KeyboardInterrupt into a silent exit status 130, so the line is printed here.
    """
    global _said_interrupted
    if not _said_interrupted:
        _said_interrupted = True
        print("\nswavctl: interrupted", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


_said_interrupted = False


def main() -> None:
    """Console-script entry point."""
    with contextlib.suppress(ValueError):  # not the main thread (an embedding caller): leave it
        signal.signal(signal.SIGINT, _interrupted)
    try:
        code = run_app(app)
    except KeyboardInterrupt:
        if not _said_interrupted:
            print("\nswavctl: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main()
