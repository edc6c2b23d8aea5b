"""A recipe that fits the run: the global-batch warning and a preset's data-bound k-NN monitor."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from swavctl import config
from swavctl.errors import UserError
from swavctl.train.recipe_fit import batch_mismatch_note
from tests.conftest import cli_env, run_cli, write_image_folder

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0", "--max-steps", "1", "--json")
MISMATCH = "is more than 2x from the"


def test_every_shipped_preset_records_what_it_was_tuned_for() -> None:
    assert config.preset_tuned_for(None) == config.TunedFor(global_batch=4096, devices=64)
    assert config.preset_tuned_for("swav-rn50-800ep") == config.TunedFor(4096, 64)
    assert config.preset_tuned_for("swav-rn50-400ep-bs256") == config.TunedFor(256, 4)
    for name in config.preset_names():
        tuned = config.preset_tuned_for(name)
        assert tuned is not None, name
        settings = config.resolve(preset=name)
        # Each preset's own batch on its own device count is what it was tuned for.
        assert settings.train.batch_size * tuned.devices == tuned.global_batch, name


def test_the_defaults_at_batch_256_name_both_numbers_and_the_bs256_preset() -> None:
    note = batch_mismatch_note(None, batch_size=64, world=4, arch="resnet50")
    assert note is not None
    assert "global batch 256 (64 per device x 4 devices)" in note
    assert "the 4096 (on 64 devices) the built-in defaults were tuned for" in note
    assert "--preset swav-rn50-400ep-bs256 (tuned for 256)" in note
    assert "optim.base_lr, swav.queue_length and swav.freeze_prototypes_steps" in note
    back = batch_mismatch_note("swav-rn50-400ep-bs256", batch_size=64, world=64, arch="resnet50")
    assert back is not None and "--preset swav-rn50-800ep (tuned for 4096)" in back
    # Within 2x either way: no warning.
    assert batch_mismatch_note(None, batch_size=64, world=32, arch="resnet50") is None
    assert batch_mismatch_note(None, batch_size=64, world=128, arch="resnet50") is None
    assert batch_mismatch_note(None, batch_size=64, world=31, arch="resnet50") is not None
    # A preset for another backbone, or one bound to its data (demo), is not offered.
    tiny = batch_mismatch_note("smoke", batch_size=128, world=1, arch="convnet-tiny")
    assert tiny is not None and "--preset" not in tiny


def test_tuned_for_is_preset_metadata(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(
        'extends = "demo"\n\n[tuned_for]\nglobal_batch = 512\ndevices = 4\n\n[train]\nbatch_size = 128\n'
    )
    (tmp_path / "child.toml").write_text('extends = "mine.toml"\n\n[train]\nepochs = 3\n')
    (tmp_path / "plain.toml").write_text("[train]\nepochs = 3\n")
    assert config.resolve(preset=str(tmp_path / "mine.toml")).train.batch_size == 128  # not a setting
    assert config.preset_tuned_for(str(tmp_path / "mine.toml")) == config.TunedFor(512, 4)
    assert config.preset_tuned_for(str(tmp_path / "child.toml")) == config.TunedFor(512, 4)
    assert config.preset_tuned_for(str(tmp_path / "plain.toml")) is None  # unknown: no warning
    assert batch_mismatch_note(str(tmp_path / "plain.toml"), batch_size=1, world=1, arch="x") is None
    (tmp_path / "bad.toml").write_text("[tuned_for]\nglobal_batch = 0\ndevices = 1\n")
    with pytest.raises(UserError, match="needs global_batch and devices"):
        config.resolve(preset=str(tmp_path / "bad.toml"))
    # A printed preset keeps what it was tuned for.
    printed = run_cli("presets", "show", "swav-rn50-400ep-bs256", "--toml", cwd=tmp_path)
    assert tomllib.loads(printed.stdout)["tuned_for"] == {"global_batch": 256, "devices": 4}


def test_a_batch_far_from_the_presets_warns_once_on_rank_0(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "images")
    far = run_cli(
        *SMOKE, "--data", str(data), "--procs", "2", "--batch-size", "16", "--out", "far", cwd=tmp_path,
        env=cli_env(),
    )  # fmt: skip
    assert far.returncode == 0, far.stderr
    assert far.stderr.count(MISMATCH) == 1, far.stderr
    assert "global batch 32 (16 per device x 2 devices)" in far.stderr
    assert "the 8 (on 1 device) preset smoke was tuned for" in far.stderr
    near = run_cli(
        *SMOKE, "--data", str(data), "--batch-size", "16", "--out", "near", cwd=tmp_path, env=cli_env()
    )
    assert near.returncode == 0, near.stderr
    assert MISMATCH not in near.stderr


def test_the_demo_monitor_does_not_follow_the_demo_preset_onto_user_data(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "mine", per_class=64)  # 128 images: one demo batch
    demo = ("pretrain", "--preset", "demo", "--data", str(data), "--gpus", "0", "--max-steps", "1", "--json")
    plain = run_cli(*demo, "--out", "plain", cwd=tmp_path, env=cli_env())
    assert plain.returncode == 0, plain.stderr
    assert "no k-NN monitor: preset demo's monitor.knn_data (demo)" in plain.stderr
    assert "pass --knn-data DIR" in plain.stderr
    assert MISMATCH not in plain.stderr  # the demo's own batch
    assert "knn" not in json.loads(plain.stdout)
    resolved = tomllib.loads((tmp_path / "plain" / "resolved.toml").read_text())
    assert "knn_data" not in resolved["monitor"]
    # An explicit --knn-data still wins: the monitor scores the user's labelled folder.
    own = run_cli(*demo, "--knn-data", str(data), "--out", "own", cwd=tmp_path, env=cli_env())
    assert own.returncode == 0, own.stderr
    assert "no k-NN monitor" not in own.stderr
    knn = json.loads(own.stdout)["knn"]
    assert knn["train_images"] + knn["val_images"] == 128
