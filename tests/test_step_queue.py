"""One SwAV step's codes and loss with the embedding queue, against a hand-built reference.

With a full queue, the codes of assignment crop ``a`` (queue slot ``s``) are the last B rows of the
Sinkhorn solve on ``cat([queue[s] @ C^T, scores of crop a])``; the queue is scored before it takes
in the batch, and slot ``s`` then receives crop ``a``'s embeddings, newest first (the official order).
Also the model's side of a step: the prototype freeze, unit prototypes, and the multi-resolution
forward (one backbone call per run of equal-size crops).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from swavctl.clustering.sinkhorn_knopp import sinkhorn
from swavctl.clustering.swapped_prediction_loss import swapped_prediction_loss
from swavctl.model.swav import SwAV, equal_size_runs
from swavctl.objective.base import freeze_prototype_grads
from swavctl.objective.queue import EmbeddingQueue
from swavctl.objective.swav import StepOutputs, swav_loss_from_outputs

BATCH, PROTOTYPES, DIM, CROPS, QUEUE_BATCHES = 3, 5, 4, 4, 2
TEMPERATURE, EPSILON, ITERATIONS = 0.1, 0.05, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add waiting


def _unit(rows: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, DIM, generator=generator), dim=1)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit prototypes (K x D), unit embeddings of all crops (V*B x D) and their scores z C^T."""
    g = torch.Generator().manual_seed(seed)
    prototypes = _unit(PROTOTYPES, g)
    embeddings = _unit(CROPS * BATCH, g)
    return prototypes, embeddings, embeddings @ prototypes.t()


def _full_queue(slots: int, seed: int) -> EmbeddingQueue:
    """A full queue of ``QUEUE_BATCHES`` batches of distinct unit embeddings in every slot."""
    g = torch.Generator().manual_seed(seed)
    queue = EmbeddingQueue(slots, QUEUE_BATCHES * BATCH, DIM)
    for _ in range(QUEUE_BATCHES):
        for slot in range(slots):
            queue.push(slot, _unit(BATCH, g))
    assert queue.is_full
    return queue


def _crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    return x[crop * BATCH : (crop + 1) * BATCH]


def _step(
    embeddings: torch.Tensor,
    scores: torch.Tensor,
    prototypes: torch.Tensor,
    assignment: tuple[int, ...],
    queue: EmbeddingQueue | None,
) -> StepOutputs:
    return swav_loss_from_outputs(
        embeddings,
        scores,
        batch_size=BATCH,
        num_crops=CROPS,
        assignment_crops=assignment,
        prototypes=prototypes,
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        sinkhorn_iterations=ITERATIONS,
        queue=queue,
    )


@pytest.mark.parametrize("assignment", [(0, 1), (2, 0), (1, 0)])
def test_full_queue_codes_loss_and_fifo_push_match_a_hand_built_step(assignment: tuple[int, ...]) -> None:
    """Codes: the batch's (last B) rows of Sinkhorn on [queued scores; crop scores], the queue scored
    before the push; loss: the swapped prediction on those codes; afterwards slot s holds crop
    ``assignment[s]``'s embeddings first, then its old rows shifted by B (the oldest B dropped)."""
    prototypes, embeddings, scores = _batch(seed=0)
    queue = _full_queue(len(assignment), seed=1)
    before = queue.buffer.clone()

    expected_codes = []
    for slot, crop in enumerate(assignment):
        joint = torch.cat([before[slot] @ prototypes.t(), _crop(scores, crop)])
        expected_codes.append(sinkhorn(joint, epsilon=EPSILON, iterations=ITERATIONS)[-BATCH:])
    expected_loss = swapped_prediction_loss(
        expected_codes, list(scores.split(BATCH)), temperature=TEMPERATURE, assignment_crops=assignment
    )

    out = _step(embeddings, scores, prototypes, assignment, queue)
    assert out.queue_in_use
    assert len(out.codes) == len(assignment)
    for got, expected in zip(out.codes, expected_codes, strict=True):
        assert got.shape == (BATCH, PROTOTYPES)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # The queue's rows change the codes: a batch-only solve is not what the step used.
    batch_only = sinkhorn(_crop(scores, assignment[0]), epsilon=EPSILON, iterations=ITERATIONS)
    assert not torch.allclose(out.codes[0], batch_only, atol=1e-3)
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-6, rtol=1e-5)

    assert queue.is_full and queue.filled == queue.length
    for slot, crop in enumerate(assignment):
        expected_row = torch.cat([_crop(embeddings, crop), before[slot][:-BATCH]])
        torch.testing.assert_close(queue.buffer[slot], expected_row, atol=0, rtol=0)


