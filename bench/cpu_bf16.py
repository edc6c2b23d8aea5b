"""bf16 against fp32 on the CPU: one training step of convnet-tiny, forward and backward.

Reproducible command (the figure in docs/benchmarks.md and ``auto_recipe.CPU_BF16_SPEEDUP``)::

    python bench/cpu_bf16.py

The own-data recipe's step without its data: a batch of 64 images as 2 x 32 px + 4 x 16 px
crops (random tensors, channels_last, as training lays them out), the model's forward under
autocast (bf16) or without it (fp32), and the backward of a scalar. Each round times
``--repeats`` steps of fp32 then of bf16 after one warm-up step each; the figures are the medians
over ``--rounds`` alternating rounds, and the ratio is fp32's median over bf16's. On a CPU
without bf16 matrix units (AMX) the ratio is below 1: the automatic recipe picks bf16 only where
``/proc/cpuinfo`` lists ``amx_bf16`` (``swavctl.train.survey.cpu_has_amx``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from swavctl.bench.common import rounds_arg
from swavctl.model.backbones import build_backbone
from swavctl.train.survey import cpu_has_amx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=rounds_arg, default=4, help="Alternating rounds (at least 3).")
    parser.add_argument("--repeats", type=int, default=3, help="Steps timed per precision per round.")
    parser.add_argument("--batch", type=int, default=64, help="Images per step.")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    net, _ = build_backbone("convnet-tiny")
    net = net.to(memory_format=torch.channels_last)
    crops = [
        torch.randn(2 * args.batch, 3, 32, 32).to(memory_format=torch.channels_last),
        torch.randn(4 * args.batch, 3, 16, 16).to(memory_format=torch.channels_last),
    ]

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = torch.cat([net(c) for c in crops])
        out.float().square().mean().backward()

    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in ("fp32", "bf16"):
            step(name == "bf16")
            started = time.perf_counter()
            for _ in range(args.repeats):
                step(name == "bf16")
            seconds[name].append((time.perf_counter() - started) / args.repeats)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "cpu": platform.processor() or platform.machine(),
        "amx": cpu_has_amx(),
        "threads": torch.get_num_threads(),
        "rounds": {name: [round(v, 4) for v in values] for name, values in seconds.items()},
        "median_s": {name: round(v, 4) for name, v in medians.items()},
        "speedup": round(medians["fp32"] / medians["bf16"], 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
