"""LARC speed: the fused (``torch._foreach``) rescaling against one parameter at a time.

The baseline, :func:`per_parameter_larc`, applies the same formula as
:meth:`swavctl.train.larc.LARC.adapt_gradients` one parameter at a time, as the official code
(apex's LARC) and swavctl's first version did: about two dozen small operators per parameter.
Both run on the same model with the same random gradients; calls alternate and the figures are
medians. The operator count per call (torch.profiler) is what matters on a GPU, where each one
is a kernel launch of a few microseconds of CPU time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from swavctl.bench.common import timed
from swavctl.config import resolve
from swavctl.train.build import build_model, build_optimizer
from swavctl.train.larc import LARC


@torch.no_grad()
def per_parameter_larc(optimizer: LARC) -> None:
    """The baseline: LARC's rescaling and weight decay, one parameter at a time."""
    for group in optimizer.param_groups:
        if group.get("lars_exclude", False):
            continue
        weight_decay = group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            param_norm = torch.linalg.vector_norm(p.float())
            grad_norm = torch.linalg.vector_norm(grad.float())
            denominator = grad_norm + param_norm * weight_decay + optimizer.eps
            local = optimizer.trust_coefficient * param_norm / denominator
            if optimizer.clip:
                local = torch.clamp(local / group["lr"], max=1.0)
            active = (param_norm != 0) & (grad_norm != 0)
            scale = torch.where(active, local, torch.ones_like(local)).to(grad.dtype)
            decay = torch.where(active, torch.full_like(local, weight_decay), torch.zeros_like(local))
            grad.add_(p * decay.to(p.dtype)).mul_(scale)


def operators_per_call(fn: Callable[[], None]) -> int:
    """Top-level ``aten::`` operators ``fn`` dispatches (each is a kernel launch on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


@dataclass
class LarcBenchResult:
    device: str
    preset: str
    parameters: int
    repeats: int
    threads: int
    baseline_ms: float
    ours_ms: float
    speedup: float
    baseline_ops: int
    ours_ops: int
    max_abs_diff: float
    max_abs_value: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def bench_larc(
    *, device: torch.device, preset: str = "swav-rn50-800ep", repeats: int = 20
) -> LarcBenchResult:
    """Time both versions on the model of ``preset`` with random gradients (same for both)."""
    settings = resolve(preset=preset)
    model = build_model(settings).to(device)
    optimizer = build_optimizer(model, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads = [(torch.randn(p.shape, generator=generator) * 1e-3).to(device) for p in params]

    def load_grads() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()

    def baseline() -> None:
        per_parameter_larc(optimizer)

    def fresh_grads_ms(fn: Callable[[], None]) -> float:
        """Milliseconds of ``fn`` on freshly loaded gradients (the loading is not timed)."""
        load_grads()
        return 1e3 * timed(fn, device)[1]

    load_grads()
    baseline()
    expected = [p.grad.clone() for p in params if p.grad is not None]
    load_grads()
    optimizer.adapt_gradients()
    got = [p.grad for p in params if p.grad is not None]
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    for _ in range(2):  # warm-up
        fresh_grads_ms(baseline)
        fresh_grads_ms(optimizer.adapt_gradients)
    baseline_ms, ours_ms = [], []
    for _ in range(repeats):
        baseline_ms.append(fresh_grads_ms(baseline))
        ours_ms.append(fresh_grads_ms(optimizer.adapt_gradients))
    load_grads()
    baseline_ops = operators_per_call(baseline)
    load_grads()
    ours_ops = operators_per_call(optimizer.adapt_gradients)
    return LarcBenchResult(
        device=str(device),
        preset=preset,
        parameters=len(params),
        repeats=repeats,
        threads=torch.get_num_threads(),
        baseline_ms=statistics.median(baseline_ms),
        ours_ms=statistics.median(ours_ms),
        speedup=statistics.median(baseline_ms) / statistics.median(ours_ms),
        baseline_ops=baseline_ops,
        ours_ops=ours_ops,
        max_abs_diff=diff,
        max_abs_value=max(float(e.abs().max()) for e in expected),
    )
