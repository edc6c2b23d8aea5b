"""Cross-entropy against hard cluster labels on every crop: DeepCluster-v2's (and SeLa-v2's) loss.

Official semantics (``facebookresearch/swav@06b1b7c:main_deepclusterv2.py``, DC:270-276; P eq. 8-9
of arXiv 2006.09882): for each head h,

    L_h = mean over the non-ignored rows j of  -log softmax(scores_h[j] / tau)[y_h[j]]

where the scores' rows are crop-major (row ``c * B + b`` is crop c of sample b, M:308-323) and
the targets are the batch's labels repeated once per crop, ``y_h = labels_h.repeat(n_crops)``,
so every crop of an image is trained on that image's one label. A label of -100
(``IGNORE_INDEX``: an image in no rank's bank) drops the row. The loss is the mean of ``L_h`` over
the heads. DDP then averages the per-rank means (not done here).

One deviation: a head whose rows are all ignored contributes 0 (with a gradient of zeros), where
``CrossEntropyLoss`` would give NaN (0 / 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def hard_label_loss(
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor] | torch.Tensor,
    *,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Mean over heads of the cross-entropy of ``scores[h] / temperature`` against ``labels[h]``.

    ``scores[h]``: (n_crops * B) x K_h, crop-major. ``labels[h]`` (or row h of an H x B tensor):
    the B samples' labels (int64, -100 to ignore), repeated for each crop. The number of crops is
    ``rows / B``. Computed in float32 whatever the scores' dtype; no host synchronisation (the
    mean is ``sum of row losses / max(1, number of kept rows)``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(scores) == 0 or len(scores) != len(labels):
        raise ValueError(f"need one label vector per head, got {len(labels)} for {len(scores)} heads")
    per_head = []
    for head_scores, head_labels in zip(scores, labels, strict=True):
        rows, batch = head_scores.shape[0], head_labels.shape[0]
        if head_labels.dim() != 1 or batch == 0 or rows % batch:
            raise ValueError(f"{rows} score rows are not a whole number of crops of a batch of {batch}")
        targets = head_labels.to(device=head_scores.device, dtype=torch.int64).repeat(rows // batch)
        row_losses = F.cross_entropy(
            head_scores.float() / temperature, targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        kept = (targets != IGNORE_INDEX).sum().clamp(min=1)
        per_head.append(row_losses.sum() / kept)
    return torch.stack(per_head).mean()
