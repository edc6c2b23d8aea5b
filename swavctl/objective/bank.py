"""What DeepCluster-v2 and SeLa-v2 share: a per-rank memory bank, dataset-wide hard labels per
prototype set (head), and the cross-entropy against them on every crop (arXiv 2006.09882, Sec. 5.1
and App. D; ``facebookresearch/swav@06b1b7c:main_deepclusterv2.py``, DC below).

The pipeline, per rank (see :class:`BankObjective`):

* before epoch 0 (a fresh run only), the ``init_memory`` pass (DC:317-342): one no-grad pass over
  epoch 0's batches, each assignment crop forwarded on its own, the model in train mode (so batch
  norm's running statistics move, as in the official code), filling the bank. Here the pass sees
  exactly epoch 0's crops (a batch's crops are seeded by (seed, epoch, step, rank)); the official
  loader draws new ones;
* at the start of every epoch, the method's :meth:`BankObjective.cluster` turns the bank (written
  during the previous epoch, "swapping across epochs") into one label per banked image and head:
  head h clusters the bank's crop slot ``h mod len(swav.assignment_crops)`` (DC:346, 410-411).
  The labels of all ranks are gathered into one (H, N_dataset) tensor, -100 for an image in no
  bank (DC:391-408);
* each step: the loss is the mean over heads of the cross-entropy of ``scores_h / tau`` against
  the batch's labels, on every crop, ignoring -100 (:func:`~swavctl.clustering.hard_label_loss`,
  DC:270-276); then the assignment crops' detached embeddings overwrite the step's bank rows.

State (in the checkpoint, so a resume is exact mid-epoch and at an epoch boundary): every rank's
bank (its shard), and the labels, the same on every rank, in rank 0's entry alone. The bank is per
rank and sized by the steps per epoch and the batch: a resume on another world size is refused
(the settings check of :func:`swavctl.train.run_dir.incompatible_changes` first, then here).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from swavctl.clustering import IGNORE_INDEX, MemoryBank, hard_label_loss
from swavctl.config import Settings
from swavctl.data.dataset import Batch
from swavctl.distributed import dist
from swavctl.errors import UserError
from swavctl.model.swav import SwAV, as_score_sets, prototype_set_sizes
from swavctl.objective.base import Objective, ObjectiveOutput, StepInputs


class BankObjective(Objective):
    """The memory bank, the labels and the hard-label loss; a method adds :meth:`cluster`."""

    #: What the method is called in messages.
    title = "a memory-bank method"

    def __init__(self, settings: Settings, *, steps_per_epoch: int, dataset_size: int) -> None:
        self.temperature = settings.swav.temperature
        self.assignment_crops = tuple(settings.swav.assignment_crops)
        self.sizes = prototype_set_sizes(settings.model.prototypes)
        self.steps_per_epoch, self.dataset_size = steps_per_epoch, dataset_size
        self.seed = settings.train.seed
        self.world = dist.world_size()
        self.bank = MemoryBank(
            len(self.assignment_crops),
            steps_per_epoch,
            settings.train.batch_size,
            settings.model.embedding_dim,
        )
        self.labels = torch.full((len(self.sizes), dataset_size), IGNORE_INDEX, dtype=torch.int64)

    def to(self, device: torch.device) -> BankObjective:
        self.bank.to(device)
        self.labels = self.labels.to(device)
        return self

    # ----- the epoch

    def needs_initial_pass(self) -> bool:
        return not bool(self.bank.filled().any())

    @torch.no_grad()
    def initial_pass(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[tuple[list[torch.Tensor] | None, Batch]],
    ) -> None:
        """DC's ``init_memory``: each assignment crop of each batch forwarded alone, into the bank."""
        for step, (crops, batch) in enumerate(batches):
            if crops is None:  # every file of this rank's batch unreadable: its rows stay empty
                continue
            embeddings = [embed(crops[c]) for c in self.assignment_crops]
            self.bank.write(step, self._indices(batch.indices), embeddings)

    def start_epoch(self, epoch: int, model: SwAV, *, first_batch: int = 0) -> None:
        if first_batch == 0:  # mid-epoch (a resume), the epoch's labels came with the checkpoint
            local = self.cluster(epoch, model)
            self.labels = self.bank.gather_labels(local, self.dataset_size)

    def bank_rows(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled rows of the bank crop head ``head`` clusters (N_local x D) and their mask (L)."""
        filled = self.bank.filled()
        return self.bank.embeddings[head % len(self.assignment_crops)][filled], filled

    @abc.abstractmethod
    def cluster(self, epoch: int, model: SwAV) -> torch.Tensor:
        """This rank's label per bank row and head, (H, L) int64 (anything on unwritten rows)."""

    # ----- the step

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch = inputs.batch_size
        indices = self._indices(inputs.indices).to(self.labels.device)
        targets = self.labels[:, indices]  # (H, B)
        loss = hard_label_loss(as_score_sets(inputs.scores), targets, temperature=self.temperature)
        embeddings = inputs.embeddings
        self.bank.write(
            inputs.step % self.steps_per_epoch,
            indices,
            [embeddings[c * batch : (c + 1) * batch] for c in self.assignment_crops],
        )
        # The codes are one-hot labels (the monitor's entropy and prototypes-used read head 0's).
        codes = F.one_hot(targets[0].clamp(min=0), self.sizes[0]).to(torch.float32)
        return ObjectiveOutput(loss=loss, codes=[codes])

    @staticmethod
    def _indices(indices: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(indices), dtype=torch.int64)

    # ----- the state

    def rank_state(self) -> dict[str, Any] | None:
        state: dict[str, Any] = {"bank": {k: v.cpu() for k, v in self.bank.state_dict().items()}}
        if dist.rank() == 0:  # the same on every rank: saved once
            state["labels"] = self.labels.cpu()
        return state

    def load_rank_states(self, states: Sequence[dict[str, Any] | None], rank: int) -> None:
        if len(states) != self.world:
            raise UserError(
                f"cannot resume: {self.title}'s memory bank was saved by {len(states)} processes and is per "
                f"process; resume with {len(states)} (--gpus or --procs), or start over with --fresh"
            )
        own, first = states[rank], states[0]
        if own is None or first is None or "labels" not in first:
            raise UserError(f"cannot resume: the checkpoint holds no {self.title} memory bank; use --fresh")
        bank = own["bank"]
        if bank["indices"].shape != self.bank.indices.shape:
            raise UserError(
                f"cannot resume: the saved memory bank holds {bank['indices'].shape[0]} rows per process, "
                f"this run needs {self.bank.length} (steps per epoch x batch changed); use --fresh"
            )
        device = self.labels.device
        self.bank.load_state_dict({k: v.to(device) for k, v in bank.items()})
        self.labels = first["labels"].to(device)


def local_labels(assignments: Sequence[torch.Tensor], filled: torch.Tensor) -> torch.Tensor:
    """(H, L) labels from each head's labels of the filled rows (IGNORE_INDEX on the others)."""
    out = torch.full(
        (len(assignments), filled.shape[0]), IGNORE_INDEX, dtype=torch.int64, device=filled.device
    )
    for head, labels in enumerate(assignments):
        out[head, filled] = labels.to(filled.device)
    return out
