"""The stage progress shared by eval-linear and inspect-clusters (swavctl.reporting.progress)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from swavctl.reporting import progress as stages
from swavctl.reporting.progress import QuietStages, StageProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120, soft_wrap=True), buffer


def test_off_terminal_a_stage_ends_with_its_count_time_and_last_note() -> None:
    console, buffer = _console(terminal=False)
    progress = StageProgress(console)
    with progress.stage("extract", 10, "images") as advance:
        advance(4)
        advance(3, note="2 skipped")
        advance(3)
    text = buffer.getvalue()
    assert "extract: 10 images in " in text
    assert text.rstrip().endswith("s, 2 skipped")


def test_off_terminal_a_long_stage_prints_timed_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "LOG_EVERY_S", 0.05)
    console, buffer = _console(terminal=False)
    now = [100.0]  # a clock the test moves: lines are counted, not waited for
    with StageProgress(console, clock=lambda: now[0]).stage("linear", 3, "steps") as advance:
        advance(1, "epoch 1/3 loss 2.000")
        now[0] += 0.1
        advance(1, "epoch 2/3 loss 1.500")
        advance(1)
    lines = buffer.getvalue().splitlines()
    assert "linear 2/3 steps, epoch 2/3 loss 1.500, elapsed 0:00:00, ETA 0:00:00" in lines
    assert "linear 1/3" not in buffer.getvalue()  # the first advance came before the interval
    assert lines[-1].startswith("linear: 3 steps in ")


def test_a_stage_that_ends_early_is_reported_with_what_was_done() -> None:
    console, buffer = _console(terminal=False)
    with StageProgress(console).stage("balance", 100, "Sinkhorn passes") as advance:
        for _ in range(7):
            advance(1, "mass error 1.00e-03")
    assert "balance: 7 Sinkhorn passes in " in buffer.getvalue()


def test_on_a_terminal_the_bar_is_drawn_and_no_summary_line() -> None:
    console, buffer = _console(terminal=True)
    with StageProgress(console).stage("finetune", 2) as advance:
        advance(2, "epoch 1/1 loss 0.500")
    text = buffer.getvalue()
    assert "finetune" in text and "2/2" in text and "epoch 1/1 loss 0.500" in text
    assert "finetune: 2 steps in" not in text


def test_quiet_prints_warnings_only() -> None:
    console, buffer = _console(terminal=False)
    progress = StageProgress(console, quiet=True)
    progress.info("hello")
    with progress.stage("extract", 1, "images") as advance:
        advance(1)
    progress.warn("careful")
    assert buffer.getvalue().strip() == "warning: careful"


def test_names_and_notes_are_not_markup() -> None:
    console, buffer = _console(terminal=True)
    with StageProgress(console).stage("fast grid [9 probes]", 1, "fits") as advance:
        advance(1, "lr [bold]0.1")
    text = buffer.getvalue()
    assert "fast grid [9 probes]" in text and "lr [bold]0.1" in text


def test_quiet_stages_take_the_same_calls_and_print_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    quiet = QuietStages()
    quiet.info("x")
    quiet.warn("y")
    with quiet.stage("s", 3, "images") as advance:
        advance()
        advance(2, "note")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
