"""Online Sinkhorn-Knopp codes for SwAV (Caron et al. 2020, arXiv 2006.09882, Sec. 3.1).

The codes solve the entropy-regularised equal-partition transport problem

    max_Q  Tr(Q^T C^T Z) + epsilon * H(Q)   s.t.  Q 1_B = 1_K / K,  Q^T 1_K = 1_B / B

over the scores ``C^T Z`` of a batch (the idea comes from SeLa, arXiv 1911.05371). The solution is
``Q = diag(u) exp(scores / epsilon) diag(v)``, found by alternately normalising the prototype rows
and the sample columns of ``Q`` (K x B). With N processes, B is the global batch and the total and
row sums are summed over ranks; column sums are per sample and stay local.
"""

from __future__ import annotations

import torch

from swavctl import dist


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Return soft codes for ``scores`` (B x K, this rank's rows); each row of the result sums to 1.

    Procedure (official semantics, computed on ``Q = exp(scores / epsilon)^T``, K x B_global):
    divide Q by its total; repeat ``iterations`` times: divide each prototype row by its row sum
    and by K, then each sample column by its column sum and by B; finally multiply by B.

    Numerics: the computation runs in float32 (float64 for float64 input) whatever the input dtype,
    and the global maximum score is subtracted before exponentiating, so it never overflows even
    for fp16 input or small epsilon. The shift cancels in the first normalisation, so the result
    equals the unshifted official formula wherever that one is finite.

    When a process group with more than one process is initialized, the maximum, the total and the
    row sums are all-reduced, so the codes equal a single-process solve on the concatenated batch.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores of shape B x K, got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    work_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    logits = scores.to(work_dtype) / epsilon  # B x K

    shift = logits.max() if logits.numel() else logits.new_zeros(())
    if dist.is_distributed():
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX)
    q = torch.exp(logits - shift).t()  # K x B (local columns)

    num_prototypes = q.shape[0]
    batch = torch.tensor(float(q.shape[1]), dtype=work_dtype, device=q.device)
    dist.all_reduce_sum(batch)  # B is the global batch

    total = q.sum()
    dist.all_reduce_sum(total)
    q /= total
    for _ in range(iterations):
        row_sums = q.sum(dim=1, keepdim=True)
        dist.all_reduce_sum(row_sums)
        q /= row_sums
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()
