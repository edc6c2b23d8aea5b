"""SeLa's initial labels and its schedule of label solves (``yukimasano/self-label@3891e37:main.py``).

* Initial labels (MN:149-156): per head, ``L_i = i mod K`` for i = 0..N-1, randomly permuted, so
  every class has ``floor(N/K)`` or ``ceil(N/K)`` members.
* Solve times (MN:84-90, 134-135): in samples seen, ``t_i = (E + 1.01) * N * (i / (n_opts - 1))^2``
  for i = 0..n_opts-1 (``np.linspace(0, 1, n_opts) ** 2``); the solve for ``t_i`` fires at the
  first training iteration ``n`` with ``n * batch >= t_i``, at most one solve per iteration (the
  list is popped once per iteration). For E = 400, n_opts = 100: epochs 0, 0.04, 0.16, 0.37,
  0.65, 1.02, ..., 401.01 (SeLa's loop runs E + 1 epochs, MN:161).

SeLa-v2 (P §D) instead solves once per epoch; these helpers serve SeLa's own schedule and the
epoch-0 labels when no ``init_memory`` pass is run.
"""

from __future__ import annotations

import math

import torch


def balanced_initial_labels(num_samples: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``(arange(N) % K)[randperm(N, generator)]`` (int64): a random balanced labelling (MN:149-156)."""
    if num_samples < 0 or num_classes <= 0:
        raise ValueError(f"need N >= 0 and K > 0, got {num_samples} and {num_classes}")
    order = torch.randperm(num_samples, generator=generator, device=generator.device).cpu()
    return (torch.arange(num_samples, dtype=torch.int64) % num_classes)[order]


def sela_solve_epochs(epochs: int, num_solves: int) -> list[float]:
    """The solve times in epochs, ``(E + 1.01) * (i / (n_opts - 1))^2`` for i = 0..n_opts-1, increasing."""
    if num_solves < 2 or epochs < 0:
        raise ValueError(f"need at least 2 solves and E >= 0, got {num_solves} and {epochs}")
    return [(epochs + 1.01) * (i / (num_solves - 1)) ** 2 for i in range(num_solves)]


def sela_solve_steps(epochs: int, num_solves: int, dataset_size: int, batch_size: int) -> list[int]:
    """The training iterations (counted from 0 over the whole run) at which SeLa solves (MN:84-90).

    Solve i fires at the first iteration ``n`` with ``n * batch_size >= t_i`` and after the
    previous solve's iteration (one solve per iteration). Iterations past the run's end are kept:
    the caller stops at its own last iteration.
    """
    if dataset_size <= 0 or batch_size <= 0:
        raise ValueError(f"need N > 0 and a batch > 0, got {dataset_size} and {batch_size}")
    steps: list[int] = []
    for epoch in sela_solve_epochs(epochs, num_solves):
        due = math.ceil(epoch * dataset_size / batch_size)
        steps.append(max(due, steps[-1] + 1) if steps else due)
    return steps