def test_queue_not_yet_full_is_filled_but_not_used() -> None:
    """Before the queue is full the codes come from the batch alone, and the queue still takes the
    batch in (slot s gets crop ``assignment[s]``), counting the rows it holds."""
    prototypes, embeddings, scores = _batch(seed=2)
    assignment = (1, 0)
    queue = EmbeddingQueue(2, QUEUE_BATCHES * BATCH, DIM)
    out = _step(embeddings, scores, prototypes, assignment, queue)
    assert not out.queue_in_use
    for code, crop in zip(out.codes, assignment, strict=True):
        expected = sinkhorn(_crop(scores, crop), epsilon=EPSILON, iterations=ITERATIONS)
        torch.testing.assert_close(code, expected, atol=0, rtol=0)
    assert queue.filled == BATCH and not queue.is_full
    for slot, crop in enumerate(assignment):
        torch.testing.assert_close(queue.buffer[slot, :BATCH], _crop(embeddings, crop), atol=0, rtol=0)
        assert bool((queue.buffer[slot, BATCH:] == 0).all())
    # The second batch fills it; the third step is the first to use it.
    out = _step(embeddings, scores, prototypes, assignment, queue)
    assert not out.queue_in_use and queue.is_full
    assert _step(embeddings, scores, prototypes, assignment, queue).queue_in_use


def test_without_a_queue_the_codes_are_the_batch_solve() -> None:
    """``queue=None``: plain per-crop Sinkhorn codes and the swapped-prediction loss on them."""
    prototypes, embeddings, scores = _batch(seed=3)
    out = _step(embeddings, scores, prototypes, (0, 1), None)
    assert not out.queue_in_use
    codes = [sinkhorn(_crop(scores, c), epsilon=EPSILON, iterations=ITERATIONS) for c in (0, 1)]
    expected = swapped_prediction_loss(codes, list(scores.split(BATCH)), temperature=TEMPERATURE)
    torch.testing.assert_close(out.loss, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# The model's side of a step


def _tiny_model(seed: int = 0, hidden: int = 8) -> SwAV:
    torch.manual_seed(seed)
    return SwAV("convnet-tiny", hidden, DIM, PROTOTYPES).train()


def _crops(sizes: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, s, s, generator=g) for s in sizes]


def test_freeze_prototype_grads_drops_only_the_prototype_gradients() -> None:
    """After backward, the freeze sets the prototypes' gradient to None (not zero) and leaves every
    other gradient exactly as it was."""
    model = _tiny_model()
    embeddings, scores = model(_crops([8, 8, 8]))
    (scores.pow(2).sum() + embeddings.sum()).backward()
    assert model.prototypes.weight.grad is not None
    others = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("prototypes.")}
    assert others and all(g is not None for g in others.values())
    freeze_prototype_grads(model)
    assert model.prototypes.weight.grad is None
    for name, param in model.named_parameters():
        if not name.startswith("prototypes."):
            assert param.grad is not None and torch.equal(param.grad, others[name]), name


def test_normalize_prototypes_gives_unit_rows_in_the_same_directions() -> None:
    """Each prototype row is divided by its own L2 norm (rows, not columns), in place, no gradient."""
    model = _tiny_model()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(PROTOTYPES))  # at build
    weight = model.prototypes.weight
    with torch.no_grad():
        weight.copy_(torch.randn(PROTOTYPES, DIM) * torch.arange(1.0, PROTOTYPES + 1).unsqueeze(1))
    before = weight.detach().clone()
    model.normalize_prototypes()
    assert model.prototypes.weight is weight  # in place: the optimizer keeps the same parameter
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(PROTOTYPES))
    torch.testing.assert_close(weight.detach(), before / before.norm(dim=1, keepdim=True))
    assert weight.requires_grad and weight.grad is None


@pytest.mark.parametrize(
    ("sizes", "runs"),
    [
        ([16, 16, 8, 8, 8], [(0, 2), (2, 5)]),
        ([16, 8, 16], [(0, 1), (1, 2), (2, 3)]),
        ([8], [(0, 1)]),
        ([8, 8, 8], [(0, 3)]),
    ],
)
def test_backbone_runs_once_per_run_of_equal_size_crops(
    sizes: list[int], runs: list[tuple[int, int]]
) -> None:
    """The multi-resolution forward: one backbone call per run of consecutive equal-size crops, each
    on the concatenation of that run's crops; in train mode (batch-norm statistics per call) the
    outputs equal a manual per-run pass, in crop order."""
    assert equal_size_runs(sizes) == runs
    model = _tiny_model()
    reference = copy.deepcopy(model)
    crops = _crops(sizes)
    calls: list[tuple[int, int]] = []
    hook = model.backbone.register_forward_pre_hook(
        lambda _module, args: calls.append((args[0].shape[0], args[0].shape[-1]))
    )
    try:
        embeddings, scores = model(crops)
    finally:
        hook.remove()
    assert calls == [(2 * (end - start), sizes[start]) for start, end in runs]

    features = torch.cat([reference.backbone(torch.cat(crops[start:end])) for start, end in runs])
    z = F.normalize(reference.head(features), dim=1)
    torch.testing.assert_close(embeddings, z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores, z @ reference.prototypes.weight.t(), atol=1e-6, rtol=1e-5)
    assert embeddings.shape == (2 * len(sizes), DIM) and scores.shape == (2 * len(sizes), PROTOTYPES)
