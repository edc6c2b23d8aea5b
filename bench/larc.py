"""LARC's gradient rescaling: ours (``torch._foreach`` over all parameters) against a per-parameter loop.

See :mod:`swavctl.bench.larc`. On the CPU, and on a GPU when one is at hand (``--device cuda``,
or automatically). Writes the ``larc`` section of docs/benchmarks.md.

    python bench/larc.py
    python bench/larc.py --repeats 30 --threads 2
"""

from __future__ import annotations

import argparse
import json

import torch

from swavctl.bench.common import rounds_arg
from swavctl.bench.larc import LarcBenchResult, bench_larc
from swavctl.bench.report import (
    add_output_options,
    apply_threads,
    command_line,
    hardware,
    today,
    update_section,
)

PRESETS = ("swav-rn50-800ep", "demo")


def _row(r: LarcBenchResult) -> str:
    ops = f"{r.baseline_ops} / {r.ours_ops}"
    diff = f"{r.max_abs_diff:.1e} (values up to {r.max_abs_value:.1e})"
    times = f"{r.baseline_ms:.2f} | {r.ours_ms:.2f} | **{r.speedup:.2f}x**"
    return f"| {r.device} | {r.preset} | {times} | {ops} | {diff} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=rounds_arg, default=20, help="alternating calls (at least 3)")
    add_output_options(parser)
    args = parser.parse_args()
    apply_threads(args)
    results = [bench_larc(device=torch.device("cpu"), preset=p, repeats=args.repeats) for p in PRESETS]
    if torch.cuda.is_available():
        results += [bench_larc(device=torch.device("cuda"), preset=p, repeats=args.repeats) for p in PRESETS]
    print(json.dumps([r.as_dict() for r in results]))
    if args.no_doc:
        return
    cpu = results[0]
    rows = "\n".join(_row(r) for r in results)
    if not torch.cuda.is_available():
        rows += "\n| cuda | not yet measured (no GPU in this run) | | | | | |"
    body = f"""## LARC: fused (foreach) against one parameter at a time

- Date: {today()}
- Hardware: {hardware()}, {cpu.threads} torch threads
- Command: `{command_line()}`
- Setup: the models of the `swav-rn50-800ep` preset (ResNet-50 + head + 3000 prototypes,
  {cpu.parameters} parameters) and of the `demo` preset (convnet-tiny), the same random gradients for
  both versions, trust 0.001, the preset's weight decay; medians of {cpu.repeats} alternating calls.
  Operators: top-level `aten::` operators dispatched per call (torch.profiler).

| device | preset | per parameter (ms) | ours (ms) | ratio | operators (per parameter / ours) | max abs diff |
|---|---|---|---|---|---|---|
{rows}

On the CPU, for ResNet-50, both are mostly arithmetic over 28M values; ours also skips a
temporary copy of the weights (the weight decay goes into one multiply-add). For the small demo
model the loop's per-operator overhead dominates, as it does for any model on a GPU, where every
operator is at least one kernel launch of a few microseconds of CPU time while the GPU waits. The
difference is rounding: ours computes g * s + p * (wd * s) where the loop computes (g + wd * p) * s.
"""
    update_section("larc", body, args.doc)
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
