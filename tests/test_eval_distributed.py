"""Multi-process evaluation (``--gpus 0 --procs N``, gloo on 127.0.0.1) equals one process.

The pieces: the sampler that splits every global batch over ranks, the gathered features (two
real gloo processes against one), and each mode end to end through the real launcher, compared
with a single-process run of the same evaluation: the same features and images give the same
k-NN and fast-probe results; linear and finetune (DDP, synchronized batch norm) give the same
losses and predictions up to the order of float sums.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from swavctl.config import resolve
from swavctl.data.images import decode_file
from swavctl.eval.dataset import ImageCache, LabelledImages
from swavctl.eval.features import extract_features
from swavctl.eval.run import EvalOptions, run_eval
from swavctl.eval.sharding import GlobalBatchSampler, gather_in_order
from swavctl.eval.splits import discover
from swavctl.eval.views import Normalizer, center_view, geometry_for
from swavctl.files.image_folder import list_images
from swavctl.model.swav import SwAV
from swavctl.weights.export import write_export
from swavctl.weights.model_io import load_model
from tests.conftest import cli_env, free_port, run_cli, write_image_folder
from tests.test_eval_planted import _plant as plant

# --- the sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize(
    ("num_items", "batch_size", "drop_single"), [(41, 16, False), (33, 16, True), (5, 8, False)]
)
def test_ranks_split_each_global_batch(
    world: int, num_items: int, batch_size: int, drop_single: bool
) -> None:
    def sampler(rank: int, world: int) -> GlobalBatchSampler:
        s = GlobalBatchSampler(
            num_items, batch_size=batch_size, seed=7, drop_single=drop_single, rank=rank, world=world
        )
        s.set_epoch(3)
        return s

    single = list(sampler(0, 1))
    assert len(single) == len(sampler(0, 1))
    parts = [list(sampler(r, world)) for r in range(world)]
    assert all(len(p) == len(single) == len(sampler(r, world)) for r, p in enumerate(parts))
    for step, batch in enumerate(single):
        # Every image of the global batch on exactly one rank, in the global batch's order per rank.
        assert sorted(i for p in parts for i in p[step]) == sorted(batch)
        for r in range(world):
            assert parts[r][step] == batch[r::world]
    seen = [i for batch in single for i in batch]
    expected = num_items - 1 if drop_single and num_items % batch_size == 1 else num_items
    assert len(seen) == len(set(seen)) == expected


def test_sampler_order_is_seeded_per_epoch() -> None:
    a = GlobalBatchSampler(40, batch_size=8, seed=1)
    b = GlobalBatchSampler(40, batch_size=8, seed=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first and sorted(sum(list(a), [])) == list(range(40))
    plain = GlobalBatchSampler(10, batch_size=4, seed=0, shuffle=False)
    assert list(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# --- data and a random model -------------------------------------------------------------------

CLASSES, TRAIN_PER_CLASS = 3, 14


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (42 images and one unreadable file) and val/ (11 images, uneven over 2 ranks), and the
    export of a convnet-tiny planted to pass colours through (as in test_eval_planted): its
    features separate the classes, so every mode predicts every class, not one class for all."""
    root = tmp_path_factory.mktemp("dist-eval")
    write_image_folder(root / "train", classes=CLASSES, per_class=TRAIN_PER_CLASS + 4, seed=1)
    for c in range(CLASSES):  # the last 4 of each class (3 of class 2) become val
        (root / "val" / f"class{c}").mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS, TRAIN_PER_CLASS + 4):
            source = root / "train" / f"class{c}" / f"{i:03d}.png"
            if c == 2 and i == TRAIN_PER_CLASS:
                source.unlink()
            else:
                source.rename(root / "val" / f"class{c}" / source.name)
    (root / "train" / "class1" / "zz-broken.png").write_bytes(b"not a png at all")
    settings = resolve(preset="smoke", flags={"data.path": str(root)})
    torch.manual_seed(3)
    model = SwAV(settings.model.arch, settings.model.hidden_dim, settings.model.embedding_dim, 8)
    views = [center_view(decode_file(p), geometry_for(settings)) for p in list_images(root / "train")[:20]]
    plant(model, Normalizer(settings.data.augment.mean, settings.data.augment.std)(torch.stack(views)))
    write_export(model, root / "backbone.safetensors", settings=settings, step=1, epoch=1, with_head=False)
    return root


