"""``train.profile_steps``: a real pretraining run profiles a few steps into OUT/profile/."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import write_image_folder

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0")


def test_profile_of_the_steps_after_warmup(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = write_image_folder(tmp_path / "images", per_class=16)
    result = cli(
        *SMOKE, "--data", str(data), "--max-steps", "6", "--set", "train.profile_steps=2", "--out", "run"
    )
    assert result.returncode == 0, result.stderr
    profile = tmp_path / "run" / "profile"
    assert "profile of 2 steps" in result.stderr
    lines = (profile / "phases.txt").read_text().splitlines()
    assert lines[0] == "profiled steps: 2"
    phases = {line.split()[0]: float(line.split()[1]) for line in lines[2:]}
    expected = {"data_wait", "augment", "forward", "loss", "backward", "checks", "optimizer", "bookkeeping"}
    assert set(phases) == expected
    assert all(ms >= 0 for ms in phases.values()) and phases["forward"] > 0 and phases["backward"] > 0
    ops = (profile / "ops.txt").read_text()
    assert "convolution" in ops and "swavctl.forward" in ops
    trace = json.loads((profile / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"swavctl.forward", "swavctl.optimizer"} <= names
    # Exactly the 2 profiled steps: each phase mark appears twice.
    assert sum(event.get("name") == "swavctl.optimizer" for event in trace["traceEvents"]) == 2


def test_a_run_too_short_to_profile_says_so(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = write_image_folder(tmp_path / "images", per_class=16)
    result = cli(
        *SMOKE, "--data", str(data), "--max-steps", "3", "--set", "train.profile_steps=2", "--out", "run"
    )
    assert result.returncode == 0, result.stderr
    assert "no profile was written" in result.stderr
    assert not (tmp_path / "run" / "profile").exists()
