"""Offline Sinkhorn-Knopp over a whole (sharded) memory bank: SeLa's label solve, for SeLa-v2.

SeLa (Asano et al., ICLR 2020; ``yukimasano/self-label@3891e37:sinkhornknopp.py``, SK:112-139)
assigns one label per image under an equal partition: with ``P`` the K x N matrix of
``softmax^lambda`` scores it finds ``Q = diag(r) P diag(c)`` by iterating, from ``c = 1/N``,

    r = (1/K) / (P c)          (a K-vector: sums over all N images)
    c = (1/N) / (r^T P)        (an N-vector: one entry per image)

and labels image i with ``argmax_k r_k P_ki c_i`` (SK:132-136). Each head is solved separately.

Here ``P_ki = exp(s_ik / epsilon)`` with ``s = bank . prototypes^T``: since
``softmax(s/tau)^lambda = exp(lambda s / tau)`` up to a per-image factor that ``c`` absorbs,
``epsilon = tau / lambda`` (SeLa's lambda = 25 at tau = 0.1 is epsilon = 0.004; methods-reference
§3 "derived"). Passing ``softmax_temperature=tau`` uses SeLa's ``P`` literally,
``lambda * log_softmax(s / tau)`` with ``lambda = tau / epsilon``; the fixed point and, in
practice, the labels are the same, but the iterates then match SeLa's step for step.

Numerics: float64 throughout, and nothing overflows or underflows at epsilon = 0.004 or smaller.
Two paths compute the same iterates (to fp64 rounding):

* direct (when the log-scores fit the cache): SeLa's own matrix-vector form on the kernel
  ``E_ik = exp(log P_ik - m_i)``, ``m_i = max_k log P_ik``; the row factor ``exp(m_i)`` (and one
  global factor) is carried by ``c``, as the softmax's normaliser is (the kernel's entries lie in
  (0, 1]). Every sum is checked to stay within [1e-290, 1e290], i.e. at full fp64 precision; if
  one leaves it on any rank, every rank restarts the solve on the log path. Two matrix-vector
  products per iteration, no exponentials: about 20x faster on the CPU.
* log: ``log r``, ``log c`` and log-sum-exps, for any epsilon; two exponentials per entry per
  iteration.

Sharding: each rank holds its own rows (images). ``N`` is the global count (all-reduced), the
sums over images inside ``P c`` are all-reduced (on the log path a max then a sum, a stable
log-sum-exp), and so is the stopping error, so the equipartition holds over the dataset, not per
rank; ``c`` and the labels stay local. Every rank takes the same path (decided and, on a
fallback, abandoned together). Without a process group every reduction is a no-op.

Memory: the bank (given), the prototypes (K x D), ``r`` (K) and ``c`` (N_local), plus one
``block_rows x K`` float64 block of scores at a time, recomputed from the bank and the prototypes
on every pass. Only when ``N_local * K <= cache_elements`` on every rank is the kernel (or the
log-scores) computed once and kept: ``8 * N_local * K`` bytes per rank (128 MiB by default).

Stopping rule: SeLa's (SK:121-129): the error ``sum_i |c_i / c_new,i - 1|`` (over all ranks) is
computed on iterations 0, ``check_every``, 2 ``check_every``, ... and the loop stops once it is
at most ``tol`` (SeLa: 0.1 every 10th iteration), or after ``max_iterations`` iterations (SeLa
has no cap; ``tol=0`` gives a fixed count of ``max_iterations``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from swavctl.distributed import dist

DEFAULT_BLOCK_ROWS = 4096
DEFAULT_CACHE_ELEMENTS = 1 << 24  # 128 MiB of float64 per rank and head
_SAFE = 1e-290  # the direct path keeps every sum in [_SAFE, 1 / _SAFE]: normal fp64, full precision


class OfflineSinkhornResult(NamedTuple):
    """The solve's outcome on this rank.

    ``labels`` (N_local, int64): ``argmax_k r_k P_ki c_i``, ties to the lowest k.
    ``log_r`` (K, float64, the same on every rank) and ``log_c`` (N_local, float64) give the
    transport plan ``Q_ki = exp(log_r[k] + log_p[i, k] + log_c[i])`` with ``log_p`` as documented
    in :func:`offline_sinkhorn`. ``iterations``: how many (r, c) updates ran; ``error``: the last
    checked stopping error (``converged`` is ``error <= tol``); ``log_domain``: which path solved.
    """

    labels: torch.Tensor
    log_r: torch.Tensor
    log_c: torch.Tensor
    iterations: int
    error: float
    converged: bool
    log_domain: bool


@dataclass(frozen=True)
class _Problem:
    total: float  # N, over every rank
    prototypes: int  # K
    tol: float
    check_every: int
    max_iterations: int


class _LogScores:
    """This rank's ``log P`` (N_local x K, float64), handed out one row block at a time."""

    def __init__(
        self,
        bank: torch.Tensor,
        prototypes: torch.Tensor,
        epsilon: float,
        softmax_temperature: float | None,
        block_rows: int,
        cache: bool,
    ) -> None:
        self.bank = bank
        self.prototypes = prototypes.to(device=bank.device, dtype=torch.float64)
        self.epsilon = epsilon
        self.temperature = softmax_temperature
        self.block_rows = block_rows
        self.cached = [block for _, block in self._compute()] if cache else None

    def _compute(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for start in range(0, self.bank.shape[0], self.block_rows):
            rows = slice(start, min(start + self.block_rows, self.bank.shape[0]))
            scores = self.bank[rows].to(torch.float64) @ self.prototypes.t()
            if self.temperature is None:
                yield rows, scores / self.epsilon
            else:  # SeLa's P = softmax(s / tau) ** lambda, lambda = tau / epsilon
                lam = self.temperature / self.epsilon
                yield rows, lam * torch.log_softmax(scores / self.temperature, dim=1)

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        if self.cached is None:
            yield from self._compute()
            return
        for start, block in zip(range(0, self.bank.shape[0], self.block_rows), self.cached, strict=True):
            yield slice(start, start + block.shape[0]), block


def _global_logsumexp(partials: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``log (P c)_k = logsumexp_i (log P_ki + log c_i)`` over every image of every rank (K).

    ``partials`` holds one K-vector per row block of this rank (its own log-sum-exp); they are
    combined here, then across ranks as ``peak + log sum_ranks exp(local - peak)``.
    """
    local = torch.logsumexp(torch.stack(partials), dim=0) if partials else torch.full_like(like, -math.inf)
    if not dist.is_distributed():
        return local
    peak = dist.all_reduce_max(local.clone())
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = dist.all_reduce_sum(torch.exp(local - peak))
    return peak + torch.log(total)


def _stop_error(c: torch.Tensor, c_new: torch.Tensor, flag: torch.Tensor, log: bool) -> tuple[float, bool]:
    """SeLa's error ``sum_i |c_i / c_new,i - 1|`` over every rank, and whether any rank raised ``flag``."""
    gap = torch.expm1(c - c_new).abs().sum() if log else (c / c_new - 1).abs().sum()
    both = dist.all_reduce_sum(torch.stack([gap, flag.to(gap.dtype)]))
    return float(both[0].item()), bool(both[1].item() > 0)


def _solve_log(scores: _LogScores, problem: _Problem, like: torch.Tensor) -> OfflineSinkhornResult:
    """The iteration in logs (module docstring), on blocks of ``log P``; any epsilon."""
    log_k, log_n = math.log(problem.prototypes), math.log(problem.total)
    log_c = torch.full((scores.bank.shape[0],), -log_n, dtype=torch.float64, device=like.device)
    log_r = like.clone()
    log_pc = _global_logsumexp([torch.logsumexp(b + log_c[r, None], dim=0) for r, b in scores.blocks()], like)
    error, iteration, no_flag = math.inf, 0, torch.zeros((), dtype=torch.bool, device=like.device)
    while error > problem.tol and iteration < problem.max_iterations:
        log_r = -log_k - log_pc
        log_c_new = torch.empty_like(log_c)
        partials = []  # the next iteration's log (P c_new), from the same pass over the bank
        for rows, block in scores.blocks():
            log_c_new[rows] = -log_n - torch.logsumexp(block + log_r, dim=1)
            partials.append(torch.logsumexp(block + log_c_new[rows, None], dim=0))
        log_pc = _global_logsumexp(partials, like)
        if iteration % problem.check_every == 0:
            error, _ = _stop_error(log_c, log_c_new, no_flag, log=True)
        log_c = log_c_new
        iteration += 1
    labels = torch.empty(log_c.shape[0], dtype=torch.int64, device=like.device)
    for rows, block in scores.blocks():
        labels[rows] = torch.argmax(block + log_r, dim=1)
    return OfflineSinkhornResult(labels, log_r, log_c, iteration, error, error <= problem.tol, True)


def _outside(values: torch.Tensor) -> torch.Tensor:
    return ~((values >= _SAFE) & (values <= 1 / _SAFE)).all()  # NaN is outside too


def _any_rank(flag: torch.Tensor) -> bool:
    return bool(dist.all_reduce_sum(flag.to(torch.float64).reshape(1)).item() > 0)


def _solve_direct(scores: _LogScores, problem: _Problem, like: torch.Tensor) -> OfflineSinkhornResult | None:
    """SeLa's iteration on ``E = exp(log P - m)`` (module docstring); None when a sum left [_SAFE, 1/_SAFE].

    With ``M = max_i m_i`` over every rank, ``c~ = c exp(m - M)`` and ``r~ = r exp(M)`` follow
    ``r~ = (1/K) / (E c~)``, ``c~_new = (1/N) / (r~^T E)`` from ``c~_0 = exp(m - M) / N``; the
    ratios ``c / c_new`` are unchanged, and ``argmax_k r_k P_ki c_i = argmax_k r~_k E_ik``.
    """
    rows_of, kernel, maxima = [], [], []
    for rows, block in scores.blocks():
        peak = block.amax(dim=1, keepdim=True)
        rows_of.append(rows)
        kernel.append(torch.exp(block - peak))
        maxima.append(peak.squeeze(1))
    row_max = torch.cat(maxima) if maxima else like.new_zeros(0)
    top = dist.all_reduce_max(row_max.max().reshape(1) if maxima else like.new_full((1,), -math.inf))
    c = torch.exp(row_max - top) / problem.total
    flag = (c == 0).any()
    pc = like.clone()
    for rows, e in zip(rows_of, kernel, strict=True):
        pc += e.t() @ c[rows]
    dist.all_reduce_sum(pc)
    error, iteration, r = math.inf, 0, like
    while error > problem.tol and iteration < problem.max_iterations:
        flag = flag | _outside(pc)
        r = (1.0 / problem.prototypes) / pc
        c_new = torch.empty_like(c)
        pc = like.clone()
        for rows, e in zip(rows_of, kernel, strict=True):
            denominators = e @ r
            flag = flag | _outside(denominators)
            c_new[rows] = (1.0 / problem.total) / denominators
            pc += e.t() @ c_new[rows]
        dist.all_reduce_sum(pc)
        if iteration % problem.check_every == 0:
            error, failed = _stop_error(c, c_new, flag, log=False)
            if failed:
                return None
        c = c_new
        iteration += 1
    if _any_rank(flag):
        return None
    labels = torch.cat([torch.argmax(e * r, dim=1) for e in kernel]) if kernel else like.new_zeros(0).long()
    log_r, log_c = torch.log(r) - top, torch.log(c) + top - row_max
    return OfflineSinkhornResult(labels, log_r, log_c, iteration, error, error <= problem.tol, False)


def _check_inputs(
    bank: torch.Tensor, prototypes: torch.Tensor, epsilon: float, counts: dict[str, int]
) -> None:
    if bank.dim() != 2 or prototypes.dim() != 2 or bank.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"need a bank N x D and prototypes K x D, got {tuple(bank.shape)} and {tuple(prototypes.shape)}"
        )
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    for name, value in counts.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


@torch.no_grad()
def offline_sinkhorn(
    bank: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    epsilon: float,
    tol: float = 0.1,
    check_every: int = 10,
    max_iterations: int = 1000,
    softmax_temperature: float | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    cache_elements: int = DEFAULT_CACHE_ELEMENTS,
) -> OfflineSinkhornResult:
    """Hard equipartitioned labels for this rank's ``bank`` rows (N_local x D) against ``prototypes`` (K x D).

    ``log P_ik = s_ik / epsilon`` with ``s = bank . prototypes^T`` in float64, or, with
    ``softmax_temperature`` tau, ``(tau / epsilon) * log_softmax(s / tau)_ik`` (SeLa's ``P``).
    From ``c_i = 1/N`` each iteration computes (SK:121-130; here in logs)

        log r_k     = -log K - logsumexp_i (log P_ik + log c_i)     (i over every rank)
        log c_new_i = -log N - logsumexp_k (log r_k + log P_ik)

    checks ``sum_i |c_i / c_new,i - 1| <= tol`` on every ``check_every``-th iteration (from the
    first), and sets ``c = c_new``. Labels: ``argmax_k (log r_k + log P_ik)``, which is
    ``argmax_k r_k P_ki c_i`` since ``c_i > 0`` is common to the row; ties go to the lowest k
    (as ``np.nanargmax`` in SK:134). One pass over the bank per iteration (it also yields the
    next iteration's ``P c``), plus one before the loop and one for the labels. The direct path
    (module docstring) runs when every rank's ``N_local * K <= cache_elements``.
    """
    limits = {"check_every": check_every, "max_iterations": max_iterations, "block_rows": block_rows}
    _check_inputs(bank, prototypes, epsilon, limits)
    num_prototypes, local = prototypes.shape[0], bank.shape[0]
    too_big = float(local * num_prototypes > cache_elements)
    sizes = dist.all_reduce_sum(
        torch.tensor([float(local), too_big], dtype=torch.float64, device=bank.device)
    )
    if sizes[0].item() == 0:
        raise ValueError("offline Sinkhorn needs at least one bank row")
    problem = _Problem(float(sizes[0].item()), num_prototypes, tol, check_every, max_iterations)
    like = torch.zeros(num_prototypes, dtype=torch.float64, device=bank.device)
    if sizes[1].item() == 0:  # every rank caches: the direct path
        direct = _solve_direct(
            _LogScores(bank, prototypes, epsilon, softmax_temperature, block_rows, cache=False), problem, like
        )
        if direct is not None:
            return direct
    scores = _LogScores(
        bank, prototypes, epsilon, softmax_temperature, block_rows, cache=sizes[1].item() == 0
    )
    return _solve_log(scores, problem, like)
