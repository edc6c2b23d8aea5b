"""The progress display (swavctl.reporting.progress): narrow terminals, Ctrl-C, log files, warnings once.

The terminal tests run ``swavctl pretrain`` under a real pseudo-terminal of a set width.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from swavctl.reporting import progress
from swavctl.reporting.progress import BAR, Field, RichReporter, StageProgress, fit, render_line
from swavctl.reporting.tensorboard_log import TB_DIR
from tests.conftest import cli_env, last_logged_step, wait_until, write_image_folder

ESSENTIAL = ("/", "loss ", "ETA ")


def _record(step: int, epoch: int = 0) -> dict[str, object]:
    return {
        "step": step,
        "epoch": epoch,
        "loss": 3.41234,
        "loss_over_lnk": 0.98,
        "lr": 0.05,
        "samples_per_s": 123.4,
        "data_wait_fraction": 0.03,
        "prototypes_used": 7,
        "queue_in_use": True,
    }


def _plain(clock: list[float], every_steps: int = 50) -> tuple[RichReporter, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=300, soft_wrap=True)
    return RichReporter(console, clock=lambda: clock[0], every_steps=every_steps), buffer


# ---------------------------------------------------------------------------------------------
# Fitting a line


@pytest.mark.parametrize("width", [60, 80, 120])
def test_a_full_pretrain_line_keeps_count_loss_and_eta_within_the_width(width: int) -> None:
    now = [0.0]
    reporter, _ = _plain(now)
    reporter.start(1000, 0, steps_per_epoch=250)
    now[0] = 30.0
    reporter.step(_record(200))
    text = render_line(reporter._fields(), width, 0.2).plain
    assert len(text) <= width
    assert "200/1000" in text and "loss 3.4123" in text and "ETA 0:02:00" in text
    assert "…" not in text
    if width >= 80:
        assert "epoch 1/4" in text and "samples/s" in text
    if width >= 120:
        assert "━" in text and "lr 0.05" in text
    reporter.close()


def test_lesser_fields_give_way_first_and_rank_zero_always_stays() -> None:
    fields = [Field("name", 5), Field(BAR, 4), Field("1/9", 0), Field("note", 1), Field("ETA 0:00:01", 0)]
    assert [f.text for f in fit(fields, 100)] == ["name", BAR, "1/9", "note", "ETA 0:00:01"]
    assert [f.text for f in fit(fields, 20)] == ["1/9", "note", "ETA 0:00:01"]
    assert [f.text for f in fit(fields, 5)] == ["1/9", "ETA 0:00:01"]  # past the width, but kept
    # A field that does not fit stops the taking: no lesser field shows in its place.
    assert [f.text for f in fit([Field("a", 0), Field("x" * 30, 1), Field("b", 2)], 10)] == ["a"]
    # A note is cut short rather than dropped.
    long_note = [Field("1/9", 0), Field("epoch 2/3 loss 1.500 lr 0.1 wd 1e-6", 1, shrink=True)]
    assert [f.text for f in fit(long_note, 20)] == ["1/9", "epoch 2/3 loss …"]  # 3 + 1 + 16 columns


# ---------------------------------------------------------------------------------------------
# Without a terminal


def test_off_terminal_every_line_is_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.EVERY_S_ENV, "1000")
    now = [0.0]
    reporter, buffer = _plain(now, every_steps=2)
    reporter.start(4, 0, steps_per_epoch=2)
    for step in range(1, 5):
        now[0] += 3.0
        reporter.step(_record(step, epoch=(step - 1) // 2))
    reporter.close()
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "pretrain step 2/4 epoch 1/2 elapsed 0:00:06 ETA 0:00:06 loss 3.4123 (0.98 lnK) lr 0.05 "
        "123.4 samples/s wait 3% protos 7 queue",
        "pretrain step 4/4 epoch 2/2 elapsed 0:00:12 ETA 0:00:00 loss 3.4123 (0.98 lnK) lr 0.05 "
        "123.4 samples/s wait 3% protos 7 queue",
    ]


@pytest.mark.parametrize(("seconds_per_step", "expected"), [(0.0, 3), (1.0, 24)])
def test_off_terminal_lines_come_every_n_steps_and_at_a_steady_interval(
    monkeypatch: pytest.MonkeyPatch, seconds_per_step: float, expected: int
) -> None:
    """120 steps, a line every 50 steps and every 5 s: a still clock gives steps 50, 100 and the
    last; a clock moving 1 s per step also gives every 5th step (24 lines, 50 and 100 among them)."""
    monkeypatch.setenv(progress.EVERY_S_ENV, "5")
    now = [0.0]
    reporter, buffer = _plain(now, every_steps=50)
    reporter.start(120, 0, steps_per_epoch=60)
    for step in range(1, 121):
        now[0] += seconds_per_step
        reporter.step(_record(step))
    reporter.close()
    steps = [int(m) for m in re.findall(r"^pretrain step (\d+)/120 ", buffer.getvalue(), re.M)]
    assert len(steps) == expected
    assert {50, 100, 120} <= set(steps)
    if seconds_per_step:
        assert steps == list(range(5, 121, 5))


def test_a_resumed_run_counts_its_lines_and_eta_from_where_it_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(progress.EVERY_S_ENV, "1000")
    now = [0.0]
    reporter, buffer = _plain(now, every_steps=10)
    reporter.start(100, 60, steps_per_epoch=50)
    for step in range(61, 71):
        now[0] += 1.0
        reporter.step(_record(step, epoch=1))
    reporter.close()
    assert (
        buffer.getvalue()
        .splitlines()[0]
        .startswith("pretrain step 70/100 epoch 2/2 elapsed 0:00:10 ETA 0:00:30 ")
    )


def test_the_interval_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.EVERY_S_ENV, "0.5")
    assert progress.log_every_s() == 0.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(progress.EVERY_S_ENV, bad)
        assert progress.log_every_s() == progress.LOG_EVERY_S


# ---------------------------------------------------------------------------------------------
# Warnings


def test_a_python_warning_from_two_places_is_printed_once_and_handed_back_after() -> None:
    buffer = io.StringIO()
    stages = StageProgress(Console(file=buffer, force_terminal=False, width=200))
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        with stages.stage("extract", 2, "images") as advance:
            warnings.warn("This DataLoader will create 4 worker processes", UserWarning, stacklevel=1)
            advance(1)
            warnings.warn("This DataLoader will create 4 worker processes", UserWarning, stacklevel=1)
            advance(1)
        assert warnings.showwarning is before
    assert buffer.getvalue().count("warning: This DataLoader will create 4 worker processes") == 1


# ---------------------------------------------------------------------------------------------
# A real pseudo-terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _start_in_pty(
    args: list[str], cwd: Path, columns: int, **env: str
) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m swavctl ARGS`` with stdin/stdout/stderr on a new pseudo-terminal ``columns`` wide,
    in its own session and process group (as a shell runs a foreground job)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    full_env = cli_env(COLUMNS=str(columns), TERM="xterm-256color", **env)
    full_env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "swavctl", *args],
        cwd=cwd,
        env=full_env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    return proc, master


def _drain(master: int, sink: bytearray, *, until_exit: subprocess.Popen[bytes] | None = None) -> None:
    """Read what is ready on ``master`` into ``sink`` (until EOF after ``until_exit`` exits)."""
    while True:
        ready, _, _ = select.select([master], [], [], 0.05 if until_exit is not None else 0)
        if not ready:
            if until_exit is None or until_exit.poll() is None:
                if until_exit is None:
                    return
                continue
            return
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed (the process exited)
            return
        if not chunk:
            return
        sink.extend(chunk)


def _screen_lines(raw: bytes) -> list[str]:
    """The output as the terminal's successive line states (split on CR and LF, escapes removed)."""
    text = ANSI.sub("", raw.decode(errors="replace"))
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("progress") / "images")


