"""Data pipeline: our pretrain loader against the official SwAV pipeline, side by side.

Both loaders read the same folder of real JPEGs, make the paper's 2x224 + 6x96 crops with the
paper's augmentations, and run with the same batch size and worker count; rounds alternate
baseline and ours, and each figure is the median over rounds. Two folders by default, 512 JPEGs
of about 500 x 375 each (like ImageNet's): synthetic images (``swavctl.bench.jpegs``: smooth colour
and noise) and photographs (crops of scikit-learn's two bundled photos). Ours is ``swavctl bench
data`` (the loop's own loader); the baseline is :mod:`swavctl.bench.official_data`. Writes the
``data-pipeline`` section of docs/benchmarks.md.

    python bench/data_pipeline.py                       # both folders, 2 workers, 3 rounds
    python bench/data_pipeline.py --data DIR --workers 1,2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from swavctl import config
from swavctl.bench.common import rounds_arg
from swavctl.bench.data import bench_data
from swavctl.bench.jpegs import write_jpeg_folder, write_photo_folder
from swavctl.bench.official_data import OfficialMultiCropDataset, bench_official_loader
from swavctl.bench.report import command_line, hardware, today, update_section
from swavctl.files.image_folder import list_images


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the loaders' workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(folder: Path, name: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Alternating rounds of the official loader and ours on ``folder``; medians."""
    paths = list_images(folder)
    official = OfficialMultiCropDataset(paths, [224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14])
    settings = config.resolve(
        flags={
            "data.path": str(folder),
            "data.workers": workers,
            "train.batch_size": args.batch_size,
            "dist.gpus": 0,
        }
    )
    sps: dict[str, list[float]] = {"official": [], "ours": []}
    cpu_ms: dict[str, list[float]] = {"official": [], "ours": []}
    samples = (args.warmup + args.batches) * args.batch_size
    load_before = _load()
    for r in range(args.rounds):

        def run_base(r: int = r) -> float:
            figure = bench_official_loader(
                official,
                batch_size=args.batch_size,
                workers=workers,
                batches=args.batches,
                warmup=args.warmup,
                seed=r,
            )
            return figure.samples_per_s

        def run_ours() -> float:
            return bench_data(settings, batches=args.batches, warmup=args.warmup).figures[0].samples_per_s

        runs = [("official", run_base), ("ours", run_ours)]
        for key, run in runs if r % 2 == 0 else runs[::-1]:
            start = _cpu_seconds()
            sps[key].append(run())
            cpu_ms[key].append(1000 * (_cpu_seconds() - start) / samples)
        print(
            f"{name}, workers {workers}, round {r}: samples/s official {sps['official'][-1]:.1f}, "
            f"ours {sps['ours'][-1]:.1f}; CPU ms per sample official {cpu_ms['official'][-1]:.1f}, "
            f"ours {cpu_ms['ours'][-1]:.1f}",
            flush=True,
        )
    o, b = statistics.median(sps["ours"]), statistics.median(sps["official"])
    cpu_o, cpu_b = statistics.median(cpu_ms["ours"]), statistics.median(cpu_ms["official"])
    return {
        "folder": name,
        "images": len(paths),
        "workers": workers,
        "ours": o,
        "official": b,
        "ratio": o / b,
        "ours_rounds": sps["ours"],
        "official_rounds": sps["official"],
        "cpu_ms_ours": cpu_o,
        "cpu_ms_official": cpu_b,
        "cpu_ratio": cpu_b / cpu_o,
        "load_before": load_before,
        "load_after": _load(),
    }


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def rounds(values: list[float]) -> str:
        return ", ".join(f"{v:.0f}" for v in values)

    table = "\n".join(
        f"| {r['folder']} | {r['workers']} | {r['official']:.1f} | {r['ours']:.1f} | **{r['ratio']:.2f}x** | "
        f"{rounds(r['official_rounds'])} / {rounds(r['ours_rounds'])} | "
        f"{r['cpu_ms_official']:.1f} / {r['cpu_ms_ours']:.1f}: **{r['cpu_ratio']:.2f}x** | "
        f"{r['load_before']} / {r['load_after']} |"
        for r in rows
    )
    return f"""## Data pipeline (CPU): ours vs the official pipeline

- Date: {today()}
- Hardware: {hardware()}
- Command: `{command_line()}`
- Data: two folders of 512 JPEGs of about 500 x 375 (a quarter portrait): synthetic (smooth colour
  and noise, `swavctl.bench.jpegs.write_jpeg_folder`) and photographs (crops of scikit-learn's two
  bundled photos, china.jpg and flower.jpg, resized, `write_photo_folder`). 2x224 + 6x96 crops,
  batch {args.batch_size}, {args.warmup} warm-up batches then {args.batches} timed batches per loader,
  median of {args.rounds} alternating rounds. CPU: CPU milliseconds per sample of the loader's
  processes (the main process and its workers, warm-up included), official / ours, and their ratio;
  on a shared machine it moves much less than samples/s. Load: the 1, 5 and 15 minute load averages
  before and after each row (a load above the core count slows both loaders).
- Baseline: the official `MultiCropDataset` (PIL decode, torchvision v1 transforms, PIL Gaussian blur,
  default collate). Ours: the pretrain loop's loader (`swavctl bench data`, `data.augment_on="workers"`:
  torchvision decode and `swavctl.data.multicrop.MultiCrop` in the workers).

| folder | workers | official (samples/s) | ours (samples/s) | ratio | rounds: official / ours | CPU | load |
|---|---|---|---|---|---|---|---|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="one JPEG folder instead of the two generated ones")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", default="2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds (at least 3)")
    parser.add_argument(
        "--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    )
    parser.add_argument("--no-doc", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()

    tmp = Path(tempfile.gettempdir())
    folders = (
        {args.data.name: args.data}
        if args.data
        else {
            "synthetic": write_jpeg_folder(tmp / "swavctl-bench-jpegs", args.images),
            "photographs": write_photo_folder(tmp / "swavctl-bench-photos", args.images),
        }
    )
    # The main process only waits on workers (and runs the loop's crop hand-over): one thread,
    # as in each worker, so both loaders get the same CPU.
    torch.set_num_threads(1)
    rows = [
        measure(folder, name, int(workers), args)
        for workers in args.workers.split(",")
        for name, folder in folders.items()
    ]
    print(json.dumps({"rows": rows}))
    if not args.no_doc:
        update_section("data-pipeline", render(rows, args), args.doc)
        print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
