"""`swavctl bench data|step`, the benchmark helpers, the speed settings and the device-decode data path."""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from swavctl.bench.jpegs import sample_photographs, write_jpeg_folder, write_photo_folder
from swavctl.bench.padding import LARGE_PHOTO, bench_padding, jpeg_folder_sizes, mixed_photo_sizes
from swavctl.bench.report import update_section
from swavctl.bench.sinkhorn import bench_sinkhorn, official_sinkhorn
from swavctl.clustering.sinkhorn_knopp import sinkhorn
from swavctl.data.dataset import PretrainDataset, collate, decode_images, is_encoded, pretrain_dataset
from swavctl.data.images import decode_file
from swavctl.data.multicrop import AugmentSpec, CropSpec, MultiCrop, size_groups
from swavctl.model.swav import SwAV
from swavctl.objective.swav import swav_loss_from_outputs
from tests.conftest import REPO, cli_env, write_image_folder

Cli = Callable[..., subprocess.CompletedProcess[str]]
SMOKE = ("--preset", "smoke", "--gpus", "0")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add waiting


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", per_class=24, size=24)


def _json(result: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------
# The commands, against the pretrain loop's own metrics


def test_bench_figures_are_consistent_with_pretrain_metrics(cli: Cli, folder: Path, tmp_path: Path) -> None:
    """With the loader in the main process (workers 0), a pretrain step is the loader's time for a
    batch plus the training step's time: the per-sample data wait in metrics.jsonl must match
    ``bench data`` and the rest of the step ``bench step``, within a factor of 3 that absorbs a
    shared machine's noise (each timing is a median; they agreed within 1.5 on a loaded 2-core machine)."""
    env = cli_env()  # one thread per process: the same CPU budget for all three runs
    data = _json(
        cli(
            "bench",
            "data",
            *SMOKE,
            "--data",
            str(folder),
            "--workers",
            "0",
            "--batches",
            "8",
            "--json",
            env=env,
        )
    )
    step = _json(cli("bench", "step", *SMOKE, "--steps", "8", "--json", env=env))
    run = _json(
        cli(
            "pretrain",
            *SMOKE,
            "--data",
            str(folder),
            "--max-steps",
            "10",
            "--json",
            "--set",
            "checkpoint.every_steps=1000",
            env=env,
        )
    )
    records = [json.loads(x) for x in (tmp_path / run["out_dir"] / "metrics.jsonl").read_text().splitlines()][
        2:
    ]
    batch = data["batch_size"]
    assert data["figures"][0]["workers"] == 0 and data["best_workers"] == 0
    assert step["batch_size"] == batch and step["crops"] == data["crops"] == "2x16+2x8"
    assert step["samples_per_s"] <= step["forward_backward_samples_per_s"]
    assert math.isclose(
        1 / step["samples_per_s"],
        1 / step["forward_backward_samples_per_s"] + 1 / step["sinkhorn_loss_samples_per_s"],
        rel_tol=0.5,
    )

    per_sample = [1 / r["samples_per_s"] for r in records]
    wait = statistics.median(s * r["data_wait_fraction"] for s, r in zip(per_sample, records, strict=True))
    rest = statistics.median(
        s * (1 - r["data_wait_fraction"]) for s, r in zip(per_sample, records, strict=True)
    )
    loader_time, step_time = 1 / data["best_samples_per_s"], 1 / step["samples_per_s"]
    assert 1 / 3 < wait / loader_time < 3, (wait, loader_time)
    assert 1 / 3 < rest / step_time < 3, (rest, step_time)
    predicted = 1 / (loader_time + step_time)
    measured = statistics.median(r["samples_per_s"] for r in records)
    assert 1 / 3 < measured / predicted < 3, (measured, predicted)


def test_bench_step_uses_a_full_queue_as_the_loop_does_once_it_starts() -> None:
    """A preset with a queue is timed as its steps after swav.queue_start_epoch: Sinkhorn over the
    queue's rows and the batch's (the queue costs most of Sinkhorn's time there)."""
    from swavctl import config
    from swavctl.bench.step import StepRunner

    def first_loss(**flags: object) -> tuple[float, int]:
        settings = config.resolve(preset="smoke", flags={"train.batch_size": 8, **flags})
        runner = StepRunner(settings)
        runner.step()
        return runner.first_loss, runner.queue.length if runner.queue is not None else 0

    plain, no_rows = first_loss()
    queued, rows = first_loss(**{"swav.queue_length": 64})
    shared, half = first_loss(**{"swav.queue_length": 64, "dist.procs": 2})
    assert (no_rows, rows, half) == (0, 64, 32)  # this process's share of the run's queue
    assert queued != plain and shared not in (plain, queued)  # the queue's rows changed the codes


def test_bench_data_tries_worker_counts_and_picks_the_fewest_enough(cli: Cli, folder: Path) -> None:
    out = _json(
        cli(
            "bench",
            "data",
            *SMOKE,
            "--data",
            str(folder),
            "--workers",
            "0,1",
            "--batches",
            "4",
            "--set",
            "data.augment_on=device",
            "--json",
            env=cli_env(),
        )
    )
    figures = {f["workers"]: f for f in out["figures"]}
    assert set(figures) == {0, 1} and out["augment_on"] == "device" and out["decode"] == "workers"
    assert all(
        f["samples_per_s"] > 0 and f["batches"] == 4 and f["skipped_images"] == 0 for f in figures.values()
    )
    fastest = max(f["samples_per_s"] for f in figures.values())
    enough = [w for w, f in sorted(figures.items()) if f["samples_per_s"] >= 0.95 * fastest]
    assert out["best_workers"] == enough[0]
    assert out["best_samples_per_s"] == figures[enough[0]]["samples_per_s"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("data", "--workers", "two"), "--workers expects"),
        (("data", "--workers", "0", "--batches", "0"), "--batches"),
        (("data", "--workers", "0", "--batch-size", "1000"), "fewer than one batch"),
        (("step", "--steps", "0"), "--steps"),
        (("step", "--set", "model.protoypes=3"), "did you mean 'model.prototypes'"),
        (("data", "--workers", "0"), "no data"),
    ],
)
def test_bench_user_errors_are_one_line(
    folder: Path, args: tuple[str, ...], fragment: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The commands themselves, in process (the subprocess tests above cover the entry point)."""
    from typer.testing import CliRunner

    from swavctl.cli.app import app

    monkeypatch.chdir(tmp_path)
    extra = ("--data", str(folder)) if args[0] == "data" and fragment != "no data" else ()
    result = CliRunner().invoke(app, ["bench", *args, *SMOKE, *extra])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error:") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_data_stops_on_an_unreadable_file_when_asked(tmp_path: Path) -> None:
    """data.on_bad_image=error holds in bench data as in pretrain: one line naming the file."""
    from typer.testing import CliRunner

    from swavctl.cli.app import app

    data = write_image_folder(tmp_path / "images", per_class=8)
    (data / "class0" / "zz-broken.png").write_bytes(b"not an image")
    args = ["bench", "data", *SMOKE, "--data", str(data), "--workers", "0", "--batches", "4"]
    result = CliRunner().invoke(app, [*args, "--set", "data.on_bad_image=error"])
    assert result.exit_code == 2, result.output
    bad = data / "class0" / "zz-broken.png"
    assert (
        result.stderr.strip()
        == f"error: unreadable image (data.on_bad_image=error): {bad}: not a recognised image format"
    )
    assert CliRunner().invoke(app, args).exit_code == 0  # skipped and counted by default


def test_bench_data_says_when_decode_in_workers_cannot_apply(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from swavctl.cli.app import app

    data = write_image_folder(tmp_path / "images", per_class=8)
    args = ["bench", "data", *SMOKE, "--data", str(data), "--workers", "0", "--batches", "2"]
    result = CliRunner().invoke(app, [*args, "--gpus", "0", "--decode-in-workers"])
    assert result.exit_code == 0, result.output
    assert "--decode-in-workers has no effect here" in " ".join(result.stderr.split())
    assert "no effect" not in CliRunner().invoke(app, [*args, "--gpus", "0"]).stderr


# ----------------------------------------------------------------------------------------------
# Sinkhorn baseline, report sections, JPEG folder


def test_official_baseline_computes_the_same_codes() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(64, 16, generator=g, dtype=torch.float64), dim=1)
    scores = (
        scores
        @ torch.nn.functional.normalize(torch.randn(30, 16, generator=g, dtype=torch.float64), dim=1).t()
    )
    ours, theirs = sinkhorn(scores), official_sinkhorn(scores)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(theirs.sum(dim=1), torch.ones(64, dtype=torch.float64))
    result = bench_sinkhorn(128, 50, repeats=2)
    assert result.max_abs_diff < 1e-5 and result.ours_ms > 0 and result.official_ms > 0
    assert math.isclose(result.speedup, result.official_ms / result.ours_ms)


def test_padding_bench_compares_equal_outputs_and_counts_padding() -> None:
    sizes = [(30, 40), (40, 30), (31, 40), (120, 90)]
    crops = [CropSpec(16, 0.14, 1.0), CropSpec(8, 0.05, 0.14)]
    result = bench_padding("tiny", sizes, crops, AugmentSpec(), device=torch.device("cpu"), rounds=2)
    assert result.groups == len(size_groups(sizes)) == 3
    assert result.max_abs_diff < 1e-4  # the same crops either way, up to float rounding
    # One stack: 4 x 120 x 90; groups: 2 x 31 x 40 + 1 x 40 x 30 + 1 x 120 x 90.
    assert result.baseline_padded_mpx == pytest.approx(4 * 120 * 90 / 1e6)
    assert result.ours_padded_mpx == pytest.approx((2 * 31 * 40 + 40 * 30 + 120 * 90) / 1e6)
    assert len(result.baseline_runs_ms) == len(result.ours_runs_ms) == 2
    assert math.isclose(result.speedup, result.baseline_ms / result.ours_ms)
    landscape = [h <= w for h, w in mixed_photo_sizes(400)]
    assert 0.65 < sum(landscape) / 400 < 0.85
    assert mixed_photo_sizes(3, large_photo=True)[0] == LARGE_PHOTO
    assert sorted(set(jpeg_folder_sizes(8))) == [(375, 500), (500, 375)]


def test_update_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    update_section("a", "## A\n\nfirst", doc)
    update_section("b", "## B\n\nsecond", doc)
    update_section("a", "## A\n\nthird", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and text.count("# Benchmarks") == 1
    assert "third" in text and "first" not in text and "second" in text
    assert text.index("third") < text.index("second")  # A keeps its place


def test_write_jpeg_folder(tmp_path: Path) -> None:
    root = write_jpeg_folder(tmp_path / "jpegs", 6, width=50, height=40, portrait=0.5, processes=2)
    files = sorted(root.glob("*.jpg"))
    assert len(files) == 6 and all(f.read_bytes()[:3] == b"\xff\xd8\xff" for f in files)
    shapes = {tuple(decode_file(f).shape) for f in files}
    assert shapes == {(3, 40, 50), (3, 50, 40)}
    before = [f.stat().st_mtime_ns for f in files]
    write_jpeg_folder(root, 6, width=50, height=40)
    assert [f.stat().st_mtime_ns for f in files] == before


def test_write_photo_folder_cuts_the_bundled_photographs(tmp_path: Path) -> None:
    """Crops of scikit-learn's two photographs, alternating, resized to the requested size."""
    root = write_photo_folder(tmp_path / "photos", 4, width=50, height=40, portrait=0.5)
    files = sorted(root.glob("*.jpg"))
    assert len(files) == 4 and all(f.read_bytes()[:3] == b"\xff\xd8\xff" for f in files)
    images = [decode_file(f) for f in files]
    assert {tuple(im.shape) for im in images} == {(3, 40, 50), (3, 50, 40)}
    photos = sample_photographs()
    assert [p.shape for p in photos] == [(427, 640, 3)] * 2  # china.jpg, flower.jpg
    # Each file's colours are its photograph's (the two differ: a temple and sky, a flower).
    for i, im in enumerate(images):
        mean = im.double().mean(dim=(1, 2))
        own = torch.tensor(photos[i % 2].mean(axis=(0, 1)))
        other = torch.tensor(photos[1 - i % 2].mean(axis=(0, 1)))
        assert (mean - own).abs().sum() < (mean - other).abs().sum()
    before = [f.stat().st_mtime_ns for f in files]
    write_photo_folder(root, 4, width=50, height=40)
    assert [f.stat().st_mtime_ns for f in files] == before


# ----------------------------------------------------------------------------------------------
# Speed settings, checked for correctness on the CPU


def _loss(model: SwAV, crops: list[torch.Tensor]) -> torch.Tensor:
    embeddings, scores = model(crops)
    out = swav_loss_from_outputs(
        embeddings.float(),
        scores.float(),
        batch_size=crops[0].shape[0],
        num_crops=len(crops),
        assignment_crops=[0, 1],
        prototypes=model.prototypes.weight,
        temperature=0.1,
        epsilon=0.05,
        sinkhorn_iterations=3,
        queue=None,
    )
    return out.loss


def _model_and_crops(arch: str = "resnet18") -> tuple[SwAV, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = SwAV(arch, 32, 16, 20).train()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    return model, crops


def test_channels_last_gives_the_same_loss_and_gradients_on_cpu() -> None:
    model, crops = _model_and_crops()
    loss = _loss(model, crops)
    loss.backward()
    grad = model.backbone.conv1.weight.grad.clone()  # type: ignore[union-attr]
    model.zero_grad()
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loss_cl = _loss(model, [c.contiguous(memory_format=torch.channels_last) for c in crops])
    loss_cl.backward()
    torch.testing.assert_close(loss_cl, loss, rtol=1e-4, atol=1e-5)
    grad_cl = model.backbone.conv1.weight.grad  # type: ignore[union-attr]
    assert grad_cl is not None and float((grad_cl - grad).norm() / grad.norm()) < 1e-3


@pytest.mark.parametrize(("arch", "mode"), [("convnet-tiny", "train"), ("resnet18", "eval")])
def test_bf16_autocast_forward_on_cpu_is_close_to_fp32(arch: str, mode: str) -> None:
    """bf16 keeps 8 bits of mantissa (0.4%): embeddings stay within a fraction of a degree and the
    loss within 1%. (ResNet-18 runs in eval mode: train-mode batch norm over 4 samples of 1 x 1
    maps at these tiny sizes amplifies any rounding, which says nothing about the precision.)"""
    model, crops = _model_and_crops(arch)
    getattr(model, mode)()
    with torch.no_grad():
        emb, _ = model(crops)
        loss = _loss(model, crops)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb16, _ = model(crops)
            loss16 = _loss(model, crops)
    assert emb16.dtype == torch.bfloat16 and torch.isfinite(loss16)
    cosine = torch.nn.functional.cosine_similarity(emb16.float(), emb, dim=1)
    assert cosine.min() > 0.999
    assert abs(loss16.item() - loss.item()) < 1e-2 * loss.item()


def test_compiled_model_matches_eager() -> None:
    """The multi-resolution forward traces into a graph (dynamo + AOT autograd; the eager backend
    keeps this a CPU test) and gives eager's loss and gradients."""
    torch._dynamo.reset()
    model, crops = _model_and_crops("convnet-tiny")
    loss = _loss(model, crops)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]  # type: ignore[union-attr]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c = _loss(compiled, crops)  # type: ignore[arg-type]
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The data path for device augmentation: workers read bytes, the device decodes


def test_encoded_items_are_file_bytes_for_jpegs_and_images_otherwise(tmp_path: Path) -> None:
    jpegs = write_image_folder(tmp_path / "j", classes=1, per_class=3, size=20, fmt="jpg")
    pngs = write_image_folder(tmp_path / "p", classes=1, per_class=2, size=20, fmt="png")
    paths = sorted(jpegs.rglob("*.jpg")) + sorted(pngs.rglob("*.png"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:40])  # a JPEG header, then nothing
    paths.append(broken)
    dataset = PretrainDataset(paths, seed=0, encoded=True)
    items = [dataset[(0, i)] for i in range(len(paths))]
    assert [is_encoded(x) for _, x in items] == [True, True, True, False, False, True]
    assert items[0][1].tolist() == list(paths[0].read_bytes())
    batch = collate(items)
    images, failures, cpu_decoded = decode_images(batch.images or [], torch.device("cpu"))
    assert cpu_decoded == 0  # counts only nvjpeg's misses: on the CPU there is no nvjpeg to miss
    assert [pos for pos, _ in failures] == [5]
    for image, path in zip(images, paths[:5], strict=True):
        assert torch.equal(image, decode_file(path))
    with pytest.raises(ValueError):
        PretrainDataset(paths, seed=0, encoded=True, transform=lambda x: x)


def test_pretrain_dataset_modes() -> None:
    crops, augment, cpu, cuda = (
        [CropSpec(16, 0.1, 1.0)],
        AugmentSpec(),
        torch.device("cpu"),
        torch.device("cuda"),
    )
    workers = pretrain_dataset([], seed=0, crops=crops, augment=augment, augment_on="workers", device=cuda)
    assert isinstance(workers.transform, MultiCrop) and not workers.encoded
    device_cpu = pretrain_dataset([], seed=0, crops=crops, augment=augment, augment_on="device", device=cpu)
    assert device_cpu.transform is None and not device_cpu.encoded
    device_gpu = pretrain_dataset([], seed=0, crops=crops, augment=augment, augment_on="device", device=cuda)
    assert device_gpu.transform is None and device_gpu.encoded
    decode_in_workers = pretrain_dataset(
        [],
        seed=0,
        crops=crops,
        augment=augment,
        augment_on="device",
        device=cuda,
        decode_in_workers=True,
    )
    assert not decode_in_workers.encoded


def test_worker_crops_depend_only_on_seed_epoch_and_index(folder: Path) -> None:
    paths = sorted(folder.rglob("*.png"))[:3]
    crops = [CropSpec(16, 0.14, 1.0), CropSpec(8, 0.05, 0.14)]
    a = pretrain_dataset(
        paths,
        seed=5,
        crops=crops,
        augment=AugmentSpec(),
        augment_on="workers",
        device=torch.device("cpu"),
    )
    first = a[(0, 1)][1]
    a[(0, 2)]
    torch.manual_seed(123)  # the global generator plays no part
    again = a[(0, 1)][1]
    other_epoch = a[(1, 1)][1]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other_epoch, strict=True))