def test_under_a_terminal_of_60_80_and_120_columns_the_essentials_stay(folder: Path, tmp_path: Path) -> None:
    runs = {}
    for columns in (60, 80, 120):  # the three at once: a tiny run is mostly start-up
        runs[columns] = _start_in_pty(
            [
                "pretrain",
                "--preset",
                "smoke",
                "--data",
                str(folder),
                "--out",
                f"run{columns}",
                "--epochs",
                "1",
            ],
            tmp_path,
            columns,
        )
    for columns, (proc, master) in runs.items():
        raw = bytearray()
        try:
            _drain(master, raw, until_exit=proc)
            assert proc.wait(timeout=180) == 0, raw.decode(errors="replace")[-3000:]
        finally:
            os.close(master)
        text = raw.decode(errors="replace")
        assert "\x1b[?25l" in text and text.rindex("\x1b[?25h") > text.rindex("\x1b[?25l")
        bars = [line for line in _screen_lines(bytes(raw)) if re.search(r"\b\d/4\b.*loss", line)]
        assert bars, text[-2000:]
        for line in bars:
            assert len(line) <= columns, (columns, line)
            assert "…" not in line
        last = bars[-1]
        assert "4/4" in last and re.search(r"loss \d\.\d{4}", last) and "ETA 0:00:0" in last, last
        if columns >= 80:
            assert "epoch 1/1" in last and "samples/s" in last, last
        assert "done: 4 steps" in text
        assert not (tmp_path / f"run{columns}" / TB_DIR).exists()  # TensorBoard is off by default


