"""Multi-crop on the CPU: where a loader worker's time goes, and why there are two paths.

1. Stages (``swavctl.bench.stages``): one image's 2x224 + 6x96 crops, stage by stage, ours against
   the official pipeline, on the synthetic and the photograph folders; each measurement in a new
   one-thread process, rounds alternating, medians.
2. Paths (``swavctl.bench.multicrop_paths``): the worker path against the device path (on the
   CPU) on photographs with the paper's crops and on the demo's digits with the demo's crops.

Writes the ``multicrop`` section of docs/benchmarks.md.

    python bench/multicrop.py
    python bench/multicrop.py --images 32 --rounds 3 --no-doc
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from swavctl.bench.common import rounds_arg
from swavctl.bench.jpegs import write_jpeg_folder, write_photo_folder
from swavctl.bench.multicrop_paths import PathsResult, bench_hue, bench_paths
from swavctl.bench.report import add_output_options, command_line, hardware, today, update_section
from swavctl.bench.stages import OFFICIAL, OURS, StageTimes, stage_times
from swavctl.config import resolve
from swavctl.data.demo import demo_dataset
from swavctl.data.images import decode_file
from swavctl.data.multicrop import AugmentSpec, crop_specs
from swavctl.files.image_folder import list_images

PIPELINES = ("official", "ours")


def _median(runs: list[StageTimes]) -> StageTimes:
    ms = {k: statistics.median(r.ms[k] for r in runs) for k in runs[0].ms}
    return StageTimes(runs[0].pipeline, runs[0].images, ms)


def measure_stages(folders: dict[str, Path], images: int, rounds: int) -> dict[str, dict[str, StageTimes]]:
    out: dict[str, dict[str, StageTimes]] = {}
    for name, folder in folders.items():
        paths = list_images(folder)[:images]
        runs: dict[str, list[StageTimes]] = {p: [] for p in PIPELINES}
        for r in range(rounds):
            for pipeline in PIPELINES if r % 2 == 0 else PIPELINES[::-1]:
                runs[pipeline].append(stage_times(pipeline, paths))
                print(f"{name} round {r}: {pipeline} {runs[pipeline][-1].total_ms:.2f} ms/image", flush=True)
        out[name] = {p: _median(v) for p, v in runs.items()}
    return out


def measure_paths(photos: Path, images: int, rounds: int) -> list[PathsResult]:
    paper = resolve().data
    demo = resolve(preset="demo").data
    photo_images = [decode_file(p) for p in list_images(photos)[:images]]
    digits = [decode_file(p) for p in list_images(demo_dataset())[:256]]
    return [
        bench_paths(
            "photographs, 2x224 + 6x96, the paper's augmentation", photo_images, crop_specs(paper),
            AugmentSpec(), batch=32, rounds=rounds,
        ),
        bench_paths(
            "the demo's digits (32 px), 2x16 + 4x8, the demo's augmentation", digits, crop_specs(demo),
            demo.augment, batch=128, rounds=rounds,
        ),
    ]  # fmt: skip


def _stage_table(stages: dict[str, dict[str, StageTimes]]) -> str:
    rows = []
    for folder, by_pipeline in stages.items():
        official, ours = by_pipeline["official"], by_pipeline["ours"]
        for label, t, stages_of in (("official", official, OFFICIAL), ("ours", ours, OURS)):
            parts = ", ".join(f"{k} {t.ms[k]:.2f}" for k in stages_of if k != "rest" or t.ms[k])
            rows.append(f"| {folder} | {label} | {t.total_ms:.2f} | {parts} |")
        rows.append(f"| {folder} | official / ours | **{official.total_ms / ours.total_ms:.2f}x** | |")
    return "\n".join(rows)


def render(
    stages: dict[str, dict[str, StageTimes]],
    paths: list[PathsResult],
    hue: tuple[float, float],
    args: argparse.Namespace,
) -> str:
    path_rows = "\n".join(
        f"| {p.case} | {p.batch} | {p.worker_ms:.2f} | {p.device_ms:.2f} | {p.device_over_worker:.2f} |"
        for p in paths
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"""## Multi-crop on the CPU: where a worker's time goes, and why two paths

- Date: {today()}
- Hardware: {hardware()}; load average at the end {load} (the machine is shared: CPU times, not wall)
- Command: `{command_line()}`
- Stages: {args.images} JPEGs of each folder (the ones `bench/data_pipeline.py` reads), 2x224 + 6x96 crops,
  the paper's augmentation, one torch thread in a new process per measurement (as a loader worker),
  CPU ms per image, medians of {args.rounds} alternating rounds. Ours is the worker path,
  `swavctl.data.multicrop.MultiCrop`, timed by wrapping its parts while it runs ("rest" is the Python
  between them); the official pipeline is timed transform by transform.

| folder | pipeline | total (ms per image) | per stage (ms per image) |
|---|---|---|---|
{_stage_table(stages)}

- Paths: the same decoded images and seeds through both paths, one torch thread, CPU ms per image,
  medians of {args.rounds} alternating rounds.

| images and crops | device batch | worker path (ms/image) | device path (ms/image) | device / worker |
|---|---|---|---|---|
{path_rows}

- Hue, one 224 px crop, one thread: ours (the chroma form, `multicrop.photometric.adjust_hue`)
  {hue[0]:.2f} ms, torchvision's `adjust_hue` (the HSV round trip) {hue[1]:.2f} ms: **{hue[1] / hue[0]:.1f}x**
  (the same values to 2e-6, `tests/test_multicrop.py`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="images per folder for the stages")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds (at least 3)")
    add_output_options(parser)
    args = parser.parse_args()
    tmp = Path(tempfile.gettempdir())
    folders = {
        "synthetic": write_jpeg_folder(tmp / "swavctl-bench-jpegs", 512),
        "photographs": write_photo_folder(tmp / "swavctl-bench-photos", 512),
    }
    stages = measure_stages(folders, args.images, args.rounds)
    paths = measure_paths(folders["photographs"], 32, args.rounds)
    hue = bench_hue(rounds=args.rounds)
    print(
        json.dumps(
            {
                "stages": {f: {p: t.__dict__ for p, t in v.items()} for f, v in stages.items()},
                "paths": [p.as_dict() for p in paths],
                "hue_ms": {"ours": hue[0], "torchvision": hue[1]},
            }
        )
    )
    if not args.no_doc:
        update_section("multicrop", render(stages, paths, hue, args), args.doc)
        print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
