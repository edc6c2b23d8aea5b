"""Settings that can grow: a schema version, and runs and exports of older versions still work.

``tests/fixtures/schema0`` was written by the code before settings had a version (its README says
how); these tests resume that run and load that export with the code of today.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from swavctl import config
from swavctl.errors import UserError
from swavctl.train.run_dir import point_latest, unfinished_latest_note
from swavctl.weights.model_io import load_model
from tests.conftest import cli_env, run_cli, write_image_folder

FIXTURE = Path(__file__).parent / "fixtures" / "schema0"


def _fixture_images(root: Path) -> Path:
    """The images the fixture run trained on (the same generator and arguments)."""
    return write_image_folder(root / "images", classes=2, per_class=8, size=16)


def test_the_fixture_is_of_the_old_schema() -> None:
    old = tomllib.loads((FIXTURE / "run" / "resolved.toml").read_text())
    assert "schema_version" not in old and old["out"] == "run"


def test_settings_carry_the_schema_version_and_no_run_folder() -> None:
    settings = config.resolve(preset="smoke", flags={"out": "somewhere"})
    assert settings.schema_version == config.SCHEMA_VERSION
    text = config.to_toml(settings)
    assert f"schema_version = {config.SCHEMA_VERSION}" in text
    assert "out =" not in text and "somewhere" not in config.recorded_json(settings)


def test_migration_drops_the_old_out_and_refuses_a_newer_version() -> None:
    old = tomllib.loads((FIXTURE / "run" / "resolved.toml").read_text())
    migrated = config.migrate(old, "old")
    assert migrated["schema_version"] == config.SCHEMA_VERSION and "out" not in migrated
    assert config.read_tree(old, "old").model.prototypes == 8
    with pytest.raises(UserError, match="settings schema version 99 is newer than this swavctl"):
        config.migrate({**old, "schema_version": 99}, "new")
    with pytest.raises(UserError, match="schema_version must be a whole number"):
        config.migrate({"schema_version": "1"}, "odd")
    with pytest.raises(UserError, match="invalid value for 'schema_version'"):
        config.resolve(overrides=["schema_version=0"])


def test_an_old_export_still_loads_with_its_head(tmp_path: Path) -> None:
    loaded = load_model(FIXTURE / "export-head-fp16.safetensors")
    assert loaded.settings.model.arch == "convnet-tiny" and loaded.settings.schema_version == 1
    assert loaded.has_head and loaded.step == 2
    old_run = load_model(FIXTURE / "run")  # its checkpoint, as eval-linear and inspect-clusters read it
    assert old_run.step == 2 and old_run.settings.model.prototypes == 8 and old_run.settings.out is None
    result = run_cli(
        "export", str(FIXTURE / "export-head-fp16.safetensors"), "--out", str(tmp_path / "again.safetensors"),
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = run_cli("export", "--info", str(tmp_path / "again.safetensors"), "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    settings = json.loads(json.loads(info.stdout)["metadata"]["settings"])
    assert settings["schema_version"] == config.SCHEMA_VERSION and "out" not in settings
    made = json.loads(json.loads(info.stdout)["metadata"]["provenance"])  # what wrote this file
    assert made["command"].startswith("swavctl export ") and made["torch"]


def test_an_old_run_resumes_and_exports_with_the_new_code(tmp_path: Path) -> None:
    images = _fixture_images(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    result = run_cli(
        "pretrain", "--preset", "smoke", "--gpus", "0", "--data", str(images), "--out", str(run),
        "--set", "optim.momentum=0", "--json", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert "resuming from" in result.stderr and "step-000000002.pt" in result.stderr
    # Its resolved.toml is now of the current version, and the new checkpoint and export load.
    resolved = tomllib.loads((run / "resolved.toml").read_text())
    assert resolved["schema_version"] == config.SCHEMA_VERSION and "out" not in resolved
    assert load_model(run).step == 4
    assert load_model(run / "backbone.safetensors").settings.model.prototypes == 8


def test_an_old_resolved_toml_as_preset_starts_a_new_run(tmp_path: Path) -> None:
    images = _fixture_images(tmp_path)
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    result = run_cli(
        "pretrain", "--preset", "run/resolved.toml", "--data", str(images), "--max-steps", "1", "--json",
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_from_step"] is None and summary["steps"] == 1
    out = tmp_path / summary["out_dir"]
    assert out.parent.name == "runs" and out.name.endswith("-smoke")  # the recipe's preset names it
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before  # untouched
    new = tomllib.loads((out / "resolved.toml").read_text())
    assert new["model"] == tomllib.loads((tmp_path / "run" / "resolved.toml").read_text())["model"]


def test_an_unreadable_unfinished_latest_is_named_not_silently_replaced(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old = runs / "old"
    shutil.copytree(FIXTURE / "run", old)
    (old / "summary.json").unlink()  # unfinished
    text = (old / "resolved.toml").read_text()
    (old / "resolved.toml").write_text("schema_version = 99\n" + text)
    point_latest(old, runs)
    settings = config.resolve(preset="smoke", flags={"data.path": "/data"})
    note = unfinished_latest_note(settings, fresh=False, runs_root=runs)
    assert note is not None and "unfinished run whose settings cannot be read" in note
    assert "schema version 99 is newer" in note and "starting a new run" in note


def test_a_run_whose_checkpoints_are_all_unusable_is_not_silently_restarted(tmp_path: Path) -> None:
    images = _fixture_images(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    state = run / "checkpoints" / "step-000000002.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    metrics = (run / "metrics.jsonl").read_text()
    result = run_cli(
        "pretrain", "--preset", "smoke", "--gpus", "0", "--data", str(images), "--out", str(run),
        "--set", "optim.momentum=0", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"warning: skipping checkpoint {state}" in result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("error:"))
    assert f"cannot resume {run}: none of its 1 committed checkpoint(s) can be used" in line
    assert "--fresh" in line
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing was rewritten
    assert "schema_version" not in (run / "resolved.toml").read_text()