def test_ctrl_c_restores_the_cursor_and_the_stop_message_stands_on_its_own_line(
    folder: Path, tmp_path: Path
) -> None:
    proc, master = _start_in_pty(
        ["pretrain", "--preset", "smoke", "--data", str(folder), "--out", "run", "--epochs", "50"],
        tmp_path,
        80,
        SWAVCTL_TEST_STEP_SLEEP="0.2",
    )
    raw = bytearray()
    try:
        wait_until(
            lambda: (_drain(master, raw), last_logged_step(tmp_path / "run") >= 1)[1],
            timeout=180,
            proc=proc,  # type: ignore[arg-type]
        )
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        _drain(master, raw, until_exit=proc)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = raw.decode(errors="replace")
    assert text.rindex("\x1b[?25h") > text.rindex("\x1b[?25l")
    plain = ANSI.sub("", text)
    at = plain.index("stopped by SIGINT at step ")
    assert plain[at - 1] == "\n", repr(plain[at - 200 : at + 40])
    assert "swavctl: SIGINT received" in plain


@pytest.mark.parametrize("width", [60, 80, 120])
def test_a_stage_line_keeps_its_count_and_eta_at_each_width(width: int) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=width, soft_wrap=True)
    now = [0.0]
    note = "epoch 3/100 loss 1.234567 lr 0.1 wd 1e-06 best val top-1 87.5%"
    stages = StageProgress(console, clock=lambda: now[0])
    with stages.stage("linear", 4000, "steps") as advance:
        now[0] = 20.0
        advance(1000, note)
        assert stages._live is not None
        stages._live.refresh()  # draw now, as the refresh thread does 4 times a second
        drawn = buffer.getvalue()
    lines = [line for line in re.split(r"[\r\n]", ANSI.sub("", drawn)) if line.strip()]
    last = lines[-1]
    assert len(last) <= width and "1000/4000" in last and "ETA 0:01:00" in last, last
    assert "epoch 3/100" in last  # the note, cut short where it must be


def test_ctrl_c_inside_a_stage_shows_the_cursor_again_and_ends_the_line() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=80)
    with pytest.raises(KeyboardInterrupt), StageProgress(console).stage("extract", 10, "images") as advance:
        advance(3)
        raise KeyboardInterrupt
    text = buffer.getvalue()
    assert "\x1b[?25l" in text and text.rindex("\x1b[?25h") > text.rindex("\x1b[?25l")
    assert text.endswith("\n\x1b[?25h")  # the line ended, then the cursor shown