# --- gathered features: two gloo processes against one -----------------------------------------


def _features(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = load_model(root / "backbone.safetensors")
    split = discover(root, val_split=0.2, seed=0)
    geometry = geometry_for(loaded.settings)
    dataset = LabelledImages(split.train, geometry, augment=False, seed=0, cache=ImageCache())
    norm = Normalizer(loaded.settings.data.augment.mean, loaded.settings.data.augment.std)
    return extract_features(
        loaded.model.backbone.eval(),
        dataset,
        normalize=norm,
        device=torch.device("cpu"),
        batch_size=8,
        feature_dim=loaded.model.feature_dim,
    )


def _feature_worker(rank: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        feats, kept = _features(Path(root))
        # Uneven shares, one of them empty, come back in index order on every rank.
        mine = torch.arange(5) if rank == 0 else torch.empty(0, dtype=torch.int64)
        rows, order = gather_in_order(mine.double().unsqueeze(1) * 10, mine.flip(0))
        torch.save({"feats": feats, "kept": kept, "rows": rows, "order": order}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_features_on_two_ranks_equal_one_process(data: Path, tmp_path: Path) -> None:
    mp.start_processes(
        _feature_worker, args=(free_port(), str(data), str(tmp_path)), nprocs=2, start_method="fork"
    )
    single, kept = _features(data)
    assert single.shape[0] == CLASSES * TRAIN_PER_CLASS  # the unreadable file is left out
    paths = [s.path.name for s in discover(data, val_split=0.2, seed=0).train]
    assert kept.tolist() == [i for i, name in enumerate(paths) if name != "zz-broken.png"]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["kept"], kept)
        torch.testing.assert_close(got["feats"], single, atol=1e-6, rtol=1e-5)
        assert torch.equal(got["order"], torch.arange(5))
        assert torch.equal(got["rows"].squeeze(1), torch.tensor([40.0, 30, 20, 10, 0], dtype=torch.float64))


# --- every mode through the launcher -----------------------------------------------------------

MODES = {
    "knn": ["--k", "5"],
    "fast": ["--epochs", "20", "--batch-size", "16", "--standardize"],
    "linear": ["--epochs", "3", "--batch-size", "16"],
    "finetune": ["--label-fraction", "0.5", "--epochs", "3", "--batch-size", "8"],
}


def _options(data: Path, mode: str, out: Path) -> EvalOptions:
    args = MODES[mode]
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(args):
        name = args[i].lstrip("-").replace("-", "_")
        if i + 1 == len(args) or args[i + 1].startswith("--"):
            kwargs[name], i = True, i + 1
        else:
            value = float(args[i + 1])
            kwargs[name], i = (
                (int(value) if value.is_integer() and name != "label_fraction" else value),
                i + 2,
            )
    return EvalOptions(model=data / "backbone.safetensors", mode=mode, out=out, gpus=0, **kwargs)


def _predictions(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _same_predictions(one: Path, two: Path) -> list[dict[str, str]]:
    """The same images, labels and predictions, and top scores equal up to float rounding."""
    pa, pb = _predictions(one), _predictions(two)
    assert [(r["path"], r["label"], r["prediction"]) for r in pa] == [
        (r["path"], r["label"], r["prediction"]) for r in pb
    ]
    for ra, rb in zip(pa, pb, strict=True):
        assert math.isclose(float(ra["top_score"]), float(rb["top_score"]), rel_tol=1e-4, abs_tol=1e-5)
    return pa


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_processes_equal_one(data: Path, tmp_path: Path, mode: str) -> None:
    one = run_eval(_options(data, mode, tmp_path / "one"))
    done = run_cli(
        "eval-linear",
        str(data / "backbone.safetensors"),
        "--mode",
        mode,
        *MODES[mode],
        "--gpus",
        "0",
        "--procs",
        "2",
        "--out",
        str(tmp_path / "two"),
        "--json",
        cwd=tmp_path,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr
    if mode == "knn":  # the progress lines are rank 0's and say they count its share
        assert "val features (rank 0's share of 11)" in " ".join(done.stderr.split()), done.stderr
    two = json.loads(done.stdout)  # rank 0's summary, once
    assert set(two) == set(one)
    a = json.loads((tmp_path / "one" / "eval.json").read_text())
    b = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert (a["settings"]["world_size"], b["settings"]["world_size"]) == (1, 2)
    assert a["n_images"] == b["n_images"] and a["n_val"] == 11
    pa = _same_predictions(tmp_path / "one", tmp_path / "two")
    assert len(pa) == 11
    assert a["confusion"] == b["confusion"] and a["top1"] == b["top1"] and a["top5"] == b["top5"]
    # Not trivially perfect: the comparison above has something to compare.
    assert len({r["prediction"] for r in pa}) > 1
    if mode == "fast":
        assert a["fast"]["chosen"] == b["fast"]["chosen"]
        assert [g["holdout_top1"] for g in a["fast"]["grid"]] == [
            g["holdout_top1"] for g in b["fast"]["grid"]
        ]
    if mode in ("linear", "finetune"):
        ha, hb = a[mode]["history"], b[mode]["history"]
        assert len(ha) == len(hb) == 3
        for ea, eb in zip(ha, hb, strict=True):
            assert math.isclose(ea["train_loss"], eb["train_loss"], rel_tol=1e-5)
        assert ha[0]["train_loss"] != ha[-1]["train_loss"]  # it trained
    if mode == "finetune":
        assert (tmp_path / "one" / "subset.txt").read_text() == (tmp_path / "two" / "subset.txt").read_text()


def test_a_user_error_on_every_rank_is_one_line(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    write_image_folder(bad / "train", classes=1, per_class=4)
    write_image_folder(bad / "val", classes=2, per_class=2)
    done = run_cli(
        "eval-linear",
        str(data / "backbone.safetensors"),
        "--data",
        str(bad),
        "--gpus",
        "0",
        "--procs",
        "2",
        cwd=tmp_path,
        env=cli_env(),
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "class1" in lines[0], done.stderr


def test_the_launcher_silences_torchs_terminating_process_warning() -> None:
    """When every rank reports the same user error, one exits a few ms before the other, and
    torch's spawn context warns "Terminating process N via signal SIGTERM" above our one line (seen
    once in four suite runs of the test above). The launching process silences that logger, as it
    does torchelastic's, whether torch.multiprocessing.spawn was imported before or after."""
    code = (
        "import logging, sys\n"
        "from swavctl.distributed.launch import _quiet_elastic_logs\n"
        "_quiet_elastic_logs()\n"
        "import torch.multiprocessing.spawn\n"
        "spawn = sys.modules['torch.multiprocessing.spawn']\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "spawn.log.warning('Terminating process 1 via signal SIGTERM')\n"
        "print(spawn.log.isEnabledFor(logging.WARNING))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False" and "Terminating" not in done.stderr, done.stderr


def test_under_torchrun_each_process_is_one_rank(data: Path, tmp_path: Path) -> None:
    """torchrun starts the ranks; rank 0 alone prints the summary, the same as one process's."""
    one = run_eval(_options(data, "knn", tmp_path / "one"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "swavctl", "eval-linear", str(data / "backbone.safetensors"), "--mode", "knn"]
        + [*MODES["knn"], "--gpus", "0", "--procs", "3", "--out", str(tmp_path / "two"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["top1"] == one["top1"]
    # torchrun decides the number of ranks; --procs only says "CPU workers" here, and rank 0 says so.
    assert "torchrun started 2 workers on this node; --gpus/--procs 3 only chooses" in done.stderr
    record = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert record["settings"]["world_size"] == 2
    _same_predictions(tmp_path / "one", tmp_path / "two")


def test_launched_cpu_workers_use_their_share_of_the_cores(data: Path, tmp_path: Path) -> None:
    """Without OMP_NUM_THREADS, each of N forked workers gets cores // N threads (not the parent's
    count: oversubscribed workers spin-wait on each other)."""
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "swavctl", "eval-linear", str(data / "backbone.safetensors")]
    done = subprocess.run(
        [*command, "--mode", "knn", "--gpus", "0", "--procs", "2", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert record["settings"]["threads_per_process"] == max(1, len(os.sched_getaffinity(0)) // 2)
