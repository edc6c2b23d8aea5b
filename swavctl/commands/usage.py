"""Usage errors and internal failures, rendered in the one error style of every command.

Typer (through the click it vendors) reports a usage mistake (an unknown option or command, a
value of the wrong type, a missing argument) with a three-line ``Usage: / Try / Error:`` block.
:func:`run_app` runs the app with ``standalone_mode=False`` so those errors come back as
exceptions, and prints each as one line::

    error: no such option '--epoch'; did you mean '--epochs'? (try 'swavctl pretrain --help')

with exit status 2. Only Typer's public names are used: its usage errors are subclasses of
``typer.TyperException`` that carry the failing ``ctx`` (a ``typer.Context``).

A failure that is no usage error and no :class:`~swavctl.errors.UserError` is a bug: its
traceback is printed and kept in a log file, and the last line names the version and the log.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import typer

from swavctl import __version__

PROG = "swavctl"


def _first_lower(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:1].isupper() and not text[1:2].isupper() else text


def _nearest(word: str, candidates: list[str]) -> str | None:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _command_path(ctx: Any) -> str:
    """``swavctl CMD`` (the app always runs under the name ``swavctl``, even as ``python -m``)."""
    return str(getattr(ctx, "command_path", "") or PROG)


_TYPE_WORDING = (
    (re.compile(r"Input should be a valid integer.*"), "expected a whole number"),
    (re.compile(r"Input should be a valid number.*"), "expected a number"),
    (re.compile(r"Input should be a valid boolean.*"), "expected true or false"),
)


def _typed_value(option: str, argv: list[str]) -> str | None:
    """The value typed after ``option`` (``--epochs 1.5`` or ``--epochs=1.5``), if any."""
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(option + "="):
            return word[len(option) + 1 :]
    return None


def usage_line(exc: typer.TyperException, argv: list[str] | None = None) -> str:
    """The one ``error: ...`` line for a usage error raised while parsing the command line."""
    ctx: Any = getattr(exc, "ctx", None)
    option = getattr(exc, "option_name", None)
    possibilities = getattr(exc, "possibilities", None)
    if option is not None and possibilities is not None:  # no such option
        nearest = _nearest(option, list(possibilities))
        if nearest is None and ctx is not None:
            names = [
                o for p in ctx.command.get_params(ctx) for o in getattr(p, "opts", []) if o.startswith("-")
            ]
            nearest = _nearest(option, names)
        message = f"no such option '{option}'"
        if nearest:
            message += f"; did you mean '{nearest}'?"
    else:
        message = " ".join(exc.format_message().split())
        # "No such command 'x'. Did you mean 'y'?" -> "no such command 'x'; did you mean 'y'?"
        message = re.sub(r"\.\s+Did you mean", "; did you mean", message)
        unknown = re.match(r"No such command '(.+?)'\.?$", message)
        if unknown and ctx is not None and hasattr(ctx.command, "list_commands"):
            visible = [
                name
                for name in ctx.command.list_commands(ctx)
                if not getattr(ctx.command.get_command(ctx, name), "hidden", False)
            ]
            message = f"No such command '{unknown.group(1)}'; commands: {', '.join(visible)}"
        bad = re.match(r"Invalid value for '(-[^']+)': (.*)$", message)
        if bad:
            reason = bad.group(2)
            for pattern, wording in _TYPE_WORDING:
                reason = pattern.sub(wording, reason)
            typed = _typed_value(bad.group(1), argv if argv is not None else sys.argv[1:])
            message = f"invalid value for {bad.group(1)}: {reason}" + (f", got '{typed}'" if typed else "")
        message = _first_lower(message.rstrip("."))
    hint = f" (try '{_command_path(ctx)} --help')" if ctx is not None else ""
    return f"error: {message}{hint}"


def _is_no_args_help(exc: typer.TyperException) -> bool:
    """``swavctl`` or ``swavctl presets`` alone: the help itself, not an error line."""
    ctx: Any = getattr(exc, "ctx", None)
    return ctx is not None and exc.format_message() == ctx.get_help()


def crash_log_dir() -> Path:
    from swavctl.data.demo import cache_root

    return cache_root() / "crash"


def save_crash_log(text: str) -> str:
    """Keep a bug's traceback in a file under the cache folder; returns where (or why not)."""
    try:
        folder = crash_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.write_text(f"swavctl {__version__}\nargv: {sys.argv!r}\n\n{text}")
        return str(log)
    except OSError:
        return "(the traceback above; it could not be saved)"


def internal_note(traceback_text: str | None) -> str:
    """What ends the error line of a bug: the version, and the log that keeps its traceback."""
    where = save_crash_log(traceback_text or "(no traceback)")
    return f"; this is a bug in swavctl {__version__}, please report it with the log: {where}"


def report_internal_failure(exc: BaseException) -> int:
    """Print the traceback of a bug, keep it in a log file, and say where; returns exit status 1."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(text)
    where = save_crash_log(text)
    reason = " ".join(str(exc).split())[:200]
    print(
        f"error: internal error in swavctl {__version__}: {type(exc).__name__}"
        f"{': ' + reason if reason else ''}; this is a bug, please report it with the log: {where}",
        file=sys.stderr,
        flush=True,
    )
    return 1


def run_app(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run ``app`` and return its exit status, rendering usage errors and bugs in one style."""
    try:
        result = app(args=args, prog_name=PROG, standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (and other click exceptions)
        if _is_no_args_help(exc):
            print(exc.format_message(), file=sys.stderr)
            return int(getattr(exc, "exit_code", 2))
        print(usage_line(exc, args), file=sys.stderr, flush=True)
        return 2 if getattr(exc, "ctx", None) is not None else int(getattr(exc, "exit_code", 1))
    except typer.Abort:
        print("\nswavctl: aborted", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        return report_internal_failure(exc)
    return result if isinstance(result, int) else 0
