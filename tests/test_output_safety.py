"""Outputs survive crashes and concurrent runs: the run lock, atomic files, commit markers.

Real processes, real signals and real file-size limits (RLIMIT_FSIZE, which Python turns into
EFBIG on write): a full disk looks the same to the writer.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swavctl.errors import OutputWriteError
from swavctl.files.atomic import write_text_atomic
from swavctl.train.run_dir import is_complete
from swavctl.weights import checkpoint as ckpt
from swavctl.weights.safetensors_io import write_safetensors_atomic
from tests.conftest import cli_env, run_cli, start_cli, wait_until, write_image_folder

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0")


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _limited(limit: int) -> object:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _run_limited(limit: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swavctl", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limited(limit),  # type: ignore[arg-type]
    )


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    done = run_cli(*SMOKE, "--data", str(images), "--out", "run", cwd=cwd, env=cli_env())
    assert done.returncode == 0, done.stderr
    return cwd / "run"


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_run_leaves_it_free(
    tmp_path: Path, images: Path
) -> None:
    args = (*SMOKE, "--data", str(images), "--out", "run")
    first = start_cli(*args, cwd=tmp_path, env=cli_env(SWAVCTL_TEST_STEP_SLEEP="600"))  # killed below
    try:
        lock = tmp_path / "run" / ".lock"
        wait_until(lambda: lock.is_file() and bool(lock.read_text().strip()), timeout=120, proc=first)
        assert lock.read_text().strip() == str(first.pid)
        second = run_cli(*args, "--set", "optim.base_lr=0.05", cwd=tmp_path, env=cli_env())
        assert second.returncode == 2, second.stderr
        assert f"is in use by another swavctl run (pid {first.pid})" in _error_line(second.stderr)
        assert first.poll() is None  # untouched by the refused one
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the lock with the killed process: the same command resumes and finishes.
    third = run_cli(*args, cwd=tmp_path, env=cli_env())
    assert third.returncode == 0, third.stderr
    assert is_complete(tmp_path / "run")
    resolved = (tmp_path / "run" / "resolved.toml").read_text()
    assert "base_lr = 0.1" in resolved  # the refused run wrote nothing


def _unfinished_copy(finished: Path, to: Path) -> Path:
    """The finished run as it was before its last checkpoint and summary: resumable at step 2."""
    import shutil

    shutil.copytree(finished, to)
    (to / "summary.json").unlink()
    newest = ckpt.list_committed(to / ckpt.CHECKPOINT_DIR)[-1]
    newest.state_path.unlink()
    newest.manifest_path.unlink()
    return to


def test_resume_reads_the_checkpoints_settings_not_an_emptied_or_edited_resolved_toml(
    tmp_path: Path, images: Path, finished: Path
) -> None:
    args = (*SMOKE, "--data", str(images), "--out", "run")
    run = _unfinished_copy(finished, tmp_path / "run")
    (run / "resolved.toml").write_text("")  # as a kill mid-write left it, before atomic writes
    done = run_cli(*args, cwd=tmp_path, env=cli_env())
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and "changed the meaning" not in done.stderr

    run = _unfinished_copy(finished, tmp_path / "edited")
    text = (run / "resolved.toml").read_text()
    assert "batch_size = 8" in text
    (run / "resolved.toml").write_text(text.replace("batch_size = 8", "batch_size = 4"))
    refused = run_cli(*SMOKE, "--data", str(images), "--out", "edited", "--batch-size", "4", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "train.batch_size: 8 -> 4" in _error_line(refused.stderr)


def test_an_empty_summary_is_not_a_finished_run(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("")
    assert not is_complete(tmp_path)
    write_text_atomic(tmp_path / "summary.json", json.dumps({"steps": 4}))
    assert is_complete(tmp_path)


def test_atomic_writes_remove_dead_writers_temporaries_and_give_the_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "eval.json"
    dead = tmp_path / f".eval.json.tmp-{_dead_pid()}"
    alive = tmp_path / ".eval.json.tmp-1"  # pid 1 is alive: another writer's, left alone
    dead.write_text("{")
    alive.write_text("{")
    write_text_atomic(target, "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".eval.json.tmp-1", "eval.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_safetensors_write_error_is_one_error_and_leaves_no_temporary(tmp_path: Path) -> None:
    code = (
        "import resource, torch\n"
        "from swavctl.errors import OutputWriteError\n"
        "from swavctl.weights.safetensors_io import write_safetensors_atomic\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "try:\n"
        "    write_safetensors_atomic('big.safetensors', {'w': torch.ones(100_000)}, {})\n"
        "except OutputWriteError as exc:\n"
        "    print(type(exc).__name__, exc.exit_code, exc)\n"
    )
    write_safetensors_atomic(tmp_path / "big.safetensors", {"w": torch.zeros(4)}, {})
    before = (tmp_path / "big.safetensors").read_bytes()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.startswith("OutputWriteError 1 big.safetensors: cannot write: File too large"), done
    assert (tmp_path / "big.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
    assert issubclass(OutputWriteError, Exception)


def test_export_under_a_file_size_limit_is_one_line_exit_1_and_keeps_the_old_file(
    tmp_path: Path, finished: Path
) -> None:
    target = tmp_path / "out.safetensors"
    done = run_cli("export", str(finished), "--out", str(target), cwd=tmp_path, env=cli_env())
    assert done.returncode == 0, done.stderr
    before = target.read_bytes()
    limited = _run_limited(
        len(before) // 2, "export", str(finished), "--with-head", "--out", str(target), cwd=tmp_path
    )
    assert limited.returncode == 1, limited.stderr
    assert "out.safetensors: cannot write: File too large" in _error_line(limited.stderr)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_an_eval_that_cannot_finish_leaves_no_eval_json_and_whole_files(
    tmp_path: Path, images: Path, finished: Path
) -> None:
    args = (
        "eval-linear",
        str(finished),
        "--data",
        str(images),
        "--mode",
        "knn",
        "--out",
        "ev",
        "--gpus",
        "0",
    )
    done = run_cli(*args, cwd=tmp_path, env=cli_env())
    assert done.returncode == 0, done.stderr
    predictions = (tmp_path / "ev" / "predictions.csv").read_bytes()
    png = (tmp_path / "ev" / "confusion.png").stat().st_size
    failed = _run_limited(png // 2, *args, cwd=tmp_path)  # the picture no longer fits
    assert failed.returncode == 1, failed.stderr
    assert "confusion.png: cannot write: File too large" in _error_line(failed.stderr)
    names = sorted(p.name for p in (tmp_path / "ev").iterdir())
    assert names == ["confusion.png", "predictions.csv"]  # no eval.json: no complete evaluation here
    assert (tmp_path / "ev" / "predictions.csv").read_bytes() == predictions
    assert (tmp_path / "ev" / "confusion.png").stat().st_size == png


def test_an_inspection_that_cannot_finish_leaves_no_summary_and_no_stale_embeddings(
    tmp_path: Path, images: Path, finished: Path
) -> None:
    args = ("inspect-clusters", str(finished), "--data", str(images), "--out", "insp", "--gpus", "0")
    (tmp_path / "insp").mkdir()
    stale = tmp_path / "insp" / f".embeddings.f32.tmp-{_dead_pid()}"  # a killed inspection's
    stale.write_bytes(b"\0" * 64)
    done = run_cli(*args, cwd=tmp_path, env=cli_env())
    assert done.returncode == 0, done.stderr
    assert not stale.exists()
    assert {"summary.json", "index.html", "assignments.csv"} <= {
        p.name for p in (tmp_path / "insp").iterdir()
    }
    assignments = (tmp_path / "insp" / "assignments.csv").read_bytes()
    failed = _run_limited(len(assignments) // 2, *args, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    line = _error_line(failed.stderr)  # the embeddings or the assignments: whichever crosses the limit
    assert "cannot write" in line and "File too large" in line
    names = {p.name for p in (tmp_path / "insp").iterdir()}
    assert "summary.json" not in names and "index.html" not in names
    assert not [n for n in names if n.startswith(".")]  # neither its temporary nor its embeddings
    assert (tmp_path / "insp" / "assignments.csv").read_bytes() == assignments


def test_eval_names_the_files_it_could_not_read(tmp_path: Path, images: Path, finished: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(images, data)
    bad = data / "class0" / "broken.png"
    bad.write_bytes(b"not a png")
    done = run_cli(
        "eval-linear", str(finished), "--data", str(data), "--mode", "knn", "--val-split", "0.5",
        "--out", "ev", "--gpus", "0", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stderr.split())
    assert "skipped 1 unreadable file(s):" in text and str(bad) in text, done.stderr


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some Lustre and NFS mounts refuse flock (ENOLCK): a cluster run must not fail for a missing
    guard. (Such a mount is not available here, so flock itself is made to answer as it does.)"""
    import errno
    import fcntl

    from swavctl.train.run_dir import run_lock

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said: list[str] = []
    with run_lock(tmp_path / "run", said.append):
        (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert len(said) == 1 and "cannot lock" in said[0] and "would not be refused" in said[0]
