"""Faults in a real 2-process CPU run (gloo): a NaN on one rank, a full disk, a rank that raises.

The NaN run stops at step 3 and leaves the checkpoint of step 2; the full-disk test resumes from a
copy of that folder under RLIMIT_FSIZE, so the next checkpoint (step 4) cannot be written.
"""

from __future__ import annotations

import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swavctl.weights import checkpoint as ckpt
from tests.conftest import cli_env, pids_with_env, run_cli, start_watched, wait_until, write_image_folder

TWO = ("pretrain", "--preset", "smoke", "--gpus", "0", "--procs", "2", "--batch-size", "4")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=32))


@pytest.fixture(scope="module")
def nan_run(
    tmp_path_factory: pytest.TempPathFactory, images: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    cwd = tmp_path_factory.mktemp("nan")
    done = run_cli(*TWO, "--data", images, "--out", "run", cwd=cwd, env=cli_env(SWAVCTL_TEST_NAN_AT="1:3"))
    return done, cwd / "run"


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_nan_on_rank_1_stops_every_rank_naming_step_and_rank(
    nan_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, run_dir = nan_run
    assert done.returncode == 1, done.stderr
    line = error_line(done.stderr)
    assert "non-finite loss on rank 1 at step 3" in line
    assert "[all 2 ranks stopped, exit status 1]" in line
    assert f"the last good checkpoint is {run_dir.name}/checkpoints/step-000000002.pt" in line
    assert "Traceback" not in done.stderr
    # Stopped before the optimizer step: the checkpoint of step 2 is the newest and it verifies.
    assert [c.step for c in ckpt.list_committed(run_dir / "checkpoints")] == [2]
    assert ckpt.verify(ckpt.checkpoint_at(run_dir, 2)) is None
    assert not (run_dir / "summary.json").exists() and not (run_dir / "backbone.safetensors").exists()


def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_every_rank(
    tmp_path: Path, images: str, nan_run: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    shutil.copytree(nan_run[1], tmp_path / "run")
    limit = 256 * 1024  # metrics, settings and logs fit; a checkpoint (about 2 MB) does not
    done = subprocess.run(
        [sys.executable, "-m", "swavctl", *TWO, "--data", images, "--out", "run"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert done.returncode == 1, done.stderr
    line = error_line(done.stderr)
    assert "could not write checkpoint run/checkpoints/step-000000004.pt" in line
    assert "[errno 27 EFBIG] File too large" in line
    assert "[all 2 ranks stopped, exit status 1]" in line
    committed = ckpt.list_committed(tmp_path / "run" / "checkpoints")
    assert [c.step for c in committed] == [2] and ckpt.verify(committed[0]) is None
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000000002.json",
        "step-000000002.pt",
    ]


def test_a_rank_that_raises_stops_all_ranks_quickly_naming_it_and_leaves_no_process(
    tmp_path: Path, images: str
) -> None:
    marker = f"raise-{random.getrandbits(48)}"
    proc = start_watched(
        *TWO, "--data", images, "--out", "run", cwd=tmp_path,
        env=cli_env(SWAVCTL_TEST_RAISE_AT="1:5", SWAVCTL_TEST_MARKER=marker),
    )  # fmt: skip
    try:
        # "Quickly" counts from the failure (the failing rank prints its traceback at once), not
        # from a start-up whose length depends on how busy the machine is.
        wait_until(lambda: "[rank 1] Traceback" in proc.stderr() or proc.proc.poll() is not None, timeout=300)
        assert "[rank 1] Traceback" in proc.stderr(), proc.stderr()[-3000:]  # where it failed
        code, errors = proc.exit_within(60)
    finally:
        proc.kill()
    assert code == 1, errors
    line = error_line(errors)
    assert "rank 1 failed: RuntimeError: injected failure on rank 1 at step 5" in line
    assert "rank 0: stopped when a peer failed (exit status 1)" in line
    # Its helpers (workers, multiprocessing's resource tracker) leave with it: the piped stderr
    # this test used to read waited for them the same way, until every copy of the pipe closed.
    wait_until(lambda: pids_with_env(f"SWAVCTL_TEST_MARKER={marker}") == [], timeout=60)
    assert [c.step for c in ckpt.list_committed(tmp_path / "run" / "checkpoints")] == [2, 4]


def test_under_torchrun_the_rank_that_meets_a_user_error_names_it(tmp_path: Path) -> None:
    """Workers started by torchrun or srun each print for themselves: the rank that met a bad file
    (data.on_bad_image=error) must say which and why; the other only sees its peer go."""
    from swavctl.config import resolve
    from swavctl.data.sampler import EpochBatchSampler
    from swavctl.files.image_folder import list_images
    from tests.conftest import free_port, start_cli

    data = write_image_folder(tmp_path / "images", per_class=32)
    seed = resolve(preset="smoke").train.seed
    batch = next(iter(EpochBatchSampler(64, batch_size=4, epoch=0, seed=seed, rank=1, world_size=2)))
    bad = list_images(data)[batch[0][1]]
    bad.write_bytes(b"not an image")  # rank 1's first batch only
    port = str(free_port())
    args = (
        "pretrain",
        "--preset",
        "smoke",
        "--gpus",
        "0",
        "--batch-size",
        "4",
        "--data",
        str(data),
        "--out",
        "run",
        "--set",
        "data.on_bad_image=error",
    )
    workers = [
        start_cli(
            *args,
            cwd=tmp_path,
            env=cli_env(
                RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )  # fmt: skip
        for r in range(2)
    ]
    results = [w.communicate(timeout=180) for w in workers]
    assert workers[1].returncode == 2, results[1][1][-2000:]
    lines = [line for line in results[1][1].splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: [rank 1] unreadable image (data.on_bad_image=error): {bad}: not a recognised image format"
    ]
    assert workers[0].returncode != 0


def test_workers_given_rank_and_world_without_a_master_address_meet_on_this_machine(tmp_path: Path) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK set by hand, MASTER_ADDR left out: 127.0.0.1 (documented), not a
    traceback from torch's env:// rendezvous on every rank."""
    from tests.conftest import free_port, start_cli

    data = write_image_folder(tmp_path / "images", per_class=8)
    port = str(free_port())
    workers = []
    for r in range(2):
        env = cli_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_PORT=port)
        env.pop("MASTER_ADDR", None)
        args = ("pretrain", "--preset", "smoke", "--gpus", "0", "--batch-size", "4", "--max-steps", "1")
        workers.append(start_cli(*args, "--data", str(data), "--out", "run", cwd=tmp_path, env=env))
    results = [w.communicate(timeout=180) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "Traceback" not in results[0][1] + results[1][1]


def test_the_launchers_summary_groups_alike_ranks_and_blames_only_the_rank_that_failed() -> None:
    """With many workers, ranks the launcher stopped after a peer's error are said to be that, in
    one group, not "killed by the out-of-memory killer" one by one; Ctrl-C twice is an interruption."""
    from swavctl.distributed.outcomes import INTERRUPTED, KILLED, USER_ERROR, Outcome, combine_outcomes

    error = Outcome(USER_ERROR, 2, "32 images are fewer than one global batch of 48", 1)
    failures = {r: "exit status 143" for r in (0, 2, 3, 4)} | {5: "killed by SIGKILL"}
    combined = combine_outcomes({1: error}, 6, failures=failures)
    assert combined.status == USER_ERROR and combined.exit_code == 2
    assert combined.message == (
        "rank 1 failed: 32 images are fewer than one global batch of 48; other ranks: "
        "ranks 0, 2-4: stopped by the launcher after a peer failed, "
        "rank 5: exited without a report (killed by SIGKILL)"
    )
    twice = combine_outcomes({}, 3, failures={r: "exit status 130" for r in range(3)}, received=2)
    assert (twice.status, twice.exit_code) == (INTERRUPTED, 130)
    assert twice.message == "stopped at once by SIGINT [all 3 ranks stopped, exit status 130]"
    lost = combine_outcomes({}, 2, failures={1: "killed by SIGKILL"})
    assert lost.status == KILLED and "out-of-memory" in lost.message  # no peer error to explain it
