"""Sinkhorn speed: :func:`swavctl.clustering.sinkhorn_knopp.sinkhorn` against the official formula.

The baseline is the official code's procedure (facebookresearch/swav, ``distributed_sinkhorn``
on one process): ``Q = exp(scores / epsilon)^T``, divide by the total, then ``iterations`` times
divide the rows by their sums and by K and the columns by their sums and by B, finally multiply
by B. It overflows fp32 for large ``scores / epsilon`` and underflows prototypes far from every
sample; ours shifts each prototype row by its maximum (nothing overflows, no row underflows),
runs the same multiplicative iterations, and falls back to the log domain only when a sample's
column underflows (see :func:`swavctl.clustering.sinkhorn_knopp.sinkhorn`).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F

from swavctl.bench.common import timed
from swavctl.clustering.sinkhorn_knopp import sinkhorn


@torch.no_grad()
def official_sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The official procedure, literally (single process); ``scores`` is B x K."""
    q = torch.exp(scores / epsilon).t()  # K x B
    q /= torch.sum(q)
    num_prototypes, batch = q.shape
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= num_prototypes
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


def realistic_scores(
    batch: int, prototypes: int, dim: int = 128, *, device: torch.device, seed: int = 0
) -> torch.Tensor:
    """Cosine scores of unit embeddings against unit prototypes (the range SwAV sees: [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return (z @ c.t()).to(device)


@dataclass
class SinkhornBenchResult:
    batch: int
    prototypes: int
    device: str
    dtype: str
    threads: int
    ours_ms: float
    official_ms: float
    speedup: float  # official_ms / ours_ms (> 1: ours is faster)
    max_abs_diff: float  # between the two results, where the official one is finite

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def bench_sinkhorn(
    batch: int = 4096,
    prototypes: int = 3000,
    *,
    device: torch.device | None = None,
    repeats: int = 10,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> SinkhornBenchResult:
    """Median wall time of each implementation over ``repeats`` calls, interleaved (fp32)."""
    device = device or torch.device("cpu")
    scores = realistic_scores(batch, prototypes, device=device)
    ours = sinkhorn(scores, epsilon=epsilon, iterations=iterations)
    theirs = official_sinkhorn(scores, epsilon=epsilon, iterations=iterations)
    diff = float((ours - theirs).abs().max())
    times: dict[str, list[float]] = {"ours": [], "official": []}
    for _ in range(repeats):
        for name, fn in (("ours", sinkhorn), ("official", official_sinkhorn)):
            times[name].append(timed(partial(fn, scores, epsilon=epsilon, iterations=iterations), device)[1])
    ours_ms = 1000 * statistics.median(times["ours"])
    official_ms = 1000 * statistics.median(times["official"])
    return SinkhornBenchResult(
        batch=batch,
        prototypes=prototypes,
        device=str(device),
        dtype="float32",
        threads=torch.get_num_threads(),
        ours_ms=ours_ms,
        official_ms=official_ms,
        speedup=official_ms / ours_ms,
        max_abs_diff=diff,
    )
