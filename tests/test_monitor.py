"""The k-NN monitor during pretraining (``monitor.knn_data``, ``--knn-data``).

Checked against the real thing: each reading must be the number ``swavctl eval-linear --mode knn``
gives on the checkpoint of the same step, and a monitored run must train exactly as an
unmonitored one (weights and saved random states bitwise equal).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from swavctl import config
from swavctl.eval.monitor import KnnMonitor, KnnReading, monitor_split
from swavctl.model.swav import SwAV
from swavctl.train.build import build_model
from tests.conftest import cli_env, run_cli, write_image_folder

# The demo digits: a k-NN top-1 well below 1 after a short run, so equal readings mean something.
# Pretraining on 400 of the train digits: 50 steps of 8 per epoch.
PRETRAIN = ("pretrain", "--preset", "smoke", "--gpus", "0", "--data", "demo", "--set", "data.max_images=400")


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _eval_knn(model: Path, cwd: Path) -> float:
    """top-1 of ``swavctl eval-linear MODEL --mode knn`` with its defaults, in its own process."""
    result = run_cli(
        "eval-linear", str(model), "--mode", "knn", "--data", "demo", "--gpus", "0", "--json",
        "--out", str(cwd / f"eval-{model.name}"), cwd=cwd, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return float(json.loads(result.stdout)["top1"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 2-epoch run with and without the monitor (every checkpoint kept)."""
    root = tmp_path_factory.mktemp("monitor")
    common = (*PRETRAIN, "--epochs", "2", "--set", "checkpoint.keep=100", "--json")
    watched = run_cli(*common, "--knn-data", "demo", "--out", "watched", cwd=root, env=cli_env())
    plain = run_cli(*common, "--out", "plain", cwd=root, env=cli_env())
    assert watched.returncode == 0, watched.stderr
    assert plain.returncode == 0, plain.stderr
    (root / "watched.json").write_text(watched.stdout)
    (root / "watched.stderr").write_text(watched.stderr)
    return root


def test_each_reading_is_eval_linear_knn_on_that_steps_weights(runs: Path) -> None:
    run = runs / "watched"
    readings = {r["step"]: r["knn_top1"] for r in _metrics(run) if "knn_top1" in r}
    assert sorted(readings) == [50, 100]  # every epoch end (knn_every_epochs = 1), the last being the end
    assert all(0.3 < top1 < 1.0 for top1 in readings.values()), readings  # not a saturated figure
    for step, top1 in readings.items():
        assert _eval_knn(run / "checkpoints" / f"step-{step:09d}.pt", runs) == top1, step
    # The summary carries the last reading; the log says each one.
    summary = json.loads((runs / "watched.json").read_text())
    assert summary["knn"]["top1"] == readings[100]
    assert summary["knn"]["k"] == 20 and summary["knn"]["val_images"] == 359
    assert summary["knn"]["train_images"] == 1438
    stderr = (runs / "watched.stderr").read_text()
    assert "step 50 (1 epochs): 20-NN top-1" in stderr and f"{100 * readings[100]:.2f}%" in stderr


def test_a_monitored_run_trains_exactly_as_an_unmonitored_one(runs: Path) -> None:
    for step in (50, 100):
        name = f"step-{step:09d}.pt"
        watched = torch.load(runs / "watched" / "checkpoints" / name, weights_only=True)
        plain = torch.load(runs / "plain" / "checkpoints" / name, weights_only=True)
        for key, value in plain["model"].items():
            assert torch.equal(watched["model"][key], value), (step, key)  # incl. batch-norm statistics
        # The saved random states too: the monitor's loaders draw seeds from torch's generator.
        assert torch.equal(watched["rng"][0]["torch"], plain["rng"][0]["torch"]), step  # rank 0
    losses = {r["step"]: r["loss"] for r in _metrics(runs / "plain")}
    assert {r["step"]: r["loss"] for r in _metrics(runs / "watched")} == losses
    assert not any("knn_top1" in r for r in _metrics(runs / "plain"))