def test_the_ratio_scripts_refuse_fewer_than_3_rounds() -> None:
    """docs/benchmarks.md's ratios are medians of at least 3 alternating rounds (issue 19)."""
    from swavctl.bench.common import rounds_arg

    assert rounds_arg("3") == 3
    for text in ("2", "0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            rounds_arg(text)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "sinkhorn.py"), "--repeats", "2", "--no-doc"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert done.returncode == 2 and "at least 3 alternating rounds" in done.stderr, done.stderr


def test_cpu_all_runs_every_ratio_section_with_the_command_it_cites() -> None:
    """``bench/cpu_all.sh`` re-measures every section of docs/benchmarks.md that a script writes,
    except the quality (own-data) and GPU ones, with the command printed in the section."""
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "cpu_all.sh")],
        capture_output=True,
        text=True,
        env=cli_env(BENCH_DRY="1"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    commands = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    sections = set(re.findall(r"^<!-- bench:([a-z-]+) -->$", doc, flags=re.MULTILINE))
    assert set(commands) == sections - {"own-data", "gpu"}
    for name, command in commands.items():
        section = doc.split(f"<!-- bench:{name} -->")[1].split(f"<!-- /bench:{name} -->")[0]
        assert f"- Command: `{command}`" in section
        assert (REPO / command.split()[1]).is_file()
