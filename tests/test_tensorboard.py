"""TensorBoard events in the run folder (log.tensorboard / --tensorboard), read back with
TensorBoard's own loaders: every scalar of metrics.jsonl once per step, across a kill -9 and a
resume, plus eval-linear's results in the same run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from swavctl.reporting.tensorboard_log import TB_DIR
from tests.conftest import cli_env, last_logged_step, run_cli, start_watched, wait_until, write_image_folder

pytest.importorskip("tensorboard")  # the dev extra includes it; CI reads the events back

from tensorboard.backend.event_processing import plugin_event_multiplexer  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from swavctl.files.latest import latest_run


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``folder`` as TensorBoard reads it: tag -> [(step, value)]."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _last_event_step(run: Path) -> int:
    if not (run / TB_DIR).is_dir():
        return 0
    return max((step for step, _ in _scalars(run / TB_DIR).get("train/loss", [])), default=0)


def _metrics(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_events_match_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    series = _scalars(run / TB_DIR)
    records = _metrics(run)
    assert records
    # Every numeric field (time_utc, a string, is not a scalar).
    keys = {key for r in records for key, v in r.items() if isinstance(v, bool | int | float)} - {
        "step",
        "epoch",
    }
    assert {"loss", "lr", "samples_per_s", "knn_top1", "knn_top5"} <= keys
    for key in keys:  # the k-NN readings are in the records of epoch ends only
        expected = [(int(r["step"]), float(r[key])) for r in records if key in r]  # type: ignore[call-overload, arg-type]
        got = series[f"train/{key}"]
        assert [s for s, _ in got] == [s for s, _ in expected], key  # each step once, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-7), key
    return series


def test_tensorboard_events_survive_a_kill_and_resume_and_take_eval_results(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images")
    args = [
        "pretrain",
        "--preset",
        "smoke",
        "--data",
        str(images),
        "--knn-data",
        str(images),
        "--tensorboard",
    ]
    # Killed at once after step 3 (its checkpoint is at step 2), with step 3 already in the events.
    watched = start_watched(*args, cwd=tmp_path, env=cli_env(SWAVCTL_TEST_STEP_SLEEP="0.3"))
    runs = tmp_path / "runs"
    try:
        wait_until(  # step 3 in metrics.jsonl and in the events (written just after it)
            lambda: (
                (run := latest_run(runs)) is not None
                and last_logged_step(run) >= 3
                and _last_event_step(run) >= 3
            ),
            timeout=180,
            proc=watched.proc,
            stderr=watched.stderr,
        )
        watched.proc.send_signal(signal.SIGKILL)
        watched.proc.wait()
    finally:
        watched.kill()
    run = latest_run(runs)
    assert run is not None
    logged = last_logged_step(run)
    assert any(step > 2 for step, _ in _scalars(run / TB_DIR)["train/loss"])  # past the checkpoint

    # The setting spelled as --set resumes the same run (the same resolved settings).
    resumed = run_cli(*args[:-1], "--set", "log.tensorboard=true", "--json", cwd=tmp_path, env=cli_env())
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and logged >= 3
    series = _assert_events_match_metrics(run)
    assert [s for s, _ in series["train/loss"]] == list(range(1, 9))

    evaluated = run_cli("eval-linear", "--mode", "knn", "--json", cwd=tmp_path, env=cli_env())
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads(evaluated.stdout)
    assert (tmp_path / summary["tensorboard"]).resolve() == (run / TB_DIR).resolve()
    series = _scalars(run / TB_DIR)
    assert series["eval/knn/top1"] == [(8, pytest.approx(summary["top1"]))]
    assert series["eval/knn/top5"] == [(8, pytest.approx(summary["top5"]))]
    _assert_events_match_metrics(run)  # the pretraining series untouched

    # TensorBoard's own loader finds the run under its name, once: runs/latest is a pointer file,
    # not a folder link (both TensorBoard loaders follow links to folders).
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(runs))
    assert sorted(multiplexer.Runs()) == [f"{run.name}/{TB_DIR}"]


def test_without_the_tensorboard_package_the_setting_is_refused_with_the_install_line(tmp_path: Path) -> None:
    # A tensorboard package that cannot be imported, first on the path: as if it were not installed.
    fake = tmp_path / "site" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    images = write_image_folder(tmp_path / "images", per_class=2)
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    done = run_cli(
        "pretrain", "--preset", "smoke", "--data", str(images), "--out", "run",
        "--set", "log.tensorboard=true", cwd=tmp_path, env=cli_env(PYTHONPATH=path),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: log.tensorboard needs the tensorboard package: pip install 'swavctl[tensorboard]' "
        "(or pip install tensorboard)"
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
