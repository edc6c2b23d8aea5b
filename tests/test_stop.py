"""Stopping on a signal when the loop cannot reach a step boundary: real processes, real signals.

A recorded signal waits for the next step boundary (a checkpoint, then exit 130/143). That must not
leave a user unable to stop a worker stuck in a rendezvous with a peer that never comes, or in a
collective with a hung peer; nor may it turn one Ctrl-C in a terminal (which reaches the workers
directly and again through the launcher) into an exit without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swavctl.distributed.stop import REPEAT_AFTER_S
from swavctl.weights import checkpoint as ckpt
from tests.conftest import (
    Watched,
    cli_env,
    free_port,
    last_logged_step,
    start_watched,
    wait_until,
    write_image_folder,
)

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0", "--batch-size", "4")
# A process-group timeout far beyond the test's patience: waiting for it is the bug.
PATIENT = ("--set", "dist.timeout_s=300")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=32))


def _worker(rank: int, port: int, images: str, cwd: Path, *extra: str) -> Watched:
    """Rank ``rank`` of 2, as torchrun would start it (the peer is started, or not, by the test)."""
    env = cli_env(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SWAVCTL_TEST_STEP_SLEEP="0.1",
    )  # fmt: skip
    return start_watched(*SMOKE, *PATIENT, *extra, "--data", images, "--out", "run", cwd=cwd, env=env)


#: What rank 0 says on its first SIGINT while training: it checkpoints at the step's end.
SIGINT_HEARD = "swavctl: SIGINT received: checkpointing at the end of this step"


def test_ctrl_c_in_a_rendezvous_whose_peer_never_comes_exits_at_once(tmp_path: Path, images: str) -> None:
    lonely = _worker(0, free_port(), images, tmp_path)
    try:
        # Printed after the signal handlers are installed, just before the blocking join.
        lonely.wait_for("waiting for all 2 processes to join the process group at 127.0.0.1:")
        lonely.proc.send_signal(signal.SIGINT)
        code, errors = lonely.exit_within(15)
    finally:
        lonely.kill()
    assert code == 130, errors[-2000:]
    assert "swavctl: SIGINT before the first step: stopping now" in errors


def test_a_second_signal_ends_a_worker_stuck_in_a_collective_with_a_hung_peer(
    tmp_path: Path, images: str
) -> None:
    port = free_port()
    ranks = [_worker(rank, port, images, tmp_path) for rank in range(2)]
    try:
        wait_until(lambda: last_logged_step(tmp_path / "run") >= 3, timeout=180, proc=ranks[0].proc)
        ranks[1].proc.send_signal(signal.SIGSTOP)  # hung, not dead: its connections stay open
        ranks[0].proc.send_signal(signal.SIGINT)  # recorded; the next step's agreement never completes
        ranks[0].wait_for(SIGINT_HEARD)
        # About time itself: the first signal waits for a step boundary that never comes, and a
        # second one counts as "stop now" only REPEAT_AFTER_S after the first.
        time.sleep(REPEAT_AFTER_S + 1)
        assert ranks[0].proc.poll() is None
        ranks[0].proc.send_signal(signal.SIGINT)
        code, errors = ranks[0].exit_within(15)
    finally:
        for rank in ranks:
            rank.kill()
    assert code == 130, errors[-2000:]
    assert "swavctl: SIGINT again: stopping now; committed checkpoints are kept" in errors
    assert all(ckpt.verify(c) is None for c in ckpt.list_committed(tmp_path / "run" / "checkpoints"))


def test_one_ctrl_c_in_a_terminal_still_checkpoints_at_the_step_boundary(tmp_path: Path, images: str) -> None:
    """The terminal signals the whole process group: each worker gets SIGINT from it and again from
    the launcher, within milliseconds. That is one request: checkpoint, then exit 130."""
    launcher = start_watched(
        *SMOKE, "--procs", "2", "--data", images, "--out", "run", cwd=tmp_path,
        env=cli_env(SWAVCTL_TEST_STEP_SLEEP="0.1"), start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: last_logged_step(tmp_path / "run") >= 3, timeout=180, proc=launcher.proc)
        os.killpg(launcher.pid, signal.SIGINT)
        code, errors = launcher.exit_within(120)
    finally:
        launcher.kill()
    assert code == 130, errors[-2000:]
    text = " ".join(errors.split())
    assert "stopped by SIGINT at step" in text and "stopping now" not in text, errors[-2000:]
    assert text.endswith("re-run the same command to resume"), errors[-2000:]
    assert text.count("SIGINT received") == 1, errors[-2000:]  # rank 0 says it, once
    # torchelastic's own log lines ("Received 2 death signal, shutting down workers") stay quiet.
    assert "elastic/" not in errors and "death signal" not in errors, errors[-2000:]
    stopped_at = int(text.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert [c.step for c in ckpt.list_committed(tmp_path / "run" / "checkpoints")][-1] == stopped_at


def _maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has loaded torch's shared library (it is importing torch, or past it)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_while_starting_says_interrupted(tmp_path: Path, images: str) -> None:
    """Typer turns KeyboardInterrupt into a silent status 130 (every command); the user gets a line."""
    args = ["pretrain", "--data", images, "--preset", "smoke", "--gpus", "0", "--out", "run"]
    proc = start_watched(*args, cwd=tmp_path, env=cli_env())
    try:
        # Importing torch: past the interpreter's start, long before any handler of the training loop.
        wait_until(lambda: _maps_torch(proc.pid), timeout=60, proc=proc.proc, stderr=proc.stderr)
        proc.proc.send_signal(signal.SIGINT)
        code, err = proc.exit_within(60)
    finally:
        proc.kill()
    assert code == 130, err
    assert "swavctl: interrupted" in err


def test_ctrl_c_twice_under_the_launcher_exits_130_saying_the_ranks_stopped_at_once(
    tmp_path: Path, images: str
) -> None:
    """A second Ctrl-C 2 s or more after the first ends the workers at once (no checkpoint); the
    launcher reports that as the interruption it is (130), not as ranks killed without a report."""
    launcher = start_watched(
        *SMOKE, "--procs", "2", "--data", images, "--out", "run", cwd=tmp_path,
        env=cli_env(SWAVCTL_TEST_STEP_SLEEP="4"), start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: last_logged_step(tmp_path / "run") >= 1, timeout=180, proc=launcher.proc)
        os.killpg(launcher.pid, signal.SIGINT)  # recorded: the step in progress sleeps on
        launcher.wait_for(SIGINT_HEARD)
        time.sleep(REPEAT_AFTER_S + 0.5)  # about time itself: a repeat counts from REPEAT_AFTER_S on
        os.killpg(launcher.pid, signal.SIGINT)
        code, errors = launcher.exit_within(60)
    finally:
        launcher.kill()
    assert code == 130, errors[-2000:]
    assert "swavctl: SIGINT again: stopping now" in errors
    assert "stopped at once by SIGINT [all 2 ranks stopped, exit status 130]" in errors, errors[-2000:]
    assert "without a report" not in errors


def test_a_signal_after_the_last_step_ends_the_process_at_once() -> None:
    """After the loop no step boundary comes to act on a recorded signal: a rank waiting in the
    final barrier for a dead peer must leave on the launcher's SIGTERM, not sit until SIGKILL."""
    code = (
        "import os, signal, time\n"
        "from swavctl.distributed.stop import StopFlag\n"
        "flag = StopFlag(); flag.install(); flag.watching = True\n"
        "flag.watching, flag.finished = False, True  # as the loop leaves it\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert "swavctl: SIGTERM after the last step: stopping now" in done.stderr
    assert time.monotonic() - started < 20
