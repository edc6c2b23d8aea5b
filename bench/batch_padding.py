"""Batched (GPU-path) augmentation of mixed image sizes: size groups against one padded stack.

Both sides run :func:`swavctl.data.multicrop.apply_draws` on the same images with the same
draws, the paper's 2x224 + 6x96 crops with every random op on; the baseline pads the
whole batch into one stack. Calls alternate; figures are medians. Writes the ``batch-padding``
section of docs/benchmarks.md.

    python bench/batch_padding.py
    python bench/batch_padding.py --batch 32 --rounds 5 --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch

from swavctl.bench.common import rounds_arg
from swavctl.bench.padding import (
    LARGE_PHOTO,
    PaddingBenchResult,
    bench_padding,
    jpeg_folder_sizes,
    mixed_photo_sizes,
)
from swavctl.bench.report import (
    add_output_options,
    apply_threads,
    command_line,
    hardware,
    today,
    update_section,
)
from swavctl.config import resolve
from swavctl.data.multicrop import PAD_SLACK
from swavctl.train.build import crop_specs


def _row(r: PaddingBenchResult) -> str:
    return (
        f"| {r.mix} | {r.groups} | {r.baseline_padded_mpx:.1f} / {r.ours_padded_mpx:.1f} "
        f"| {r.baseline_ms:.0f} | {r.ours_ms:.0f} | **{r.speedup:.2f}x** | {r.max_abs_diff:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds (at least 3)")
    parser.add_argument("--device", default="cpu")
    add_output_options(parser)
    args = parser.parse_args()
    apply_threads(args)
    device = torch.device(args.device)
    settings = resolve()  # the paper's crops and augmentation
    crops, augment = crop_specs(settings), settings.data.augment
    n = args.batch
    mixes = {
        "benchmark JPEG folder: 500 x 375, a quarter portrait": jpeg_folder_sizes(n),
        "mixed photos (long side 300 to 1600)": mixed_photo_sizes(n),
        f"mixed photos + one {LARGE_PHOTO[1]} x {LARGE_PHOTO[0]}": mixed_photo_sizes(n, large_photo=True),
    }
    results = [
        bench_padding(name, sizes, crops, augment, device=device, rounds=args.rounds)
        for name, sizes in mixes.items()
    ]
    print(json.dumps([r.as_dict() for r in results]))
    if args.no_doc:
        return
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    where = "CPU" if device.type == "cpu" else "GPU" if device.type == "cuda" else device.type
    runs = "; ".join(
        f"{r.mix.split(':')[0]}: "
        + ", ".join(f"{t:.0f}" for t in r.baseline_runs_ms)
        + " / "
        + ", ".join(f"{t:.0f}" for t in r.ours_runs_ms)
        for r in results
    )
    body = f"""## Batched augmentation of mixed image sizes: size groups vs one padded stack

- Date: {today()}
- Hardware: {hardware(device)}{threads}
- Command: `{command_line()}`
- Setup: `swavctl.data.multicrop.apply_draws` (the `data.augment_on="device"` path, here on
  the {where}), batch {n} of decoded uint8 images, 2x224 + 6x96 crops, every random op on,
  the same parameters on both sides; one warm-up call each, then {args.rounds} alternating timed
  calls, medians. Baseline: the whole batch padded into one `[N, 3, H_max, W_max]` stack (before
  `size_groups`). Ours: `size_groups` (slack {PAD_SLACK}): landscape apart from portrait, and
  images of very different areas apart. The mixes are stated size lists
  (`swavctl.bench.padding`), not a measured dataset's.

| sizes | groups | padded Mpx per channel (one stack / groups) | one stack (ms) | groups (ms) | ratio \
| max abs difference |
|---|---|---|---|---|---|---|
{chr(10).join(_row(r) for r in results)}

Each timed call (ms), one stack / groups: {runs}.
"""
    update_section("batch-padding", body, args.doc)
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
