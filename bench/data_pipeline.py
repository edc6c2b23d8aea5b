"""Data pipeline: our pretrain loader against the official SwAV pipeline, side by side.

Both loaders read the same folder of real JPEGs (default: 512 generated ones of 500 x 375, like
ImageNet's), make the paper's 2x224 + 6x96 crops with the paper's augmentations, and run with the
same batch size and worker count; rounds alternate baseline and ours, and each figure is the
median over rounds. Ours is ``swavctl bench data`` (the loop's own loader); the baseline is
:mod:`swavctl.bench.official_data`. Writes the ``data-pipeline`` section of docs/benchmarks.md.

    python bench/data_pipeline.py                       # generated JPEGs, 2 workers
    python bench/data_pipeline.py --data DIR --workers 1,2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from swavctl import config
from swavctl.bench.data import bench_data
from swavctl.bench.jpegs import write_jpeg_folder
from swavctl.bench.official_data import OfficialMultiCropDataset, bench_official_loader
from swavctl.bench.report import command_line, hardware, today, update_section
from swavctl.data.images import list_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="JPEG folder (default: generate --images JPEGs)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", default="2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    )
    parser.add_argument("--no-doc", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()

    data = args.data or write_jpeg_folder(Path(tempfile.gettempdir()) / "swavctl-bench-jpegs", args.images)
    paths = list_images(data)
    counts = [int(w) for w in args.workers.split(",")]
    # The main process only waits on workers (and runs the loop's crop hand-over): one thread,
    # as in each worker, so both loaders get the same CPU.
    torch.set_num_threads(1)
    official = OfficialMultiCropDataset(paths, [224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14])
    rows = []
    for workers in counts:
        settings = config.resolve(
            flags={
                "data.path": str(data),
                "data.workers": workers,
                "train.batch_size": args.batch_size,
                "dist.gpus": 0,
            }
        )
        ours_sps, base_sps = [], []
        for r in range(args.rounds):
            base = bench_official_loader(
                official,
                batch_size=args.batch_size,
                workers=workers,
                batches=args.batches,
                warmup=args.warmup,
                seed=r,
            )
            ours = bench_data(settings, batches=args.batches, warmup=args.warmup).figures[0]
            base_sps.append(base.samples_per_s)
            ours_sps.append(ours.samples_per_s)
            print(
                f"workers {workers} round {r}: official {base.samples_per_s:.1f}, "
                f"ours {ours.samples_per_s:.1f} samples/s",
                flush=True,
            )
        o, b = statistics.median(ours_sps), statistics.median(base_sps)
        rows.append(
            {
                "workers": workers,
                "ours": o,
                "official": b,
                "ratio": o / b,
                "ours_rounds": ours_sps,
                "official_rounds": base_sps,
            }
        )
    print(json.dumps({"data": str(data), "images": len(paths), "rows": rows}))
    if args.no_doc:
        return

    def rounds(values: list[float]) -> str:
        return ", ".join(f"{v:.0f}" for v in values)

    table = "\n".join(
        f"| {r['workers']} | {r['official']:.1f} | {r['ours']:.1f} | **{r['ratio']:.2f}x** | "
        f"{rounds(r['official_rounds'])} / {rounds(r['ours_rounds'])} |"
        for r in rows
    )
    body = f"""## Data pipeline (CPU): ours vs the official pipeline

- Date: {today()}
- Hardware: {hardware()}
- Command: `{command_line()}`
- Data: {len(paths)} JPEGs of about 500 x 375 (`swavctl.bench.jpegs`), 2x224 + 6x96 crops,
  batch {args.batch_size}, {args.warmup} warm-up batches then {args.batches} timed batches per loader,
  median of {args.rounds} alternating rounds.
- Baseline: the official `MultiCropDataset` (PIL decode, torchvision v1 transforms, PIL Gaussian blur,
  default collate). Ours: the pretrain loop's loader (`swavctl bench data`, `data.augment_on="workers"`:
  torchvision decode and `swavctl.data.fast_augment.FastMultiCrop` in the workers).

| workers | official (samples/s) | ours (samples/s) | ratio | each round: official / ours |
|---|---|---|---|---|
{table}
"""
    update_section("data-pipeline", body, args.doc)
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
