"""Online Sinkhorn-Knopp codes for SwAV (Caron et al. 2020, arXiv 2006.09882, Sec. 3.1).

The codes solve the entropy-regularised equal-partition transport problem

    max_Q  Tr(Q^T C^T Z) + epsilon * H(Q)   s.t.  Q 1_B = 1_K / K,  Q^T 1_K = 1_B / B

over the scores ``C^T Z`` of a batch (the idea comes from SeLa, arXiv 1911.05371). The solution is
``Q = diag(u) exp(scores / epsilon) diag(v)``, found by alternately normalising the prototype rows
and the sample columns of ``Q`` (K x B). With N processes, B is the global batch and the total and
row sums are summed over ranks; column sums are per sample and stay local.
"""

from __future__ import annotations

import math

import torch

from swavctl.distributed import dist


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Return soft codes for ``scores`` (B x K, this rank's rows); each row of the result sums to 1.

    Procedure (official semantics, computed on ``Q = exp(scores / epsilon)^T``, K x B_global):
    divide Q by its total; repeat ``iterations`` times: divide each prototype row by its row sum
    and by K, then each sample column by its column sum and by B; finally multiply by B.

    Numerics: the computation runs in float32 (float64 for float64 input) whatever the input dtype.
    Each prototype row is shifted by its (global) maximum before exponentiating; that shift
    cancels in the first row normalisation, so the result is the official one, but nothing can
    overflow (fp16 input, small epsilon) and no prototype row can underflow to all zeros. If a
    sample's column still underflows to all zeros (a sample far from every prototype at a tiny
    epsilon), the whole solve switches, on every rank, to an exact log-domain form. The result
    equals the official formula wherever that one is finite.

    Speed: the work is done on Q^T, in the scores' own B x K layout, with one allocation (the
    scaled scores) and every later pass in place; on the CPU this is faster than the official
    formula despite the extra max pass (docs/benchmarks.md).

    When a process group with more than one process is initialized, the row maxima, the total
    and the row sums are all-reduced, so the codes equal a single-process solve on the
    concatenated batch.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores of shape B x K, got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    work_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    # Q^T (B x K), the layout of the scores: every pass below reads contiguous memory, and all but
    # the first work in place (a fresh B x K buffer costs as much as the exponential).
    q = torch.mul(scores.to(work_dtype), 1.0 / epsilon)
    num_prototypes = q.shape[1]
    # A fill on the device: torch.tensor(value, device=cuda) would copy from the host and wait.
    batch = torch.full((), float(q.shape[0]), dtype=work_dtype, device=q.device)
    dist.all_reduce_sum(batch)  # B is the global batch

    peak = q.amax(dim=0, keepdim=True) if q.shape[0] else torch.zeros_like(q[:1])  # per prototype
    if dist.is_distributed():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    q.sub_(peak).exp_()
    # Dividing by the total (the official first step) cancels in the first prototype normalisation
    # and the last "/ B, * B" pair cancels too; both are folded away. Each normalisation is one
    # in-place multiply by a reciprocal vector.
    for iteration in range(iterations):
        prototype_sums = q.sum(dim=0, keepdim=True)
        dist.all_reduce_sum(prototype_sums)
        q *= 1.0 / (prototype_sums * num_prototypes)
        sample_sums = q.sum(dim=1, keepdim=True)
        if iteration == 0:
            # A sample whose row is all zeros stays zero under prototype scaling: detect it once, on
            # every rank, so all ranks take the same path (the two paths use different collectives).
            underflow = (sample_sums == 0).any().to(work_dtype).reshape(1)
            dist.all_reduce_sum(underflow)
            if bool(underflow.item()):
                logits = (scores.to(work_dtype) / epsilon).t()
                return _sinkhorn_log_domain(logits, num_prototypes, batch, iterations).t()
        if iteration == iterations - 1:
            q *= 1.0 / sample_sums  # = (/ sample sum / B) * B: rows of the result sum to 1
        else:
            q *= 1.0 / (sample_sums * batch)
    return q


def _sinkhorn_log_domain(
    logits: torch.Tensor, num_prototypes: int, batch: torch.Tensor, iterations: int
) -> torch.Tensor:
    """The same iterations on log Q (K x B_local): every normalisation subtracts a log-sum-exp."""
    log_k, log_b = math.log(num_prototypes), torch.log(batch)
    log_q = logits - _global_logsumexp(logits.reshape(1, -1)).reshape(())  # divide by the total
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp(log_q) - log_k  # prototype rows: sum over all ranks
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b  # sample columns: local
    return torch.exp(log_q + log_b)


def _global_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x), dim=1)) over the columns of every rank (K x 1); local without a group."""
    if not dist.is_distributed():
        return torch.logsumexp(x, dim=1, keepdim=True)
    peak = x.max(dim=1, keepdim=True).values
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    total = torch.exp(x - peak).sum(dim=1, keepdim=True)
    dist.all_reduce_sum(total)
    return peak + torch.log(total)
