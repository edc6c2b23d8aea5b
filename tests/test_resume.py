"""Exact, crash-safe resume: real kills and signals, then the same command again.

The criterion: the final ``backbone.safetensors`` of an interrupted-and-resumed run equals the one
of an uninterrupted run, bit for bit. The runs use a queue (filled from the first epoch, saved per
rank), checkpoints every 3 steps (so resumes start mid-epoch) and 2 epochs of 8 steps.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from swavctl.files.latest import latest_run
from swavctl.weights import checkpoint as ckpt
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

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0")
QUEUE = (
    "--set",
    "swav.queue_length=16",
    "--set",
    "swav.queue_start_epoch=0",
    "--set",
    "checkpoint.every_steps=3",
)
TWO = ("--procs", "2", "--batch-size", "4")
SLOW = {"SWAVCTL_TEST_STEP_SLEEP": "0.1"}  # so a signal lands mid-run, not after the end


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=32))


@pytest.fixture(scope="module")
def reference_single(tmp_path_factory: pytest.TempPathFactory, images: str) -> Path:
    """An uninterrupted single-process run; returns its folder."""
    cwd = tmp_path_factory.mktemp("ref-single")
    done = run_cli(*SMOKE, *QUEUE, "--data", images, "--out", "run", cwd=cwd, env=cli_env())
    assert done.returncode == 0, done.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def reference_two(tmp_path_factory: pytest.TempPathFactory, images: str) -> Path:
    """An uninterrupted 2-process run started by torchrun (the interrupted ones use swavctl's launcher)."""
    cwd = tmp_path_factory.mktemp("ref-two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # The same command as the launcher's runs (--procs 2 is what torchrun provides anyway), so the
    # resolved settings in the exports' metadata agree.
    args = [*SMOKE, *QUEUE, *TWO, "--data", images, "--out", "run", "--json"]
    done = subprocess.run(
        [*torchrun, "-m", "swavctl", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 alone prints it
    assert summary["world_size"] == 2 and summary["steps"] == 16
    return cwd / "run"


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:  # type: ignore[no-untyped-call]
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118


def assert_bitwise_equal_exports(got: Path, expected: Path, *, same_metadata: bool = True) -> None:
    """Every tensor bit-identical (and the payload hash), and the same metadata.

    Whole files are not compared byte for byte: safetensors writes the metadata from a hash map,
    in an order that changes from process to process.
    """
    (a, meta_a), (b, meta_b) = read_export(got), read_export(expected)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{key} differs"
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), f"{key} differs in its bits"
    assert meta_a["payload_sha256"] == meta_b["payload_sha256"]
    if same_metadata:
        # provenance records when and by which command each file was made: it differs by design.
        assert "provenance" in meta_a and "provenance" in meta_b
        assert {k: v for k, v in meta_a.items() if k != "provenance"} == {
            k: v for k, v in meta_b.items() if k != "provenance"
        }


def _assert_equal_trees(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_equal_trees(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_trees(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_same_final_state(run: Path, reference: Path, step: int = 16) -> None:
    """The final checkpoints agree in all they save for the next resume: the model, the optimizer's
    momentum, every rank's queue, and every rank's python, numpy and torch random states."""
    got = torch.load(ckpt.checkpoint_at(run, step).state_path, weights_only=True)
    expected = torch.load(ckpt.checkpoint_at(reference, step).state_path, weights_only=True)
    for key in ("model", "optimizer", "queues", "rng", "step"):
        _assert_equal_trees(got[key], expected[key], key)


def committed_steps(run_dir: Path) -> list[int]:
    return [c.step for c in ckpt.list_committed(run_dir / ckpt.CHECKPOINT_DIR)]


def test_kill_9_single_process_with_truncated_latest_then_resume_is_bitwise_equal(
    tmp_path: Path, images: str, reference_single: Path
) -> None:
    """kill -9 after step k (7..12), truncate the newest checkpoint, re-run the same command."""
    k = random.randint(7, 12)
    command = (*SMOKE, *QUEUE, "--data", images)  # no --out: the re-run finds runs/latest itself
    proc = start_cli(*command, cwd=tmp_path, env=cli_env(**SLOW))
    runs = tmp_path / "runs"
    wait_until(
        lambda: (run := latest_run(runs)) is not None and last_logged_step(run) >= k, timeout=180, proc=proc
    )
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run_dir = latest_run(runs)
    assert run_dir is not None
    steps = committed_steps(run_dir)
    assert len(steps) >= 2, steps
    newest = ckpt.checkpoint_at(run_dir, steps[-1]).state_path
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    again = run_cli(*command, "--json", cwd=tmp_path, env=cli_env())
    assert again.returncode == 0, again.stderr
    text = " ".join(again.stderr.split())
    assert f"skipping checkpoint {newest}" in text and "truncated" in text
    summary = json.loads(again.stdout)
    assert Path(summary["out_dir"]).resolve() == run_dir  # the same run folder, resumed
    assert summary["resumed_from_step"] == steps[-2] and summary["steps"] == 16
    # (The run folders differ, runs/<time>-smoke against run, and the metadata records them.)
    assert_bitwise_equal_exports(
        run_dir / "backbone.safetensors", reference_single / "backbone.safetensors", same_metadata=False
    )
    assert_same_final_state(run_dir, reference_single)


def test_kill_9_one_worker_mid_epoch_then_resume_is_bitwise_equal(
    tmp_path: Path, images: str, reference_two: Path
) -> None:
    k = random.choice([4, 5, 6, 7, 9, 10, 11, 12])
    marker = f"SWAVCTL_TEST_MARKER=kill9-{random.getrandbits(48)}"
    command = (*SMOKE, *QUEUE, *TWO, "--data", images, "--out", "run")
    proc = start_cli(*command, cwd=tmp_path, env=cli_env(**SLOW, SWAVCTL_TEST_MARKER=marker.split("=")[1]))
    wait_until(lambda: last_logged_step(tmp_path / "run") >= k, timeout=180, proc=proc)
    workers = spawned_workers(marker)
    assert len(workers) == 2, workers
    victim = max(workers)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    _, errors = proc.communicate(timeout=90)
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0 and elapsed < 60, (proc.returncode, elapsed)
    text = " ".join(errors.split())
    # The rank that died is named (how, when torchelastic saw its exit status first).
    assert re.search(
        r"error: rank \d failed: exited without a report \((killed by SIGKILL|killed by a signal)", text
    )
    assert pids_with_env(marker) == []  # no worker left behind

    again = run_cli(*command, "--json", cwd=tmp_path, env=cli_env())
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["resumed_from_step"] is not None and summary["world_size"] == 2
    assert_bitwise_equal_exports(
        tmp_path / "run" / "backbone.safetensors", reference_two / "backbone.safetensors"
    )


def test_sigterm_at_a_random_step_checkpoints_exits_143_and_resumes_bitwise_equal(
    tmp_path: Path, images: str, reference_two: Path
) -> None:
    k = random.randint(2, 13)
    command = (*SMOKE, *QUEUE, *TWO, "--data", images, "--out", "run")
    proc = start_cli(*command, cwd=tmp_path, env=cli_env(**SLOW))
    wait_until(lambda: last_logged_step(tmp_path / "run") >= k, timeout=180, proc=proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to the workers
    _, errors = proc.communicate(timeout=120)
    assert proc.returncode == 143, errors[-2000:]
    text = " ".join(errors.split())
    assert "stopped by SIGTERM at step" in text, errors[-2000:]
    assert "re-run the same command to resume" in text, errors[-2000:]  # which is done below
    stopped_at = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at >= k
    assert committed_steps(tmp_path / "run")[-1] == stopped_at  # checkpointed at the boundary
    assert ckpt.verify(ckpt.checkpoint_at(tmp_path / "run", stopped_at)) is None
    assert not (tmp_path / "run" / "summary.json").exists()

    again = run_cli(*command, "--json", cwd=tmp_path, env=cli_env())
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed_from_step"] == stopped_at
    assert_bitwise_equal_exports(
        tmp_path / "run" / "backbone.safetensors", reference_two / "backbone.safetensors"
    )
    assert_same_final_state(tmp_path / "run", reference_two)


DEVICE_AUGMENT = ("--set", "data.augment_on=device", "--set", "data.workers=0")


def test_sigterm_with_device_augmentation_on_a_prefetch_thread_resumes_bitwise_equal(
    tmp_path: Path, images: str
) -> None:
    """Batched augmentation in the training process (seeded by the step) made two batches ahead by
    the prefetch thread, stopped by SIGTERM, resumed: equal to an uninterrupted run without the
    thread, so neither the thread nor the resume point changes any crop."""
    reference = run_cli(
        *SMOKE, *QUEUE, *DEVICE_AUGMENT, "--set", "data.prefetch=0", "--data", images, "--out", "ref",
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr
    k = random.randint(2, 13)
    command = (*SMOKE, *QUEUE, *DEVICE_AUGMENT, "--set", "data.prefetch=2", "--data", images, "--out", "run")
    proc = start_cli(*command, cwd=tmp_path, env=cli_env(**SLOW))
    wait_until(lambda: last_logged_step(tmp_path / "run") >= k, timeout=180, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, errors = proc.communicate(timeout=120)
    assert proc.returncode == 143, errors[-2000:]
    again = run_cli(*command, "--json", cwd=tmp_path, env=cli_env())
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed_from_step"] >= k
    assert_bitwise_equal_exports(
        tmp_path / "run" / "backbone.safetensors",
        tmp_path / "ref" / "backbone.safetensors",
        same_metadata=False,
    )


def test_incompatible_resume_exits_2_listing_fields_and_fresh_overrides(
    tmp_path: Path, images: str, reference_single: Path
) -> None:
    shutil.copytree(reference_single, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # as if it had crashed
    changed = (*SMOKE, *QUEUE, "--procs", "2", "--batch-size", "8", "--data", images, "--out", "run")
    refused = run_cli(
        *changed, "--set", "model.prototypes=16", "--set", "optim.lars_exclude_bias_norm=true",
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    line = next(x for x in refused.stderr.splitlines() if x.startswith("error:"))
    assert "cannot resume" in line and "--fresh" in line
    assert "model.prototypes: 8 -> 16" in line and "world_size (queue is per rank): 1 -> 2" in line
    assert "optim.lars_exclude_bias_norm: False -> True" in line  # the optimizer's groups differ
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())

    fresh = run_cli(
        *changed, "--set", "model.prototypes=16", "--fresh", "--json", cwd=tmp_path, env=cli_env()
    )
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["resumed_from_step"] is None
    moved = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1 and sorted(p.name for p in (moved[0] / "checkpoints").iterdir()) == before
    # The earlier run's record moved with its checkpoints; the new run wrote its own.
    assert {"metrics.jsonl", "resolved.toml"} <= {p.name for p in moved[0].iterdir()}
    assert "prototypes = 8" in (moved[0] / "resolved.toml").read_text()
    assert "prototypes = 16" in (tmp_path / "run" / "resolved.toml").read_text()


# ---------------------------------------------------------------------------------------------
# The checkpoint files themselves (no training)


def _save(run_dir: Path, step: int, keep: int = 5) -> Path:
    return ckpt.save_checkpoint(
        run_dir, step, 0, {"step": step, "w": torch.full((64,), float(step))}, keep=keep
    )


@pytest.mark.parametrize("damage", ["truncated", "altered", "no-manifest", "bad-manifest"])
def test_damaged_latest_checkpoint_is_skipped_with_file_and_reason(tmp_path: Path, damage: str) -> None:
    _save(tmp_path, 3)
    newest = _save(tmp_path, 6)
    manifest = newest.with_suffix(".json")
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:-10])
    elif damage == "altered":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "no-manifest":
        manifest.unlink()
    else:
        manifest.write_text("{not json")
    warnings: list[str] = []
    found = ckpt.latest_checkpoint(tmp_path, warn=warnings.append)
    assert found is not None and found[0].step == 3 and found[1]["step"] == 3
    assert len(warnings) == 1 and str(newest) in warnings[0]
    reason = {
        "truncated": "truncated",
        "altered": "hash does not match",
        "no-manifest": "no commit marker",
        "bad-manifest": "unreadable manifest",
    }[damage]
    assert reason in warnings[0]


def test_retention_purges_oldest_only_after_the_new_commit(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep=2)
    assert committed_steps(tmp_path) == [6, 8]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000006.json",
        "step-000000006.pt",
        "step-000000008.json",
        "step-000000008.pt",
    ]


def test_newest_means_last_committed_not_highest_step(tmp_path: Path) -> None:
    """After a remapped or fallen-back resume, new checkpoints can carry lower step numbers."""
    for step in (10, 12):
        _save(tmp_path, step, keep=2)
    _save(tmp_path, 7, keep=2)
    assert committed_steps(tmp_path) == [12, 7]  # step 10 went: it was committed first
    _save(tmp_path, 8, keep=2)
    assert committed_steps(tmp_path) == [7, 8]
    found = ckpt.latest_checkpoint(tmp_path)
    assert found is not None and found[0].step == 8 and found[1]["step"] == 8
    # A damaged manifest can never be used: it is purged first, whatever its step.
    _save(tmp_path, 20, keep=5)
    (tmp_path / "checkpoints" / "step-000000020.json").write_text("{not json")
    _save(tmp_path, 9, keep=2)
    assert committed_steps(tmp_path) == [8, 9]


def test_a_resume_with_fewer_steps_per_epoch_keeps_its_new_checkpoints(tmp_path: Path, images: str) -> None:
    """Step 12 of 8-step epochs resumes as step 6 of 4-step epochs: the old step-10 and step-12
    files must not crowd out the new, lower-numbered checkpoints, nor be resumed from again."""
    keep = ("--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep=2", "--out", "run", "--json")
    first = run_cli(*SMOKE, "--data", images, *keep, "--max-steps", "12", cwd=tmp_path, env=cli_env())
    assert first.returncode == 0, first.stderr
    assert committed_steps(tmp_path / "run") == [10, 12]
    half = ("--set", "data.max_images=32")  # 4 steps per epoch
    second = run_cli(*SMOKE, "--data", images, *half, *keep, cwd=tmp_path, env=cli_env())
    assert second.returncode == 0, second.stderr
    assert "resuming in epoch 1 at batch 2" in second.stderr
    summary = json.loads(second.stdout)
    assert summary["resumed_from_step"] == 6 and summary["steps"] == 8
    # Kept: the step-12 file this run resumed from, then its own step 8 (every_steps=2 from step 6).
    assert committed_steps(tmp_path / "run") == [12, 8]
    assert (tmp_path / summary["checkpoint"]).is_file()
    third = run_cli(*SMOKE, "--data", images, *half, *keep, "--epochs", "3", cwd=tmp_path, env=cli_env())
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["resumed_from_step"] == 8
