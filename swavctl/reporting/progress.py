"""The one progress display of every command: pretraining steps and the stages of eval and inspect.

On a terminal a single live line is drawn on stderr (so ``--json`` output on stdout stays clean).
Its fields have a priority: the count (``step/total``), the loss and the ETA always stay; lesser
fields (the bar, the epoch, elapsed time, samples/s, the learning rate...) give way first when
the terminal is narrow, rather than being cut to ``…``. The cursor is hidden while the line is
live and shown again however the display ends (a finished run, an error, Ctrl-C), and the line is
ended, so what is printed next stands on its own line.

Without a terminal (a SLURM log, CI, a pipe) every line is complete and self-contained::

    pretrain step 100/400 epoch 1/2 elapsed 0:00:41 ETA 0:02:03 loss 3.4121 (0.98 lnK) ...

written every :data:`LOG_EVERY_STEPS` steps and at least every :func:`log_every_s` seconds
(``SWAVCTL_PROGRESS_EVERY_S``, default :data:`LOG_EVERY_S`), plus the last step.

:class:`RichReporter` reports the pretraining loop (:class:`swavctl.train.report.Reporter`);
:class:`StageProgress` the stage-based commands (``eval-linear``, ``inspect-clusters``). Each
stage is opened with :meth:`StageProgress.stage` and advanced through the callable it yields::

    with progress.stage("extract", len(paths), "images") as advance:
        for batch in loader:
            ...
            advance(len(batch), note="3 skipped")

Both print each distinct warning once: Python warnings raised while a display is open (torch's
"This DataLoader will create N worker processes" comes from two call sites, so Python's own
once-per-location filter printed it twice) are routed through :meth:`Display.warn`.
:class:`QuietStages` says nothing, for library use and tests.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from swavctl.distributed import dist

#: Default seconds between progress lines when stderr is not a terminal.
LOG_EVERY_S = 10.0
#: Environment variable that overrides :data:`LOG_EVERY_S` (seconds, a positive number).
EVERY_S_ENV = "SWAVCTL_PROGRESS_EVERY_S"
#: Pretraining steps between progress lines when stderr is not a terminal (besides the timed ones).
LOG_EVERY_STEPS = 50
#: Narrowest bar worth drawing (columns), and the widest one drawn.
BAR_MIN, BAR_MAX = 10, 40


def log_every_s() -> float:
    """Seconds between the timed progress lines: ``SWAVCTL_PROGRESS_EVERY_S`` or :data:`LOG_EVERY_S`."""
    text = os.environ.get(EVERY_S_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value > 0 and math.isfinite(value):
            return value
    return LOG_EVERY_S


def clock_text(seconds: float | None) -> str:
    """``H:MM:SS`` (``-:--:--`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    whole = max(int(round(seconds)), 0)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Fitting a line into a width


@dataclass(frozen=True)
class Field:
    """One field of a progress line. ``rank`` 0 always stays; higher ranks give way first.

    A ``shrink`` field (a free-form note) is cut short with ``…`` rather than dropped, if at least
    :data:`BAR_MIN` columns are left for it. ``BAR`` as text marks the bar, which takes the
    columns the other fields leave (between :data:`BAR_MIN` and :data:`BAR_MAX`).
    """

    text: str
    rank: int
    style: str = ""
    shrink: bool = False


BAR = "\x00bar"


def fit(fields: list[Field], width: int) -> list[Field]:
    """The fields that fit in ``width`` columns (one space between fields), in display order.

    Fields are taken by rank, lowest first (display order breaks ties); the first that does not
    fit stops the taking, so a field never shows while a more important one is hidden. Rank 0
    fields are always kept, even past ``width``.
    """
    order = sorted(range(len(fields)), key=lambda i: (fields[i].rank, i))
    taken: dict[int, Field] = {}
    used = -1  # no separator before the first field
    for i in order:
        field = fields[i]
        need = BAR_MIN if field.text == BAR else len(field.text)
        if field.rank == 0 or used + 1 + need <= width:
            taken[i] = field
            used += 1 + need
            continue
        room = width - used - 1
        if field.shrink and room >= BAR_MIN:
            taken[i] = Field(field.text[: room - 1] + "…", field.rank, field.style)
            used += 1 + room
        break
    return [taken[i] for i in sorted(taken)]


def render_line(fields: list[Field], width: int, fraction: float) -> Text:
    """The fitted fields as one line of ``width`` columns at most, the bar ``fraction`` full."""
    kept = fit(fields, width)
    others = sum(len(f.text) for f in kept if f.text != BAR) + max(len(kept) - 1, 0)
    line = Text(no_wrap=True, overflow="crop")
    for n, field in enumerate(kept):
        if n:
            line.append(" ")
        if field.text == BAR:
            size = max(BAR_MIN, min(BAR_MAX, width - others))
            done = int(round(size * min(max(fraction, 0.0), 1.0)))
            line.append("━" * done, style="magenta")
            line.append("━" * (size - done), style="grey23")
        else:
            line.append(field.text, style=field.style)
    return line


class _LiveLine:
    """A renderable that rebuilds its fields at every refresh (elapsed time and ETA move on)."""

    def __init__(self, fields: Callable[[], list[Field]], fraction: Callable[[], float]) -> None:
        self.fields, self.fraction = fields, fraction

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield render_line(self.fields(), options.max_width, self.fraction())


# ---------------------------------------------------------------------------------------------
# A counted thing: steps, images, passes


class Counter:
    """``done`` of ``total`` units, started at ``first`` (a resumed run) at ``clock()`` time.

    ETA = (total - done) x elapsed / (done - first): the rate of this process so far.
    """

    def __init__(self, total: int, done: int, clock: Callable[[], float]) -> None:
        self.total, self.done, self.first = total, done, done
        self.clock = clock
        self.started = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self) -> float | None:
        made = self.done - self.first
        if made <= 0:
            return None
        return max(self.total - self.done, 0) * self.elapsed() / made

    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# The display: messages, warnings, one live line


class Display:
    """Messages and yellow warnings (each distinct warning once) on ``console``, and one live line.

    Only rank 0 prints messages; warnings from every rank are printed with the rank.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        quiet: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        self.quiet = quiet
        self.clock = clock  # seconds; what the timed lines are spaced by
        self._warned: set[str] = set()
        self._live: Live | None = None
        self._saved_showwarning: Any = None
        # A UserWarning's text once per process, wherever it is raised (Python's default is once
        # per code location); appended, so -W and PYTHONWARNINGS filters still come first.
        warnings.filterwarnings("once", category=UserWarning, append=True)

    @property
    def live(self) -> bool:
        """Whether a live line is drawn (a terminal, not quiet)."""
        return not self.quiet and self.console.is_terminal

    def _prefix(self) -> str:
        return f"[rank {dist.rank()}] " if dist.is_distributed() else ""

    def info(self, message: str) -> None:
        if not self.quiet and dist.is_main():
            self.console.print(f"{self._prefix()}{message}", markup=False, highlight=False)

    def warn(self, message: str) -> None:
        if message in self._warned:
            return
        self._warned.add(message)
        # A styled Text, not print(style=...): that style would also colour the live line's redraw.
        self.console.print(Text(f"{self._prefix()}warning: {message}", style="yellow"), highlight=False)

    def _showwarning(
        self, message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
    ) -> None:
        name = "" if category is UserWarning else f"{category.__name__}: "
        self.warn(f"{name}{message}")

    def _route_warnings(self) -> None:
        """Print Python warnings through :meth:`warn` until :meth:`_close`."""
        if self._saved_showwarning is None:
            self._saved_showwarning = warnings.showwarning
            warnings.showwarning = self._showwarning

    def _open(self, fields: Callable[[], list[Field]], fraction: Callable[[], float]) -> None:
        """Route Python warnings here and, on a terminal, start the live line (cursor hidden)."""
        self._route_warnings()
        if self.live and self._live is None:
            self._live = Live(
                _LiveLine(fields, fraction),
                console=self.console,
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,  # stdout is for --json: never mix the line into it
            )
            self._live.start()

    def _close(self) -> None:
        """End the live line (cursor shown, line ended) and give Python warnings back. Idempotent."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()
        if self._saved_showwarning is not None:
            if warnings.showwarning == self._showwarning:
                warnings.showwarning = self._saved_showwarning
            self._saved_showwarning = None


# ---------------------------------------------------------------------------------------------
# Pretraining


class RichReporter(Display):
    """The pretraining loop's :class:`~swavctl.train.report.Reporter`: step/total, epoch, loss,
    loss/ln K, learning rate, samples/s, data wait, prototypes used, elapsed time and ETA.

    Only rank 0 draws the line or writes progress lines.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        quiet: bool = False,
        clock: Callable[[], float] = time.monotonic,
        every_steps: int = LOG_EVERY_STEPS,
    ) -> None:
        super().__init__(console, quiet=quiet, clock=clock)
        self.every_steps = every_steps
        self._count: Counter | None = None
        self._steps_per_epoch = 0
        self._record: dict[str, Any] = {}
        self._last_line = 0.0

    def start(self, total_steps: int, done_steps: int, *, steps_per_epoch: int = 0) -> None:
        if self.quiet or not dist.is_main():
            self._route_warnings()
            return
        self._count = Counter(total_steps, done_steps, self.clock)
        self._steps_per_epoch = steps_per_epoch
        self._last_line = self.clock()
        self._open(self._fields, self._count.fraction)

    def _epochs_text(self) -> str | None:
        count, per = self._count, self._steps_per_epoch
        if count is None or per <= 0:
            return None
        epochs = max(math.ceil(count.total / per), 1)
        epoch = self._record.get("epoch")
        now = int(epoch) + 1 if epoch is not None else min(count.done // per + 1, epochs)
        return f"epoch {now}/{epochs}"

    def _fields(self, *, terminal: bool = True) -> list[Field]:
        count = self._count
        assert count is not None
        record = self._record
        has = "loss" in record
        fields = [
            Field("pretrain", 6, "bold"),
            Field(BAR, 4),
            Field(f"{'' if terminal else 'step '}{count.done}/{count.total}", 0),
        ]
        epochs = self._epochs_text()
        if epochs:
            fields.append(Field(epochs, 1))
        if not terminal:
            fields.append(Field(f"elapsed {clock_text(count.elapsed())}", 3))
            fields.append(Field(f"ETA {clock_text(count.eta())}", 0, "cyan"))
        fields.append(Field(f"loss {record['loss']:.4f}" if has else "loss -", 0))
        if has:
            fields += [
                Field(f"({record['loss_over_lnk']:.2f} lnK)", 5),
                Field(f"lr {record['lr']:.3g}", 5),
                Field(f"{record['samples_per_s']:.1f} samples/s", 2),
                Field(f"wait {record['data_wait_fraction']:.0%}", 6),
                Field(f"protos {record['prototypes_used']}{_queue_mark(record)}", 7),
            ]
        if terminal:
            fields.append(Field(clock_text(count.elapsed()), 3, "yellow"))
            fields.append(Field(f"ETA {clock_text(count.eta())}", 0, "cyan"))
        return fields

    def step(self, record: dict[str, Any]) -> None:
        count = self._count
        if count is None:
            return
        self._record = record
        count.done = int(record["step"])
        if self._live is not None or self.quiet:
            return
        now = self.clock()
        due = (
            (count.done - count.first) % self.every_steps == 0
            or now - self._last_line >= log_every_s()
            or count.done >= count.total
        )
        if due:
            self._last_line = now
            line = " ".join(f.text for f in self._fields(terminal=False) if f.text != BAR)
            self.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        self._close()
        self._count = None


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Stages (eval-linear, inspect-clusters)


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


class StageProgress(Display):
    """A live line per stage on a terminal; timed lines and a closing line otherwise."""

    @contextmanager
    def stage(self, name: str, total: int, unit: str = "steps") -> Iterator[Advance]:
        """Yields ``advance(n=1, note="")``; off a terminal, reports the stage as it goes."""
        count = Counter(total, 0, self.clock)
        note_now = ""
        last_line = count.started

        def fields(*, terminal: bool = True) -> list[Field]:
            shown = [
                Field(name, 4, "bold"),
                Field(BAR, 5),
                Field(
                    f"{count.done}/{count.total} {unit}" if not terminal else f"{count.done}/{count.total}", 0
                ),
                Field(("" if terminal else "elapsed ") + clock_text(count.elapsed()), 3, "yellow"),
                Field(f"ETA {clock_text(count.eta())}", 0, "cyan"),
            ]
            if note_now:
                shown.insert(3, Field(note_now, 2, shrink=True))
            return shown

        def advance(n: int = 1, note: str = "") -> None:
            nonlocal note_now, last_line
            count.done += n
            if note:
                note_now = note
            if self._live is None and not self.quiet and self.clock() - last_line >= log_every_s():
                last_line = self.clock()
                texts = [f.text for f in fields(terminal=False) if f.text != BAR]
                self.info(f"{texts[0]} {', '.join(texts[1:])}")

        self._open(fields, count.fraction)
        try:
            yield advance
            # A stage may end early (a balanced solve converges): show it complete.
            count.total = max(count.done, 1) if count.done < count.total else count.total
        finally:
            drew = self._live is not None
            self._close()
        if not drew and not self.quiet:
            seconds = count.elapsed()
            self.info(
                f"{name}: {count.done} {unit} in {seconds:.1f} s" + (f", {note_now}" if note_now else "")
            )


def _queue_mark(record: dict[str, Any]) -> str:
    """' queue' while SwAV's queue is in use (the other methods' records have no such field)."""
    return " queue" if record.get("queue_in_use") else ""
