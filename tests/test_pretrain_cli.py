"""`swavctl pretrain` end to end in real subprocesses on tiny real image folders."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

from swavctl.files.latest import latest_run
from tests.conftest import write_image_folder

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0")


def test_smoke_run_writes_everything(cli, image_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli(*SMOKE, "--data", str(image_folder), "--max-steps", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("out_dir", "steps", "final_loss", "samples_per_s"):
        assert key in summary
    assert summary["steps"] == 3 and summary["skipped_images"] == 0
    out = tmp_path / summary["out_dir"]
    assert out.parent == tmp_path / "runs"
    # runs/latest is a one-line pointer file, not a folder link (tools that walk runs/ see each run once)
    assert (tmp_path / "runs" / "latest").read_text() == f"{out.name}\n"
    assert latest_run(tmp_path / "runs") == out.resolve()
    resolved = tomllib.loads((out / "resolved.toml").read_text())
    assert resolved["model"]["arch"] == "convnet-tiny" and resolved["data"]["path"] == str(image_folder)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    expected = {
        "loss",
        "loss_over_lnk",
        "lr",
        "samples_per_s",
        "data_wait_fraction",
        "code_entropy",
        "prototypes_used",
        "queue_in_use",
    }
    assert expected <= set(lines[0])
    assert lines[0]["loss_over_lnk"] == pytest.approx(lines[0]["loss"] / math.log(8))
    assert 1 <= lines[0]["prototypes_used"] <= 8
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == [
        "step-000000002.json",
        "step-000000003.json",
    ]
    state = torch.load(out / "checkpoints" / "step-000000003.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "rng", "step", "epoch", "settings"} <= set(state)
    assert "[model]" in state["settings"]
    weights = load_file(out / "backbone.safetensors")
    assert weights and not any(k.startswith(("head.", "prototypes", "module.")) for k in weights)
    # Commands read through the pointer when it is named: export of runs/latest exports this run.
    exported = cli("export", "runs/latest", "--out", "via-latest.safetensors", "--json")
    assert exported.returncode == 0, exported.stderr
    assert load_file(tmp_path / "via-latest.safetensors").keys() == weights.keys()


def test_resnet18_backbone_loads_strictly_into_torchvision(cli, image_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli(
        *SMOKE,
        "--data",
        str(image_folder),
        "--arch",
        "resnet18",
        "--max-steps",
        "1",
        "--out",
        "r18",
        "--set",
        "data.crop_sizes=[32, 16]",
        "--batch-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(load_file(tmp_path / "r18" / "backbone.safetensors"), strict=True)


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)
def test_compiled_training_matches_eager_and_saves_the_same_names(
    cli, image_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """``train.compile=true`` (torch.compile with inductor, here on the CPU) trains the same steps as
    eager: the losses agree to float32 rounding, and the checkpoint and the export carry the model's
    own parameter names (no ``_orig_mod.`` of the compiled wrapper)."""
    runs = {"eager": (), "compiled": ("--set", "train.compile=true")}
    losses: dict[str, list[float]] = {}
    kernels = tmp_path / "inductor"  # a cache of its own: the compiled run must fill it
    for name, extra in runs.items():
        result = cli(
            *SMOKE, "--data", str(image_folder), "--max-steps", "3", "--out", name, *extra,
            env={"TORCHINDUCTOR_CACHE_DIR": str(kernels)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert any(kernels.rglob("*.py")) == (name == "compiled")  # inductor wrote kernels, eager none
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert len(losses["compiled"]) == 3
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-4)
    names = {name: sorted(load_file(tmp_path / name / "backbone.safetensors")) for name in runs}
    assert names["compiled"] == names["eager"]
    checkpoints = {
        name: torch.load(next((tmp_path / name / "checkpoints").glob("*.pt")), weights_only=False)["model"]
        for name in runs
    }
    assert sorted(checkpoints["compiled"]) == sorted(checkpoints["eager"])


def test_train_subfolder_is_used_and_announced(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "imagenet"
    write_image_folder(root / "train")
    write_image_folder(root / "val", per_class=2)
    result = cli(*SMOKE, "--data", str(root), "--max-steps", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert "train/" in result.stderr and str(root / "train") in result.stderr.replace("\n", "")
    assert json.loads(result.stdout)["images"] == 32


def test_bad_files_are_skipped_and_counted(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_image_folder(tmp_path / "mixed", per_class=8)
    good = (root / "class0" / "000.png").read_bytes()
    jpeg = tmp_path / "ok.jpg"
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(jpeg, quality=90)
    (root / "class0" / "truncated.jpg").write_bytes(jpeg.read_bytes()[:200])
    (root / "class0" / "notes.jpg").write_text("this is not an image\n")
    Image.fromarray(np.zeros((12, 12, 4), np.uint8), "RGBA").save(root / "class1" / "alpha.png")
    assert good
    result = cli(*SMOKE, "--data", str(root), "--batch-size", "19", "--max-steps", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped_images"] == 2
    assert "truncated.jpg" in result.stderr and "notes.jpg" in result.stderr
    strict = cli(
        *SMOKE,
        "--data",
        str(root),
        "--batch-size",
        "19",
        "--max-steps",
        "1",
        "--out",
        "strict",
        "--set",
        "data.on_bad_image=error",
    )
    assert strict.returncode == 2
    last = strict.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unreadable image") and "truncated.jpg" in last
    assert "Traceback" not in strict.stderr
    # Decoded in a worker process, the file fails there: still one line, without the worker's traceback.
    in_worker = cli(
        *SMOKE, "--data", str(root), "--batch-size", "19", "--max-steps", "1", "--out", "strict-workers",
        "--set", "data.on_bad_image=error", "--set", "data.workers=2",
    )  # fmt: skip
    assert in_worker.returncode == 2
    error = [line for line in in_worker.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: unreadable image (data.on_bad_image=error): ")
    assert re.search(r"/class0/(truncated|notes)\.jpg: \S", error[0]), error[0]  # the file, then why
    assert "Traceback" not in in_worker.stderr and "Caught" not in in_worker.stderr, in_worker.stderr


def test_a_folder_of_only_unreadable_files_is_an_error_not_a_finished_run(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"{i}.png").write_text("not an image\n")
    result = cli(*SMOKE, "--data", str(bad), "--batch-size", "2", "--out", "run")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: no image under {bad} could be read in epoch 0 (4 files skipped); check --data"
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_output_locations_that_cannot_be_written_are_one_line_errors(  # type: ignore[no-untyped-def]
    cli, image_folder: Path, tmp_path: Path
) -> None:
    taken = tmp_path / "taken.toml"
    taken.write_text("a file, not a folder\n")
    pretrain = cli(*SMOKE, "--data", str(image_folder), "--max-steps", "1", "--out", str(taken))
    assert pretrain.returncode == 2, pretrain.stderr
    assert pretrain.stderr.strip().splitlines()[-1] == (
        f"error: --out {taken} is a file, not a folder; pass a folder there (new or existing)"
    )
    assert "Traceback" not in pretrain.stderr
    done = cli(*SMOKE, "--data", str(image_folder), "--max-steps", "1", "--out", "run")
    assert done.returncode == 0, done.stderr
    export = cli("export", "run", "--out", str(taken / "x.safetensors"))
    assert export.returncode == 2, export.stderr
    assert export.stderr.strip() == (
        f"error: cannot write --out {taken / 'x.safetensors'}: {taken} is a file; "
        "pass a writable location with --out"
    )
    assert "Traceback" not in export.stderr
    # A working folder where runs/latest cannot be made (/proc): --out elsewhere still runs, with a warning.
    elsewhere = cli(
        *SMOKE,
        "--data",
        str(image_folder),
        "--max-steps",
        "1",
        "--out",
        str(tmp_path / "o"),
        cwd=Path("/proc"),
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "warning: could not point runs/latest at" in elsewhere.stderr
    assert (tmp_path / "o" / "summary.json").is_file()


def test_relative_data_folders_are_recorded_absolute(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The run records where its data is, so eval-linear (default: the model's dataset) run from
    another folder reads the same images, and never a same-named folder there."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    write_image_folder(work / "images")
    write_image_folder(work / "labelled" / "train", per_class=8)
    write_image_folder(work / "labelled" / "val", per_class=4)
    (elsewhere / "images").mkdir(parents=True)  # a decoy with the recorded relative name, no images
    trained = cli(
        *SMOKE, "--data", "images", "--knn-data", "labelled", "--max-steps", "2", "--out", "run", cwd=work
    )
    assert trained.returncode == 0, trained.stderr
    resolved = tomllib.loads((work / "run" / "resolved.toml").read_text())
    assert resolved["data"]["path"] == str(work / "images")
    assert resolved["monitor"]["knn_data"] == str(work / "labelled")
    evaluated = cli("eval-linear", str(work / "run"), "--mode", "knn", "--json", cwd=elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr
    record = json.loads(Path(json.loads(evaluated.stdout)["eval_json"]).read_text())
    assert record["data"]["root"] == str(work / "images")


def test_a_step_whose_files_all_fail_still_ends_its_epoch_with_a_checkpoint(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """All 8 files of epoch 0's last batch (step 4 of 4) are unreadable: the step is skipped, and the
    epoch-end checkpoint is written all the same (a crash in epoch 1 must not lose epoch 0)."""
    from swavctl import config
    from swavctl.data.sampler import EpochBatchSampler
    from swavctl.files.image_folder import list_images

    root = write_image_folder(tmp_path / "images")  # 32 images: 4 steps of 8 per epoch
    seed = config.resolve(preset="smoke", flags={}).train.seed
    last_batch = list(EpochBatchSampler(32, batch_size=8, epoch=0, seed=seed))[-1]
    files = list_images(root)
    for _, index in last_batch:
        files[index].write_bytes(b"not an image")
    result = cli(
        *SMOKE, "--data", str(root), "--batch-size", "8", "--epochs", "2", "--json",
        "--set", "checkpoint.every_steps=1000", "--set", "checkpoint.keep=10",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 8 and summary["skipped_images"] == 16  # 8 per epoch
    checkpoints = tmp_path / summary["out_dir"] / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["step-000000004.pt", "step-000000008.pt"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--set", "model.protoypes=4"), "did you mean 'model.prototypes'?"),
        (("--set", "swav.epsilon=-1"), "invalid value for 'swav.epsilon'"),
        (("--preset", "smokee"), "unknown preset 'smokee'"),
        (("--arch", "resnet51"), "unknown backbone 'resnet51'"),
    ],
)
def test_config_errors_exit_2_with_one_line(cli, image_folder: Path, args, fragment) -> None:  # type: ignore[no-untyped-def]
    base = ["pretrain", "--gpus", "0", "--data", str(image_folder)]
    if "--preset" not in args:
        base += ["--preset", "smoke"]
    result = cli(*base, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]


def test_bad_preset_value_exits_2(cli, image_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    preset = tmp_path / "mine.toml"
    preset.write_text("[train]\nbatch_size = 0\n")
    result = cli("pretrain", "--preset", str(preset), "--data", str(image_folder))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: preset mine.toml: invalid value for 'train.batch_size': "
        "Input should be greater than or equal to 1 (got 0)"
    ]


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "no-images"])
def test_bad_data_is_refused_before_anything_starts(cli, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "data"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    elif kind == "no-images":
        (target / "sub").mkdir(parents=True)
        (target / "sub" / "readme.txt").write_text("hello")
    result = cli(*SMOKE, "--data", str(target))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "runs").exists()


def test_collapse_and_small_batch_warnings(cli, image_folder: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli(
        *SMOKE,
        "--data",
        str(image_folder),
        "--max-steps",
        "4",
        "--set",
        "swav.temperature=1000",
        "--set",
        "health.collapse_patience=2",
        "--set",
        "model.prototypes=20",
        "--set",
        "swav.freeze_prototypes_steps=5005",
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert "possible collapse" in text and "swav.epsilon" in text
    assert "global batch 8 + queue 0 < 20 prototypes" in text
    assert "swav.freeze_prototypes_steps=5005 covers the whole run (8 steps: 2 epochs of 4)" in text


def test_no_data_at_all_exits_2(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("pretrain", "--preset", "smoke")
    assert result.returncode == 2 and "--data" in result.stderr


def test_more_cpu_workers_than_cores_are_warned_about(image_folder: Path, tmp_path: Path) -> None:
    """``--procs 2`` on a process allowed one core (real CPU affinity, inherited by the workers):
    the run still trains, after one warning that the two workers share the core."""
    from swavctl.distributed.launch import crowded_cpu_note

    assert crowded_cpu_note(2, 2) is None and crowded_cpu_note(1, 1) is None
    assert "3 CPU worker processes share 2 cores" in (crowded_cpu_note(3, 2) or "")
    result = subprocess.run(
        [sys.executable, "-m", "swavctl", *SMOKE, "--procs", "2", "--batch-size", "4"]
        + ["--data", str(image_folder), "--max-steps", "1", "--out", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}),
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "share 1 core" in line]
    assert warnings == [
        "warning: 2 CPU worker processes share 1 core: every step waits for the slowest, "
        "so this is slower than one process"
    ]


def test_the_summary_and_the_export_record_how_the_run_was_made(
    cli, image_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import platform
    import socket
    import subprocess
    from datetime import datetime

    import torchvision
    from safetensors import safe_open

    import swavctl

    work = tmp_path / "work"
    work.mkdir()
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false")
    subprocess.run(("git", "init", "-q"), cwd=work, check=True)
    (work / "notes.txt").write_text("a tracked file\n")
    subprocess.run(("git", "add", "notes.txt"), cwd=work, check=True)
    subprocess.run((*git, "commit", "-qm", "one"), cwd=work, check=True)
    head = subprocess.run(("git", "rev-parse", "HEAD"), cwd=work, capture_output=True, text=True, check=True)
    args = (*SMOKE, "--data", str(image_folder), "--out", "run", "--max-steps", "1", "--json")
    result = cli(*args, cwd=work)
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)["provenance"]
    assert made["swavctl"] == swavctl.__version__ and made["torch"] == torch.__version__
    assert made["torchvision"] == torchvision.__version__ and made["python"] == platform.python_version()
    assert made["cuda"] is None and made["cudnn"] is None  # it ran on the CPU
    assert len(made["devices"]) == 1 and made["devices"][0]
    assert made["command"] == "swavctl " + " ".join(args)
    assert made["git_commit"] == head.stdout.strip() and made["host"] == socket.gethostname()
    started = datetime.fromisoformat(made["started_utc"])
    assert started.utcoffset() is not None and started.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert started <= datetime.fromisoformat(made["ended_utc"])
    assert json.loads((work / "run" / "summary.json").read_text())["provenance"] == made
    with safe_open(work / "run" / "backbone.safetensors", framework="pt") as handle:
        assert json.loads(handle.metadata()["provenance"]) == made
    # A changed tracked file is recorded as such; outside a git work tree there is no commit.
    (work / "notes.txt").write_text("changed\n")
    again = cli(*SMOKE, "--data", str(image_folder), "--out", "run2", "--max-steps", "1", "--json", cwd=work)
    assert json.loads(again.stdout)["provenance"]["git_commit"] == head.stdout.strip() + "+dirty"
    outside = cli(*SMOKE, "--data", str(image_folder), "--out", "run3", "--max-steps", "1", "--json")
    assert json.loads(outside.stdout)["provenance"]["git_commit"] is None
