"""The SwAV objective as the loop calls it, and the fault hooks read at the process edge.

:class:`SwAVObjective` must be exactly the SwAV step of ``swav_loss_from_outputs`` with the settings
it was built from (its own tests, against hand-built references, are in test_step_queue.py): the
same codes and loss bit for bit, the queue used only from ``swav.queue_start_epoch`` on, its state
round-tripping through the checkpoint hooks, and the prototype freeze applied only for the first
``swav.freeze_prototypes_steps`` steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swavctl import config
from swavctl.errors import UserError
from swavctl.model.swav import SwAV
from swavctl.objective import StepInputs, SwAVObjective, build_objective
from swavctl.objective.queue import EmbeddingQueue
from swavctl.objective.swav import swav_loss_from_outputs
from swavctl.train.faults import HOOK_NAN, HOOK_RAISE, HOOK_SLEEP, FaultHooks

BATCH, DIM, PROTOTYPES = 4, 8, 6

pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(*overrides: str) -> config.Settings:
    return config.resolve(
        preset="smoke",
        overrides=[
            f"model.embedding_dim={DIM}",
            f"model.prototypes={PROTOTYPES}",
            f"train.batch_size={BATCH}",
            "data.crop_counts=[2, 1]",
            "data.crop_sizes=[16, 8]",
            "data.min_scales=[0.5, 0.1]",
            "data.max_scales=[1.0, 0.5]",
            *overrides,
        ],
    )


def _inputs(seed: int, crops: int = 3) -> StepInputs:
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(PROTOTYPES, DIM, generator=g), dim=1)
    embeddings = F.normalize(torch.randn(crops * BATCH, DIM, generator=g), dim=1)
    return StepInputs(embeddings, embeddings @ prototypes.t(), prototypes, BATCH, list(range(BATCH)))


def _reference(settings: config.Settings, inputs: StepInputs, queue: EmbeddingQueue | None):  # type: ignore[no-untyped-def]
    swav = settings.swav
    return swav_loss_from_outputs(
        inputs.embeddings,
        inputs.scores,
        batch_size=BATCH,
        num_crops=3,
        assignment_crops=swav.assignment_crops,
        prototypes=inputs.prototypes,
        temperature=swav.temperature,
        epsilon=swav.epsilon,
        sinkhorn_iterations=swav.sinkhorn_iterations,
        queue=queue,
    )


def test_the_objective_is_the_swav_step_of_its_settings_and_uses_the_queue_from_its_start_epoch() -> None:
    settings = _settings("swav.queue_length=8", "swav.queue_start_epoch=1", "swav.temperature=0.2")
    objective = build_objective(settings, queue_per_rank=8, device=torch.device("cpu"))
    assert isinstance(objective, SwAVObjective) and objective.queue is not None
    reference_queue = EmbeddingQueue(2, 8, DIM)

    objective.start_epoch(0, model=None, first_batch=0)  # type: ignore[arg-type]
    out = objective(_inputs(0))
    expected = _reference(settings, _inputs(0), None)  # before the start epoch: no queue at all
    assert out.record == {"queue_in_use": False}
    assert torch.equal(out.loss, expected.loss)
    assert objective.queue.filled == 0 and bool((objective.queue.buffer == 0).all())

    objective.start_epoch(1, model=None, first_batch=0)  # type: ignore[arg-type]
    for seed in (1, 2, 3):  # two batches fill the queue of 8 rows; the third reads it
        out = objective(_inputs(seed))
        expected = _reference(settings, _inputs(seed), reference_queue)
        assert torch.equal(out.loss, expected.loss)
        assert all(torch.equal(a, b) for a, b in zip(out.codes, expected.codes, strict=True))
        assert out.record == {"queue_in_use": expected.queue_in_use}
        assert torch.equal(objective.queue.buffer, reference_queue.buffer)
    assert out.record == {"queue_in_use": True}


def test_the_objective_state_round_trips_and_is_none_without_a_queue() -> None:
    settings = _settings("swav.queue_length=8", "swav.queue_start_epoch=0")
    objective = SwAVObjective.from_settings(settings, queue_per_rank=8)
    objective.start_epoch(0, model=None)  # type: ignore[arg-type]
    objective(_inputs(4))
    state = objective.rank_state()
    assert state is not None and state["filled"] == BATCH

    restored = SwAVObjective.from_settings(settings, queue_per_rank=8)
    restored.load_rank_states([None, state], rank=1)  # its own rank's entry
    assert restored.queue is not None and restored.queue.filled == BATCH
    assert torch.equal(restored.queue.buffer, objective.queue.buffer)  # type: ignore[union-attr]
    assert SwAVObjective.checkpoint_key == "queues"  # the layout older checkpoints have

    without = SwAVObjective.from_settings(_settings("swav.queue_length=0"), queue_per_rank=0)
    assert without.rank_state() is None
    without.load_rank_states([state], rank=0)  # nothing to restore into: ignored
    assert without.queue is None


def test_prototypes_are_normalised_before_forward_and_frozen_only_for_the_first_steps() -> None:
    settings = _settings("swav.freeze_prototypes_steps=2")
    objective = SwAVObjective.from_settings(settings, queue_per_rank=0)
    torch.manual_seed(0)
    model = SwAV("convnet-tiny", 8, DIM, PROTOTYPES)
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    objective.before_forward(model)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(PROTOTYPES))
    for step, frozen in ((0, True), (1, True), (2, False), (3, False)):
        model.zero_grad(set_to_none=True)
        _, scores = model([torch.randn(2, 3, 8, 8)])
        scores.sum().backward()
        objective.after_backward(model, step)
        assert (model.prototypes.weight.grad is None) == frozen, step
        assert model.head[0].weight.grad is not None  # only the prototypes' gradients are dropped


def test_fault_hooks_come_from_the_environment_and_refuse_malformed_values() -> None:
    assert FaultHooks.from_env({}) == FaultHooks()
    hooks = FaultHooks.from_env({HOOK_NAN: "1:3", HOOK_RAISE: " 0:5 ", HOOK_SLEEP: "0.25"})
    assert hooks == FaultHooks(nan_at=(1, 3), raise_at=(0, 5), sleep_s=0.25)
    loss = torch.tensor(2.0)
    assert hooks.poison(loss, 1, 2) is loss and torch.isnan(hooks.poison(loss, 1, 3))
    hooks.raise_if_due(1, 5)  # another rank: nothing
    with pytest.raises(RuntimeError, match=r"injected failure on rank 0 at step 5 \(SWAVCTL_TEST_RAISE_AT\)"):
        hooks.raise_if_due(0, 5)
    with pytest.raises(UserError, match="SWAVCTL_TEST_NAN_AT must be RANK:STEP, got '3'"):
        FaultHooks.from_env({HOOK_NAN: "3"})
    with pytest.raises(UserError, match="SWAVCTL_TEST_STEP_SLEEP must be a number of seconds"):
        FaultHooks.from_env({HOOK_SLEEP: "soon"})
