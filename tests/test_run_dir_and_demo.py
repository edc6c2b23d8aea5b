"""Choosing the run folder (new, explicit, or the unfinished runs/latest) and the demo dataset."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from swavctl import config
from swavctl.data.demo import demo_dataset
from swavctl.files.image_folder import class_of, list_images
from swavctl.files.latest import follow, latest_run, read_pointer
from swavctl.train.run_dir import (
    SUMMARY_FILE,
    finished_latest_note,
    incompatible_changes,
    point_latest,
    select_run_dir,
    settings_diff,
)


def test_new_folder_then_reuse_unfinished_latest(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    settings = config.resolve(preset="smoke", flags={"data.path": "/data"})
    first, reused = select_run_dir(settings, fresh=False, runs_root=runs)
    assert not reused and first.parent == runs and first.name.endswith("-smoke")
    first.mkdir(parents=True)
    (first / "resolved.toml").write_text(config.to_toml(settings.model_copy(update={"out": str(first)})))
    point_latest(first, runs)
    # Same settings, unfinished: the same command resumes there.
    again, reused = select_run_dir(settings, fresh=False, runs_root=runs)
    assert reused and again == first.resolve()
    # --fresh, other settings, or a finished run: a new folder.
    assert select_run_dir(settings, fresh=True, runs_root=runs)[0] != first
    other = config.resolve(preset="smoke", flags={"data.path": "/data", "train.epochs": 5})
    assert select_run_dir(other, fresh=False, runs_root=runs)[1] is False
    (first / SUMMARY_FILE).write_text("{}")
    assert select_run_dir(settings, fresh=False, runs_root=runs)[1] is False
    # An explicit --out is used as given.
    explicit = config.resolve(preset="smoke", flags={"out": str(tmp_path / "mine")})
    assert select_run_dir(explicit, fresh=False, runs_root=runs) == (tmp_path / "mine", False)


def test_rerunning_a_finished_latest_says_a_new_run_starts_and_how_to_extend_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    settings = config.resolve(preset="smoke", flags={"data.path": "/data"})
    first = runs / "first"
    first.mkdir(parents=True)
    (first / "resolved.toml").write_text(config.to_toml(settings.model_copy(update={"out": str(first)})))
    point_latest(first, runs)
    assert finished_latest_note(settings, fresh=False, runs_root=runs) is None  # unfinished: it resumes
    (first / SUMMARY_FILE).write_text('{"steps": 14, "steps_per_epoch": 7}')
    same = finished_latest_note(settings, fresh=False, runs_root=runs)
    assert same is not None and "already finished with these settings; starting a new run" in same
    # A command that does it (tests/test_suggestions.py runs each one), with nothing of --fresh.
    resume = f"swavctl pretrain --preset {first.resolve()}/resolved.toml --out {first.resolve()}"
    assert f"To continue it to 4 epochs: {resume} --epochs 4" in same
    longer = config.resolve(preset="smoke", flags={"data.path": "/data", "train.epochs": 5})
    note = finished_latest_note(longer, fresh=False, runs_root=runs)
    assert note is not None and "finished its 2 epochs; starting a new run of 5" in note
    other = config.resolve(preset="smoke", flags={"data.path": "/data", "model.prototypes": 9})
    assert finished_latest_note(other, fresh=False, runs_root=runs) is None  # another experiment
    assert finished_latest_note(settings, fresh=True, runs_root=runs) is None
    explicit = config.resolve(preset="smoke", flags={"data.path": "/data", "out": str(first)})
    assert finished_latest_note(explicit, fresh=False, runs_root=runs) is None


def test_incompatible_changes_are_named() -> None:
    old = config.resolve(preset="smoke")
    new = config.resolve(preset="smoke", overrides=["model.prototypes=16", "optim.base_lr=0.2"])
    bad = incompatible_changes(old, new, old_world=1, new_world=1)
    assert bad == {"model.prototypes": (8, 16)}
    assert set(settings_diff(old, new)) == {"model.prototypes", "optim.base_lr"}
    queued = config.resolve(preset="smoke", overrides=["swav.queue_length=64"])
    assert "world_size (queue is per rank)" in incompatible_changes(queued, queued, old_world=1, new_world=2)


def test_demo_dataset_is_real_stratified_and_cached() -> None:
    root = demo_dataset()
    train, val = list_images(root / "train"), list_images(root / "val")
    assert (len(train), len(val)) == (1438, 359)
    assert not {p.name for p in train} & {p.name for p in val}
    labels = [class_of(p, root / "val") for p in val]
    counts = np.unique(labels, return_counts=True)[1]
    assert len(counts) == 10 and counts.min() >= 35 and counts.max() <= 37
    with Image.open(val[0]) as image:
        assert image.size == (32, 32) and image.mode == "L"
        assert np.asarray(image).max() > 200  # real ink, not blank
    stamp = (root / ".complete").stat().st_mtime
    assert demo_dataset() == root and (root / ".complete").stat().st_mtime == stamp


def test_a_busy_cpu_gets_the_one_thread_advice_and_an_idle_one_does_not() -> None:
    from swavctl.train.plan import busy_cpu_note

    note = busy_cpu_note(4.2, 2, 2)
    assert note is not None and "load average 4.2 on 2 cores" in note and "OMP_NUM_THREADS=1" in note
    assert busy_cpu_note(1.5, 2, 2) is None  # e.g. right after an install: room for the run
    assert busy_cpu_note(6.0, 2, 1) is None  # one thread does not spin-wait


def test_latest_is_a_pointer_file_that_replaces_an_old_link_and_is_followed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old, new = runs / "20260101-000000-demo", runs / "20260102-000000-demo"
    old.mkdir(parents=True)
    new.mkdir()
    os.symlink(old.name, runs / "latest")  # as swavctl wrote it before the pointer file
    assert latest_run(runs) == old.resolve() and follow(runs / "latest").resolve() == old.resolve()
    point_latest(new, runs)
    pointer = runs / "latest"
    assert not pointer.is_symlink() and pointer.read_text() == f"{new.name}\n"
    assert latest_run(runs) == new.resolve() and follow(pointer) == new.resolve()
    elsewhere = tmp_path / "elsewhere" / "run"
    elsewhere.mkdir(parents=True)
    point_latest(elsewhere, runs)  # a run outside runs/ is named by its absolute path
    assert pointer.read_text() == f"{elsewhere.resolve()}\n" and latest_run(runs) == elsewhere.resolve()
    shutil.rmtree(elsewhere)  # a pointer to a vanished run leads nowhere, and is reported as given
    assert latest_run(runs) is None and follow(pointer) == pointer
    other = tmp_path / "notes" / "latest"  # any other file named latest is not a pointer
    other.parent.mkdir()
    other.write_text("line one\nline two\n")
    assert follow(other) == other and read_pointer(runs / "20260101-000000-demo") is None
