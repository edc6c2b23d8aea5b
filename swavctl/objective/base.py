"""The interface every training objective implements, and what a step gives it and gets back.

An objective is a method's part of a training step: where the step's targets (codes) come from,
the loss on them, the memory that helps make them (SwAV's queue; the per-rank bank of the previous
epoch's embeddings of DeepCluster-v2 and SeLa-v2), that memory's state in the checkpoint, and the
hooks around the steps. The training loop (:mod:`swavctl.train.loop`) calls only this interface,
in this order::

    initial_pass(embed, batches)               # once, before a fresh run's first epoch, when
                                               # needs_initial_pass() (fills a memory bank)
    start_epoch(epoch, model, first_batch)     # before the first step the loop runs in an epoch
    for each step:
        before_forward(model)
        output = objective(StepInputs(...))     # codes and loss
        ... backward ...
        after_backward(model, step)             # before the gradients are checked and applied
        end_epoch(epoch, model)                 # after an epoch's last step, before its checkpoint

An objective is not an ``nn.Module`` on purpose: it is never wrapped in DDP (whose buffer
broadcast would overwrite every rank's memory with rank 0's), never exported with the weights,
and its state is per rank. The loop gathers :meth:`Objective.rank_state` from every rank into the
checkpoint entry named :attr:`Objective.checkpoint_key` (a list indexed by rank), and on resume
hands every rank that whole list (:meth:`Objective.load_rank_states`): a rank takes its own entry
(SwAV's queue, a bank's shard), and a state all ranks hold alike (a method's dataset-wide
assignments) is put in rank 0's entry alone, so it is saved once.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from swavctl.data.dataset import Batch
from swavctl.model.swav import Scores, SwAV


@dataclass(frozen=True)
class StepInputs:
    """What one step's forward pass gives the objective.

    Rows are crop-major, as the model returns them: crop ``v`` of sample ``b`` is row ``v*B + b``.
    """

    embeddings: torch.Tensor  # (V*B, D): the projection head's unit-norm outputs
    scores: Scores  # (V*B, K): embeddings @ prototypes^T; a list of them with several prototype sets
    prototypes: torch.Tensor | list[torch.Tensor]  # (K, D): the weights that made ``scores`` (one per set)
    batch_size: int  # B, this rank's samples
    indices: Sequence[int] = ()  # the dataset index of each of the B samples (for per-sample memories)
    step: int = 0  # the optimizer step (0-based) this forward is for


@dataclass
class ObjectiveOutput:
    """What the objective gives back for one step."""

    loss: torch.Tensor  # scalar: this rank's mean over its batch (DDP averages the ranks)
    codes: list[torch.Tensor]  # per assignment crop, (B, K) targets whose rows sum to 1 (one-hot if hard)
    record: dict[str, Any] = field(default_factory=dict)  # the method's own fields of the metrics line


class Objective(abc.ABC):
    """A self-labelling objective: codes, loss, memory, their per-rank state, and the epoch hooks.

    The hooks other than :meth:`__call__` do nothing unless a method needs them.
    """

    #: The checkpoint entry that holds every rank's :meth:`rank_state` (a list indexed by rank).
    checkpoint_key: ClassVar[str]

    def to(self, device: torch.device) -> Objective:
        """Move the memory to ``device``; returns self."""
        return self

    def needs_initial_pass(self) -> bool:
        """Whether :meth:`initial_pass` should run before the first epoch (a fresh run's empty
        memory bank; False once a checkpoint's state was loaded)."""
        return False

    def initial_pass(  # noqa: B027 - an optional hook, a no-op by default
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[tuple[list[torch.Tensor] | None, Batch]],
    ) -> None:
        """Fill the memory from epoch 0's batches ``(crops or None, batch)`` with no gradient.

        ``embed(crop)`` is the model's embeddings of one crop tensor (the loop runs it under
        ``torch.no_grad`` and its autocast, the model in train mode); the batches are made outside
        autocast, as for a training step (the crops' float32 ops must not run in bf16)."""

    def start_epoch(self, epoch: int, model: SwAV, *, first_batch: int = 0) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Before the first step the loop runs in ``epoch``; ``first_batch`` > 0 when a resume
        starts the epoch in its middle (a method that clusters its memory here keeps the epoch's
        saved assignments then)."""

    def before_forward(self, model: SwAV) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Before the step's forward pass (SwAV re-normalises its prototypes here)."""

    @abc.abstractmethod
    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        """The step's codes and loss; updates the memory (the only hook that sees the batch)."""

    def after_backward(self, model: SwAV, step: int) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """After backward of optimizer step ``step`` (0-based), before the gradients are checked
        and applied (the prototypes' freeze drops their gradients here)."""

    def end_epoch(self, epoch: int, model: SwAV) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """After the last step of ``epoch``, before the checkpoint that ends it."""

    @abc.abstractmethod
    def rank_state(self) -> dict[str, Any] | None:
        """This rank's state for the checkpoint (tensors on the CPU), or None when there is none.

        None must be the same on every rank (the loop then saves ``None`` without gathering).
        """

    @abc.abstractmethod
    def load_rank_states(self, states: Sequence[dict[str, Any] | None], rank: int) -> None:
        """Take the saved state back on ``rank`` (a resume); ``states`` are every saved rank's.

        A saved run may have had another world size (a method whose memory is sharded by rank
        refuses or re-shards here; SwAV's settings check refuses it before, see
        :func:`swavctl.train.run_dir.incompatible_changes`).
        """


def freeze_prototype_grads(model: SwAV) -> None:
    """Drop the prototypes' gradients (the official freeze for the first iterations): used in
    forward, not updated, and DDP needs no ``find_unused_parameters``."""
    for param in model.prototypes.parameters():
        param.grad = None