def test_the_finished_command_run_again_reports_the_same_summary(runs: Path, tmp_path: Path) -> None:
    """A run resumed at its end (killed after its last checkpoint, or simply run twice) trains no step;
    its summary still has the run's final loss and a k-NN reading of the final weights."""
    shutil.copytree(runs / "watched", tmp_path / "watched")
    lines = (tmp_path / "watched" / "metrics.jsonl").read_text()
    again = run_cli(
        *PRETRAIN, "--epochs", "2", "--set", "checkpoint.keep=100", "--json", "--knn-data", "demo",
        "--out", "watched", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    first, second = json.loads((runs / "watched.json").read_text()), json.loads(again.stdout)
    assert second["resumed_from_step"] == second["steps"] == first["steps"] == 100
    assert second["final_loss"] == first["final_loss"]
    assert second["knn"]["top1"] == first["knn"]["top1"] and second["knn"]["top5"] == first["knn"]["top5"]
    assert (tmp_path / "watched" / "metrics.jsonl").read_text() == lines  # nothing logged twice


def test_every_n_epochs_and_a_last_reading_when_time_runs_out(tmp_path: Path) -> None:
    # 160 images: 20 steps per epoch. The run must pass a few epochs before its time runs out; on a
    # busy machine 6 s may not be enough, so the budget doubles until it is (the checks stay whole).
    for max_seconds in (6, 12, 24, 48):
        out = f"run-{max_seconds}s"
        result = run_cli(
            *PRETRAIN, "--set", "data.max_images=160", "--epochs", "1000", "--knn-data", "demo",
            "--set", "monitor.knn_every_epochs=2", "--set", f"train.max_seconds={max_seconds}",
            "--set", "train.log_every=7", "--out", out, "--json", cwd=tmp_path, env=cli_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        end = summary["steps"]
        if end > 40:
            break
    assert 40 < end < 1000 * 20  # stopped by train.max_seconds, after a few epochs
    steps = [r["step"] for r in _metrics(tmp_path / out) if "knn_top1" in r]
    # Every second epoch end (even where log_every would skip the line), and the step the time ran out.
    expected = list(range(40, end, 40)) + [end]
    assert steps == expected, (steps, end)
    assert summary["knn"]["top1"] == _metrics(tmp_path / out)[-1]["knn_top1"]


def test_two_processes_read_what_one_process_reads(tmp_path: Path) -> None:
    """Each rank extracts a share of the features; gathered, they score as in one process."""
    result = run_cli(
        *PRETRAIN, "--epochs", "1", "--batch-size", "4", "--procs", "2", "--knn-data", "demo",
        "--out", "two", "--json", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["world_size"] == 2
    readings = [r for r in _metrics(tmp_path / "two") if "knn_top1" in r]
    assert [r["step"] for r in readings] == [50]
    assert summary["knn"]["val_images"] == 359 and summary["knn"]["train_images"] == 1438
    assert _eval_knn(tmp_path / "two", tmp_path) == readings[0]["knn_top1"]


def test_a_bad_knn_folder_is_refused_before_anything_starts(tmp_path: Path) -> None:
    one_class = write_image_folder(tmp_path / "one-class", classes=1)
    flat = tmp_path / "flat"
    (one_class / "class0").rename(flat)  # the images themselves, no class subfolders
    write_image_folder(one_class, classes=1)
    for folder, message in (
        (tmp_path / "missing", "monitor.knn_data: data folder does not exist"),
        (flat, "monitor.knn_data: no classes"),
        (one_class, "monitor.knn_data: " + f"{one_class}: found a single class"),
    ):
        result = run_cli(*PRETRAIN, "--knn-data", str(folder), "--out", "run", cwd=tmp_path, env=cli_env())
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "run").exists()


def test_an_unreadable_val_folder_stops_the_monitor_not_the_training(tmp_path: Path) -> None:
    data = tmp_path / "labelled"
    write_image_folder(data / "train", classes=2, per_class=8)
    for c in range(2):
        (data / "val" / f"class{c}").mkdir(parents=True)
        (data / "val" / f"class{c}" / "broken.png").write_bytes(b"not a png")
    result = run_cli(
        *PRETRAIN, "--epochs", "2", "--knn-data", str(data), "--out", "run", "--json",
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "k-NN monitoring stops, training goes on" in result.stderr
    assert result.stderr.count("k-NN monitoring stops") == 1
    assert json.loads(result.stdout)["steps"] == 100
    assert not any("knn_top1" in r for r in _metrics(tmp_path / "run"))


def _demo_monitor(device: torch.device) -> tuple[KnnMonitor, SwAV]:
    settings = config.resolve(preset="smoke", flags={"data.path": "demo", "monitor.knn_data": "demo"})
    split = monitor_split(settings)
    assert split is not None
    model = build_model(settings).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return KnnMonitor(settings, split, device=device, workers=0), model.train()


def test_a_reading_leaves_the_model_in_train_mode_and_the_generators_as_they_were() -> None:
    monitor, model = _demo_monitor(torch.device("cpu"))
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    reading = monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
    assert model.training and model.backbone.training
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())  # BN statistics too
    assert (reading.train_images, reading.val_images, reading.k) == (1438, 359, 20)
    assert 0.1 < reading.top1 <= reading.top5 <= 1.0


def test_a_reading_inside_the_trainings_autocast_is_the_fp32_reading() -> None:
    """eval-linear extracts in fp32; so does the monitor, whatever autocast the training runs under."""
    monitor, model = _demo_monitor(torch.device("cpu"))
    fp32 = monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_amp = monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
    assert (in_amp.top1, in_amp.top5) == (fp32.top1, fp32.top5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_reading_matches_the_cpu_one() -> None:
    """fp32 on the GPU reads what the CPU reads, also inside the training's bf16 autocast."""
    cpu_monitor, cpu_model = _demo_monitor(torch.device("cpu"))
    cpu = cpu_monitor.evaluate(cpu_model.backbone, feature_dim=cpu_model.feature_dim)
    cuda = torch.device("cuda", torch.cuda.current_device())
    monitor, model = _demo_monitor(cuda)
    torch.cuda.manual_seed(7)
    before = torch.cuda.get_rng_state()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    try:
        fp32 = monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the training's autocast: the reading ignores it
            in_amp = monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert torch.equal(torch.cuda.get_rng_state(), before)

    def right(reading: KnnReading) -> int:  # val images classified right (top1 is a float32 mean)
        return round(reading.top1 * reading.val_images)

    assert abs(right(fp32) - right(cpu)) <= 1, (fp32, cpu)  # at most one val image apart
    assert (in_amp.top1, in_amp.top5) == (fp32.top1, fp32.top5)


def test_with_fewer_than_five_classes_the_second_figure_is_top_k_of_the_classes(tmp_path: Path) -> None:
    """As eval-linear's top5_k: with 3 classes "top-5" would always be 100%, so it is top-3."""
    data = write_image_folder(tmp_path / "three", classes=3, per_class=8)
    settings = config.resolve(preset="smoke", flags={"data.path": str(data), "monitor.knn_data": str(data)})
    split = monitor_split(settings)
    assert split is not None
    model = build_model(settings)
    reading = KnnMonitor(settings, split, device=torch.device("cpu"), workers=0).evaluate(
        model.backbone, feature_dim=model.feature_dim
    )
    assert reading.top5_k == 3 and reading.as_dict()["top5_k"] == 3
