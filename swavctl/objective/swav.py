"""The SwAV objective: online codes by Sinkhorn-Knopp, the swapped prediction, and the queue.

Caron et al. 2020, arXiv 2006.09882. For each assignment crop ``a`` the codes ``q_a`` solve the
equal-partition transport problem on that crop's prototype scores (Sec. 3.1, Eq. 3; three
Sinkhorn-Knopp iterations at ``epsilon``), over the batch and, once it is full, the rows of the
per-rank queue of past embeddings (App. A.1). The loss predicts each ``q_a`` from every other
crop (Eq. 1-2, :func:`swavctl.clustering.swapped_prediction_loss.swapped_prediction_loss`). The
prototypes are re-normalised before every step and their gradients dropped for the first
``swav.freeze_prototypes_steps``.

:class:`SwAVObjective` owns all of SwAV's settings and its queue; the loop knows none of them.
The math stays in pure functions (:mod:`swavctl.clustering.sinkhorn_knopp`,
:mod:`swavctl.clustering.swapped_prediction_loss`, and :func:`swav_loss_from_outputs` here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swavctl.clustering.sinkhorn_knopp import sinkhorn
from swavctl.clustering.swapped_prediction_loss import swapped_prediction_loss
from swavctl.config import Settings
from swavctl.model.swav import SwAV
from swavctl.objective.base import Objective, ObjectiveOutput, StepInputs, freeze_prototype_grads
from swavctl.objective.queue import EmbeddingQueue


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

    The function under :class:`SwAVObjective`, with every setting spelled out (the tests and the
    step benchmark's reference call it directly). ``embeddings`` and ``scores`` hold all crops in
    order (crop v is rows v*B..(v+1)*B). With a queue, the queued embeddings are scored with the
    current prototypes and prepended to the batch's scores; only the batch's rows of the codes
    are kept. The queue then takes in this batch's embeddings (the official order).
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


class SwAVObjective(Objective):
    """SwAV's part of a step: temperature, epsilon, Sinkhorn iterations, assignment crops, the
    queue (with the epoch it starts in) and the prototypes' normalisation and early freeze.

    ``queue`` is this rank's (None without one); it is used from ``queue_start_epoch`` on, and
    is neither filled nor read before.
    """

    #: Every rank's queue state (``None`` without a queue): the layout checkpoints have always had.
    checkpoint_key = "queues"

    def __init__(
        self,
        *,
        num_crops: int,
        assignment_crops: Sequence[int],
        temperature: float,
        epsilon: float,
        sinkhorn_iterations: int,
        freeze_prototypes_steps: int,
        queue: EmbeddingQueue | None,
        queue_start_epoch: int,
    ) -> None:
        self.num_crops = num_crops
        self.assignment_crops = tuple(assignment_crops)
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.queue = queue
        self.queue_start_epoch = queue_start_epoch
        self.queue_active = False  # set by start_epoch

    @classmethod
    def from_settings(cls, settings: Settings, *, queue_per_rank: int) -> SwAVObjective:
        """The objective of ``settings.swav``, with a queue of ``queue_per_rank`` rows (0: none)."""
        swav = settings.swav
        queue = (
            EmbeddingQueue(len(swav.assignment_crops), queue_per_rank, settings.model.embedding_dim)
            if queue_per_rank
            else None
        )
        return cls(
            num_crops=sum(settings.data.crop_counts),
            assignment_crops=swav.assignment_crops,
            temperature=swav.temperature,
            epsilon=swav.epsilon,
            sinkhorn_iterations=swav.sinkhorn_iterations,
            freeze_prototypes_steps=swav.freeze_prototypes_steps,
            queue=queue,
            queue_start_epoch=swav.queue_start_epoch,
        )

    def to(self, device: torch.device) -> SwAVObjective:
        if self.queue is not None:
            self.queue.to(device)
        return self

    def start_epoch(self, epoch: int, model: SwAV, *, first_batch: int = 0) -> None:
        self.queue_active = self.queue is not None and epoch >= self.queue_start_epoch

    def before_forward(self, model: SwAV) -> None:
        model.normalize_prototypes()

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        scores, prototypes = inputs.scores, inputs.prototypes
        assert isinstance(scores, torch.Tensor) and isinstance(prototypes, torch.Tensor)  # one set
        out = swav_loss_from_outputs(
            inputs.embeddings.float(),
            scores.float(),
            batch_size=inputs.batch_size,
            num_crops=self.num_crops,
            assignment_crops=self.assignment_crops,
            prototypes=prototypes,
            temperature=self.temperature,
            epsilon=self.epsilon,
            sinkhorn_iterations=self.sinkhorn_iterations,
            queue=self.queue if self.queue_active else None,
        )
        return ObjectiveOutput(loss=out.loss, codes=out.codes, record={"queue_in_use": out.queue_in_use})

    def after_backward(self, model: SwAV, step: int) -> None:
        if step < self.freeze_prototypes_steps:
            freeze_prototype_grads(model)

    def rank_state(self) -> dict[str, Any] | None:
        return self.queue.state_dict() if self.queue is not None else None

    def load_rank_states(self, states: Sequence[dict[str, Any] | None], rank: int) -> None:
        if self.queue is not None and rank < len(states):
            state = states[rank]
            if state is not None:
                self.queue.load_state_dict(state)
