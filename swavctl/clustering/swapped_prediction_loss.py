"""The swapped-prediction loss of SwAV (Caron et al. 2020, arXiv 2006.09882, Eq. 1-3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def swapped_prediction_loss(
    codes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    *,
    temperature: float = 0.1,
    assignment_crops: Sequence[int] = (0, 1),
) -> torch.Tensor:
    """Average cross-entropy between each assignment crop's code and every other crop's prediction.

    For each assignment crop ``a`` with code ``q_a`` (B x K, rows sum to 1) the loss is

        L_a = 1/(V-1) * sum_{v != a} -mean_b sum_k q_a[b,k] * log_softmax(scores_v[b] / tau)[k]

    and the result is the mean of ``L_a`` over the assignment crops (the official averaging).
    ``codes[i]`` belongs to ``assignment_crops[i]``; ``scores`` holds all V crops. At collapse
    (uniform predictions) the loss equals ln K.
    """
    if len(codes) != len(assignment_crops):
        raise ValueError("one code per assignment crop is required")
    num_crops = len(scores)
    if num_crops < 2:
        raise ValueError("the swapped prediction needs at least two crops")
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros((), dtype=torch.float32)
    for code, crop in zip(codes, assignment_crops, strict=True):
        subloss = total.new_zeros(())
        for v in range(num_crops):
            if v == crop:
                continue
            subloss = subloss - torch.mean(torch.sum(code.float() * log_probs[v], dim=1))
        total = total + subloss / (num_crops - 1)
    return total / len(assignment_crops)
