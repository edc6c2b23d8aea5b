"""One SwAV optimisation step's mathematics: codes for the assignment crops, then the loss.

Pure with respect to devices and wrappers: it takes the model's outputs and returns tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from swavctl.loss import swapped_prediction_loss
from swavctl.model.swav import SwAV
from swavctl.queue import EmbeddingQueue
from swavctl.sinkhorn_knopp import sinkhorn


@dataclass
class StepOutputs:
    loss: torch.Tensor
    codes: list[torch.Tensor]
    queue_in_use: bool


def swav_loss_from_outputs(
    embeddings: torch.Tensor,
    scores: torch.Tensor,
    *,
    batch_size: int,
    num_crops: int,
    assignment_crops: Sequence[int],
    prototypes: torch.Tensor,
    temperature: float,
    epsilon: float,
    sinkhorn_iterations: int,
    queue: EmbeddingQueue | None,
) -> StepOutputs:
    """Codes by Sinkhorn for each assignment crop (with the queue's rows when it is full), then the loss.

    ``embeddings`` and ``scores`` hold all crops in order (crop v is rows v*B..(v+1)*B). With a
    queue, the queued embeddings are scored with the current prototypes and prepended to the
    batch's scores; only the batch's rows of the codes are kept. The queue then takes in this
    batch's embeddings (the official order).
    """
    codes: list[torch.Tensor] = []
    in_use = queue is not None and queue.is_full
    with torch.no_grad():
        for slot, crop in enumerate(assignment_crops):
            crop_scores = scores[crop * batch_size : (crop + 1) * batch_size].detach().float()
            if queue is not None:
                if in_use:
                    crop_scores = torch.cat([queue.scores(slot, prototypes.detach().float()), crop_scores])
                queue.push(slot, embeddings[crop * batch_size : (crop + 1) * batch_size].detach().float())
            codes.append(sinkhorn(crop_scores, epsilon=epsilon, iterations=sinkhorn_iterations)[-batch_size:])
    per_crop = list(scores.split(batch_size))
    if len(per_crop) != num_crops:
        raise ValueError(f"expected {num_crops} crops of {batch_size} rows, got {scores.shape[0]} rows")
    loss = swapped_prediction_loss(
        codes, per_crop, temperature=temperature, assignment_crops=assignment_crops
    )
    return StepOutputs(loss=loss, codes=codes, queue_in_use=in_use)


def freeze_prototype_grads(model: SwAV) -> None:
    """Drop the prototypes' gradients (the official freeze for the first iterations): used in
    forward, not updated, and DDP needs no ``find_unused_parameters``."""
    for param in model.prototypes.parameters():
        param.grad = None


def grads_finite(model: nn.Module) -> torch.Tensor:
    """A bool tensor on the parameters' device: every gradient is finite (no host read)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=next(model.parameters()).device)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()
