"""The launcher's scratch folders: removed at the end, and by a later launch after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swavctl.distributed.launch import SCRATCH_PREFIX
from swavctl.distributed.scratch import LOCK_FILE, MIN_AGE_S, remove_abandoned
from tests.conftest import (
    cli_env,
    last_logged_step,
    pids_with_env,
    run_cli,
    spawned_workers,
    start_cli,
    wait_until,
    write_image_folder,
)

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0", "--procs", "2", "--batch-size", "4")


def _folder(parent: Path, name: str, *, lock: bool = True, age_s: float = 2 * MIN_AGE_S) -> Path:
    folder = parent / name
    (folder / "logs").mkdir(parents=True)
    if lock:
        (folder / LOCK_FILE).touch()
        past = time.time() - age_s
        os.utime(folder / LOCK_FILE, (past, past))
    return folder


def _hold(folder: Path) -> subprocess.Popen[str]:
    """A real process that joins ``folder`` as a worker does, then waits."""
    code = (
        "import sys, time; from pathlib import Path; from swavctl.distributed import scratch; "
        "scratch.join(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _has_open(pid: int, path: Path) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:  # closed since the listing
            continue
    return False


def test_only_folders_nobody_holds_and_old_enough_are_removed(tmp_path: Path) -> None:
    abandoned = _folder(tmp_path, f"{SCRATCH_PREFIX}dead")
    held = _folder(tmp_path, f"{SCRATCH_PREFIX}held")
    young = _folder(tmp_path, f"{SCRATCH_PREFIX}young", age_s=0)  # made a moment ago: no lock held yet
    unlocked = _folder(tmp_path, f"{SCRATCH_PREFIX}nolock", lock=False)  # not made by this module
    other = _folder(tmp_path, "someone-else-dead")
    holder = _hold(held)
    try:
        assert remove_abandoned(tmp_path, SCRATCH_PREFIX) == [abandoned]
        assert not abandoned.exists() and held.exists() and young.exists() and unlocked.exists()
        assert other.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the holder's lock with the process: now the folder is abandoned too.
    assert remove_abandoned(tmp_path, SCRATCH_PREFIX) == [held]
    assert young.exists() and unlocked.exists() and other.exists()


@pytest.mark.usefixtures("one_thread")
def test_a_launch_removes_the_folder_a_killed_launcher_left(tmp_path: Path) -> None:
    """kill -9 of the launcher mid-run leaves its scratch folder behind. While its workers live
    (stopped here with SIGSTOP, so they cannot follow the launcher out) they hold it; once they
    are gone too, the next launch removes it (the lock file is aged past MIN_AGE_S by hand), and
    its own folder at its end."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    images = str(write_image_folder(tmp_path / "images", per_class=8))
    marker = f"scratch-{os.getpid()}-{time.monotonic_ns()}"
    env = cli_env(
        TMPDIR=str(scratch),
        SWAVCTL_TEST_STEP_SLEEP="0.2",
        SWAVCTL_TEST_MARKER=marker,
    )
    proc = start_cli(
        *SMOKE, "--data", images, "--out", "killed", "--set", "train.epochs=50", cwd=tmp_path, env=env
    )
    wait_until(lambda: last_logged_step(tmp_path / "killed") >= 2, timeout=120, proc=proc)
    left = [p for p in scratch.iterdir() if p.name.startswith(SCRATCH_PREFIX)]
    assert len(left) == 1 and (left[0] / LOCK_FILE).exists()
    # Spawned workers inherit no file from the launcher: each opens the lock itself.
    workers = spawned_workers(marker)
    assert len(workers) == 2 and all(_has_open(pid, left[0] / LOCK_FILE) for pid in workers)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)  # (its pipes stay open in the stopped workers)
        past = time.time() - 2 * MIN_AGE_S
        os.utime(left[0] / LOCK_FILE, (past, past))
        assert remove_abandoned(scratch, SCRATCH_PREFIX) == []  # the orphaned workers hold it
        assert left[0].exists()
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pids_with_env(marker) == [], timeout=60)
    proc.communicate(timeout=30)
    result = run_cli(
        *SMOKE,
        "--data",
        images,
        "--out",
        "next",
        "--max-steps",
        "1",
        cwd=tmp_path,
        env=cli_env(TMPDIR=str(scratch)),
    )
    assert result.returncode == 0, result.stderr
    assert [p.name for p in scratch.iterdir() if p.name.startswith(SCRATCH_PREFIX)] == []
