"""End-to-end evaluation on a planted backbone, the CLI's JSON and its one-line errors.

The planted model is a convnet-tiny whose convolutions copy the three colour channels through
(identity 1x1 taps, every other channel zero) and whose batch norms add a +3 offset so the ReLUs
keep everything. Its pooled features are therefore an affine map of each image's mean colour.
The images of class c are noisy patches of one of four colours that are the vertices of their
convex hull, so the classes are linearly separable, and separable by cosine similarity, by
construction: every mode must score at least 99% (here: all 32 val images right).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from swavctl.cli.app import app
from swavctl.config import resolve
from swavctl.data.images import decode_file
from swavctl.eval.fast import DEFAULT_LRS, DEFAULT_WDS
from swavctl.eval.run import EvalOptions, run_eval
from swavctl.eval.views import Normalizer, center_view, geometry_for
from swavctl.files.image_folder import list_images
from swavctl.model.swav import SwAV
from swavctl.reporting.progress import QuietStages
from swavctl.weights.export import write_export
from swavctl.weights.safetensors_io import write_safetensors_atomic

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (210, 210, 30)]
TRAIN_PER_CLASS, VAL_PER_CLASS = 20, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add waiting


def _write_images(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-30, 31, size=(16, 16, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@torch.no_grad()
def _plant(model: SwAV, images: torch.Tensor) -> None:
    """Colour pass-through weights, then batch-norm statistics calibrated on ``images``."""
    backbone = model.backbone
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 5
    for conv, norm in zip(convs, norms, strict=True):
        conv.weight.zero_()
        for ch in range(3):
            conv.weight[ch, ch, 1, 1] = 1.0
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.bias[:3] = 3.0
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration pass
    backbone.train()
    backbone(images)
    backbone.eval()
    for norm in norms:
        norm.momentum = 0.1


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with train/ and val/ and, next to them, the planted model's export."""
    root = tmp_path_factory.mktemp("planted")
    _write_images(root)
    settings = resolve(preset="smoke", flags={"data.path": str(root)})
    torch.manual_seed(0)
    model = SwAV(settings.model.arch, settings.model.hidden_dim, settings.model.embedding_dim, 8)
    geometry = geometry_for(settings)
    views = torch.stack([center_view(decode_file(p), geometry) for p in list_images(root / "train")])
    _plant(model, Normalizer(settings.data.augment.mean, settings.data.augment.std)(views))
    write_export(model, root / "backbone.safetensors", settings=settings, step=1, epoch=1, with_head=False)
    return root


MODES = [
    ("knn", {}),
    ("fast", {"epochs": 20}),
    ("linear", {"epochs": 10}),
    ("finetune", {"label_fraction": 0.1}),
    ("finetune", {"label_fraction": 0.01}),
]


