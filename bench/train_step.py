"""Training step on CPU: our SwAV step against lightly's, side by side.

Same backbone (torchvision ResNet, pooled features), same projection head (Linear, BatchNorm1d,
ReLU, Linear to 128), same 3000 prototypes, same crops (default: the paper's 2x224 + 6x96), same
synthetic batch. Ours is ``swavctl bench step`` (the pretrain loop's step, with LARC); lightly's is
its documented SwAV recipe (lightly/examples: ``SwaVProjectionHead``, ``SwaVPrototypes``,
``SwaVLoss``, one forward per crop, Adam). Steps of the two alternate; figures are medians over
the timed steps. Needs ``pip install lightly`` (the ``bench`` extra); without it the script says
so and exits. Writes the ``train-step`` section of docs/benchmarks.md.

    python bench/train_step.py                        # ResNet-50, batch 8
    python bench/train_step.py --arch resnet18 --batch-size 16 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from swavctl import config
from swavctl.bench.common import rounds_arg
from swavctl.bench.report import (
    add_output_options,
    apply_threads,
    command_line,
    hardware,
    today,
    update_section,
)
from swavctl.bench.step import StepRunner, summarize
from swavctl.model.backbones import build_backbone


class LightlySwaV(nn.Module):
    """lightly's SwAV example model around our backbone factory (the same torchvision ResNet)."""

    def __init__(self, arch: str, hidden: int, out: int, prototypes: int) -> None:
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        super().__init__()
        self.backbone, dim = build_backbone(arch)
        self.projection_head = SwaVProjectionHead(dim, hidden, out)
        self.prototypes = SwaVPrototypes(out, n_prototypes=prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x).flatten(start_dim=1)
        x = self.projection_head(x)
        x = nn.functional.normalize(x, dim=1, p=2)
        return self.prototypes(x)  # type: ignore[no-any-return]


class LightlyRunner:
    """lightly's training step on the same crops as a :class:`StepRunner`."""

    def __init__(self, settings: config.Settings, crops: list[torch.Tensor]) -> None:
        from lightly.loss import SwaVLoss

        torch.manual_seed(settings.train.seed)
        m = settings.model
        self.model = LightlySwaV(m.arch, m.hidden_dim, m.embedding_dim, m.prototypes)
        self.criterion = SwaVLoss(
            temperature=settings.swav.temperature,
            sinkhorn_iterations=settings.swav.sinkhorn_iterations,
            sinkhorn_epsilon=settings.swav.epsilon,
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.001)
        self.crops = [c.contiguous() for c in crops]
        self.high = settings.data.crop_counts[0]
        self.loss = float("nan")

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.model.prototypes.normalize()
        features = [self.model(view) for view in self.crops]
        t1 = time.perf_counter()
        loss = self.criterion(features[: self.high], features[self.high :])
        t2 = time.perf_counter()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.loss = float(loss.detach())
        t3 = time.perf_counter()
        return (t1 - t0) + (t3 - t2), t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--steps", type=rounds_arg, default=5, help="timed steps of each, alternating (at least 3)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a.b=value, as in swavctl"
    )
    add_output_options(parser)
    args = parser.parse_args()
    try:
        import lightly  # noqa: F401
    except ImportError:
        print(
            "lightly is not installed (pip install 'swavctl[bench]'): no baseline to compare with",
            file=sys.stderr,
        )
        sys.exit(3)
    apply_threads(args)
    settings = config.resolve(
        flags={"model.arch": args.arch, "train.batch_size": args.batch_size, "dist.gpus": 0},
        overrides=args.overrides,
    )
    ours = StepRunner(settings)
    theirs = LightlyRunner(settings, ours.crops)
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "lightly": []}
    for i in range(args.warmup + args.steps):
        for name, runner in (("lightly", theirs), ("ours", ours)):
            phases = runner.step()
            if i >= args.warmup:
                times[name].append(phases)
        print(
            f"step {i}: "
            + ", ".join(f"{k} {sum(v[-1]) if v else float('nan'):.2f} s" for k, v in times.items()),
            flush=True,
        )
    result = summarize(settings, ours, [a for a, _ in times["ours"]], [b for _, b in times["ours"]], 0.0)
    bs = args.batch_size
    lightly_step = statistics.median(a + b for a, b in times["lightly"])
    lightly_sl = statistics.median(b for _, b in times["lightly"])
    summary = {
        "arch": args.arch,
        "crops": result.crops,
        "batch_size": bs,
        "threads": torch.get_num_threads(),
        "ours_samples_per_s": result.samples_per_s,
        "lightly_samples_per_s": bs / lightly_step,
        "ratio": result.samples_per_s / (bs / lightly_step),
        "ours_sinkhorn_loss_ms": result.sinkhorn_loss_ms,
        "lightly_sinkhorn_loss_ms": 1000 * lightly_sl,
        "ours_loss": ours.loss,
        "lightly_loss": theirs.loss,
        "steps": args.steps,
    }
    print(json.dumps(summary))
    if args.no_doc:
        return
    lightly_sps, ours_sps = summary["lightly_samples_per_s"], summary["ours_samples_per_s"]

    def steps(values: list[tuple[float, float]]) -> str:
        return ", ".join(f"{a + b:.2f}" for a, b in values)

    lightly_sl, ours_sl = summary["lightly_sinkhorn_loss_ms"], summary["ours_sinkhorn_loss_ms"]
    body = f"""## Training step (CPU): ours vs lightly's SwAV

- Date: {today()}
- Hardware: {hardware()}, {summary["threads"]} torch threads
- Command: `{command_line()}`
- Setup: {args.arch}, head 2048-2048-128, {settings.model.prototypes} prototypes, crops {result.crops},
  batch {bs}, synthetic crops, fp32; {args.warmup} warm-up step(s) then {args.steps} timed steps each,
  alternating; medians. lightly {lightly.__version__}: its SwAV example (one forward per crop, Adam);
  ours: the pretrain loop's step (one backbone pass per crop size, LARC, and the
  channels_last layout of `train.channels_last`, on by default; lightly's example keeps torch's
  NCHW default). Ours in NCHW, before channels_last applied on the CPU: 1.51x (2026-11-28).

| | lightly (samples/s) | ours (samples/s) | ratio |
|---|---|---|---|
| full step | {lightly_sps:.2f} | {ours_sps:.2f} | **{summary["ratio"]:.2f}x** |

Sinkhorn + loss per step: lightly {lightly_sl:.1f} ms, ours {ours_sl:.1f} ms. Each timed step (s):
lightly {steps(times["lightly"])}; ours {steps(times["ours"])}.
"""
    update_section("train-step", body, args.doc)
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
