"""Spherical k-means over a per-rank memory bank: DeepCluster-v2's ``cluster_memory``.

Official semantics (``facebookresearch/swav@06b1b7c:main_deepclusterv2.py``, DC:345-413; the
objective is P eq. 11 of arXiv 2006.09882, with no re-assignment or balancing tricks, P §D.2):

* initialisation (DC:352-358): rank 0 draws K rows of its own bank, ``randperm(N_0)[:K]``, and
  broadcasts them; it needs ``N_0 >= K``;
* ``iterations`` (10) rounds (DC:360-387) of
  - E-step: ``a_i = argmax_k <x_i, c_k>`` (cosine, both sides are unit rows);
  - M-step: per-rank ``S_k = sum_{a_i = k} x_i`` and ``n_k = #{i: a_i = k}``, all-reduced (SUM);
    ``c_k <- S_k / n_k`` only where ``n_k > 0`` (an empty cluster keeps its old centroid);
    then every ``c_k <- c_k / ||c_k||``;
* then one final E-step: 11 E-steps and 10 M-steps in all.

Numerics: everything runs in float32 (the official code's dtype) whatever the bank's dtype: the
dot products, the argmax and the sums. The bank is read in blocks of ``block_rows`` rows, so the
extra memory is one ``block_rows x K`` float32 score block plus the ``K x D`` sums, whatever N.
Ties in the argmax go to the lowest cluster index (``torch.argmax`` returns the first maximum),
as ``Tensor.max(dim=1)`` does in the official code.

Without a process group (or with one process) the reductions and the broadcast are no-ops; with
one, sharded k-means equals single-process k-means on the concatenated bank for the same initial
centroids (the sums differ only by fp32 summation order). On CUDA, ``index_add_`` accumulates with
atomics, so the fp32 sums (and rarely an assignment) can differ run to run; on the CPU the result
is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from swavctl.distributed import dist

DEFAULT_BLOCK_ROWS = 4096


class KMeansResult(NamedTuple):
    """Unit centroids (K x D, float32, equal on every rank) and this rank's assignments (N_local, int64)."""

    centroids: torch.Tensor
    assignments: torch.Tensor


def _check_bank(bank: torch.Tensor) -> None:
    if bank.dim() != 2:
        raise ValueError(f"the bank must be N x D, got shape {tuple(bank.shape)}")


@torch.no_grad()
def initial_centroids(bank: torch.Tensor, num_centroids: int, generator: torch.Generator) -> torch.Tensor:
    """K rows of rank 0's bank, ``bank[randperm(N_0, generator=generator)[:K]]``, on every rank (DC:352-358).

    Returns a K x D float32 tensor on ``bank``'s device. Only rank 0 draws from ``generator``
    (the other ranks' generators are not advanced); the draw is broadcast. Rank 0's bank size is
    broadcast first, so every rank raises the same ``ValueError`` when ``N_0 < K`` (the official
    code asserts "please reduce the number of centroids" on rank 0 only).
    """
    _check_bank(bank)
    if num_centroids <= 0:
        raise ValueError(f"the number of centroids must be positive, got {num_centroids}")
    size = torch.tensor([bank.shape[0]], dtype=torch.int64, device=bank.device)
    if dist.is_distributed():
        torch.distributed.broadcast(size, src=0)
    if int(size.item()) < num_centroids:
        raise ValueError(
            f"k-means needs at least {num_centroids} bank rows on rank 0 to draw its initial centroids, "
            f"but that bank holds {int(size.item())}: use fewer prototypes or a larger bank"
        )
    if dist.rank() == 0:
        order = torch.randperm(bank.shape[0], generator=generator, device=generator.device)
        centroids = bank[order[:num_centroids].to(bank.device)].to(torch.float32)
    else:
        centroids = torch.empty(num_centroids, bank.shape[1], dtype=torch.float32, device=bank.device)
    if dist.is_distributed():
        torch.distributed.broadcast(centroids, src=0)
    return centroids


@torch.no_grad()
def assign_to_nearest(
    bank: torch.Tensor, centroids: torch.Tensor, *, block_rows: int = DEFAULT_BLOCK_ROWS
) -> torch.Tensor:
    """The E-step: ``argmax_k <bank_i, centroids_k>`` for each row (N_local, int64), in float32 blocks.

    Ties go to the lowest index. Local: no communication.
    """
    _check_bank(bank)
    weights = centroids.to(device=bank.device, dtype=torch.float32)
    out = torch.empty(bank.shape[0], dtype=torch.int64, device=bank.device)
    for start in range(0, bank.shape[0], block_rows):
        rows = bank[start : start + block_rows].to(torch.float32)
        out[start : start + rows.shape[0]] = torch.argmax(rows @ weights.t(), dim=1)
    return out


@torch.no_grad()
def spherical_kmeans(
    bank: torch.Tensor,
    centroids: torch.Tensor,
    *,
    iterations: int = 10,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> KMeansResult:
    """Run DeepCluster-v2's k-means (DC:360-387) on this rank's ``bank`` (N_local x D, unit rows).

    ``centroids`` (K x D) are the initial centroids, identical on every rank (see
    :func:`initial_centroids`); they are copied, not modified. Each of the ``iterations`` rounds
    is one E-step fused with the M-step's per-rank sums and counts (one pass over the bank), then
    the all-reduce (SUM) of sums and counts, ``c_k = S_k / n_k`` where ``n_k > 0`` and the L2
    normalisation of every row. A final E-step gives the returned assignments, so they satisfy
    ``assignments[i] == argmax(bank_i . centroids^T)`` for the returned centroids.
    """
    _check_bank(bank)
    if centroids.dim() != 2 or centroids.shape[1] != bank.shape[1]:
        raise ValueError(
            f"centroids of shape {tuple(centroids.shape)} do not match a bank of width {bank.shape[1]}"
        )
    if iterations < 0 or block_rows <= 0:
        raise ValueError(f"need iterations >= 0 and block_rows > 0, got {iterations} and {block_rows}")
    current = centroids.to(device=bank.device, dtype=torch.float32).clone()
    num_centroids, width = current.shape
    for _ in range(iterations):
        sums = torch.zeros(num_centroids, width, dtype=torch.float32, device=bank.device)
        counts = torch.zeros(num_centroids, dtype=torch.int64, device=bank.device)
        for start in range(0, bank.shape[0], block_rows):
            rows = bank[start : start + block_rows].to(torch.float32)
            nearest = torch.argmax(rows @ current.t(), dim=1)
            sums.index_add_(0, nearest, rows)
            counts += torch.bincount(nearest, minlength=num_centroids)
        dist.all_reduce_sum(counts)
        dist.all_reduce_sum(sums)
        filled = counts > 0
        current[filled] = sums[filled] / counts[filled].unsqueeze(1).to(torch.float32)
        current = F.normalize(current, dim=1, p=2)
    return KMeansResult(current, assign_to_nearest(bank, current, block_rows=block_rows))