@pytest.mark.parametrize(("mode", "extra"), MODES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(MODES)])
def test_planted_backbone_scores_at_least_99_in_every_mode(
    planted: Path, tmp_path: Path, mode: str, extra: dict[str, float]
) -> None:
    model = planted / "backbone.safetensors"
    out = tmp_path / "out"
    summary = run_eval(EvalOptions(model=model, mode=mode, out=out, gpus=0, **extra))  # type: ignore[arg-type]
    n_val = len(COLOURS) * VAL_PER_CLASS
    assert summary["mode"] == mode and summary["n_val"] == n_val
    assert summary["top1"] >= 0.99 and summary["top5"] == 1.0

    record = json.loads((out / "eval.json").read_text())
    assert record["top1"] == summary["top1"]
    assert record["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert record["n_images"] == {
        "train": len(COLOURS) * TRAIN_PER_CLASS,
        "val": n_val,
        "train_used": summary["n_train"],
        "val_scored": n_val,
    }
    assert set(record["per_class_accuracy"]) == {f"class{c}" for c in range(len(COLOURS))}
    assert all(v >= 0.99 for v in record["per_class_accuracy"].values())
    assert np.trace(np.array(record["confusion"])) == round(summary["top1"] * n_val)
    assert record["model_settings"]["data"]["path"] == str(planted)  # --data came from the model
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == n_val and sorted(Path(r["path"]) for r in rows) == list_images(planted / "val")
    assert all(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert sum(r["prediction"] == r["label"] for r in rows) == round(summary["top1"] * n_val)
    with Image.open(out / "confusion.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 100

    if mode == "finetune":
        fraction = extra["label_fraction"]
        quota = max(1, round(fraction * TRAIN_PER_CLASS))
        lines = (out / "subset.txt").read_text().splitlines()
        paths = [Path(line.split("\t")[0]) for line in lines]
        per_class = Counter(line.split("\t")[1] for line in lines)
        assert per_class == {f"class{c}": quota for c in range(len(COLOURS))}
        assert all(p.parent.parent == planted / "train" for p in paths)  # never val
        assert summary["n_train"] == len(paths) == quota * len(COLOURS)
        again = tmp_path / "again"
        said: list[str] = []

        class Listening(QuietStages):
            def info(self, message: str) -> None:
                said.append(message)

        options = EvalOptions(model=model, mode=mode, out=again, gpus=0, epochs=1, label_fraction=fraction)
        run_eval(options, reporter=Listening())
        assert (again / "subset.txt").read_text() == (out / "subset.txt").read_text()
        total = len(COLOURS) * TRAIN_PER_CLASS
        assert f"finetune: {len(paths)} of the {total} train images keep their labels" in " ".join(said)
    if mode == "linear":
        history = record["linear"]["history"]
        assert len(history) == 10 and record["linear"]["recipe"]["lr"] == 0.3
        assert history[-1]["val_top1"] == record["top1"]  # reported number = final epoch
        assert history[0]["lr"] == pytest.approx(0.3)
    if mode == "fast":
        grid = record["fast"]["grid"]
        assert len(grid) == len(DEFAULT_LRS) * len(DEFAULT_WDS) and record["fast"]["n_holdout"] == round(
            0.2 * TRAIN_PER_CLASS
        ) * len(COLOURS)


def test_cli_json_alias_and_default_output(planted: Path, tmp_path: Path) -> None:
    """A real process: the hidden alias, one JSON object on stdout, OUT = <model folder>/eval-knn."""
    work = tmp_path / "copy"
    work.mkdir()
    shutil.copy(planted / "backbone.safetensors", work / "backbone.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "swavctl", "linear-eval", str(work / "backbone.safetensors"), "--mode", "knn"]
        + ["--data", str(planted), "--gpus", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"mode", "top1", "top5", "n_val"} <= set(summary)
    assert summary["mode"] == "knn" and summary["n_val"] == len(COLOURS) * VAL_PER_CLASS
    assert Path(summary["eval_json"]) == work / "eval-knn" / "eval.json"
    assert (work / "eval-knn" / "confusion.png").is_file()


def _invoke(*args: str, gpus: str = "0") -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval-linear", *args, "--gpus", gpus])
    return result.exit_code, result.stderr


def _one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_error_no_classes(planted: Path, tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i}.png")
    line = _one_line_error(*_invoke(str(planted / "backbone.safetensors"), "--data", str(tmp_path)))
    assert "no classes" in line


def test_error_val_class_missing_from_train(planted: Path, tmp_path: Path) -> None:
    shutil.copytree(planted / "train", tmp_path / "train")
    shutil.copytree(planted / "val", tmp_path / "val")
    (tmp_path / "val" / "class3").rename(tmp_path / "val" / "zebra")
    line = _one_line_error(*_invoke(str(planted / "backbone.safetensors"), "--data", str(tmp_path)))
    assert "missing from" in line and "'zebra'" in line


def test_error_not_a_backbone(tmp_path: Path) -> None:
    weights = tmp_path / "weights.safetensors"
    write_safetensors_atomic(weights, {"fc.weight": torch.zeros(2, 2)}, {})
    line = _one_line_error(*_invoke(str(weights)))
    assert "no swavctl settings" in line
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    line = _one_line_error(*_invoke(str(text)))
    assert "notes.pt" in line  # the wording is model_io's; the file must be named


def test_error_architecture_mismatch_names_keys(planted: Path, tmp_path: Path) -> None:
    from swavctl.weights.safetensors_io import read_safetensors

    tensors, meta = read_safetensors(planted / "backbone.safetensors")
    settings = json.loads(meta["settings"])
    settings["model"]["arch"] = "resnet18"
    meta["settings"] = json.dumps(settings)
    wrong = tmp_path / "wrong.safetensors"
    write_safetensors_atomic(wrong, tensors, meta)
    line = _one_line_error(*_invoke(str(wrong)))
    assert "missing keys [" in line and "unexpected keys [" in line and "features.0.weight" in line


def test_error_bad_options(planted: Path) -> None:
    model = str(planted / "backbone.safetensors")
    assert "--label-fraction" in _one_line_error(*_invoke(model, "--mode", "finetune"))
    assert "--mode must be one of" in _one_line_error(*_invoke(model, "--mode", "svm"))
    assert "64 asked for, but" in _one_line_error(*_invoke(model, gpus="64"))
    assert "--procs must be at least 1" in _one_line_error(*_invoke(model, "--procs", "0"))
    assert "--procs 2 is for CPU workers" in _one_line_error(*_invoke(model, "--procs", "2", gpus="1"))
    assert "model not found" in _one_line_error(*_invoke(str(planted / "nothing.pt")))
    linear = (model, "--mode", "linear", "--epochs", "1")
    assert "--lr must be positive, got -1.0" in _one_line_error(*_invoke(*linear, "--lr", "-1"))
    assert "--weight-decay must be 0 or more" in _one_line_error(*_invoke(*linear, "--weight-decay", "-1"))
    assert "--workers must be 0 or more" in _one_line_error(*_invoke(model, "--workers", "-1"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("mode", "extra"), MODES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(MODES)])
def test_planted_backbone_on_gpu(planted: Path, tmp_path: Path, mode: str, extra: dict[str, float]) -> None:
    options = EvalOptions(model=planted / "backbone.safetensors", mode=mode, out=tmp_path, gpus=1, **extra)  # type: ignore[arg-type]
    summary = run_eval(options)
    assert summary["top1"] >= 0.99
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["settings"]["device"].startswith("cuda")
