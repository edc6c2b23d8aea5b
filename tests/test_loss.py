"""The swapped-prediction loss against a float64 reference and its value at collapse."""

from __future__ import annotations

import math

import pytest
import torch

from swavctl.clustering.swapped_prediction_loss import swapped_prediction_loss


def reference_loss(codes, scores, temperature, assignment):  # type: ignore[no-untyped-def]
    """Explicit loops in float64: mean over assignment crops of mean over other crops of CE."""
    total = 0.0
    views = len(scores)
    for code, a in zip(codes, assignment, strict=True):
        sub = 0.0
        for v in range(views):
            if v == a:
                continue
            logits = scores[v].double() / temperature
            log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            sub += float(-(code.double() * log_p).sum(dim=1).mean())
        total += sub / (views - 1)
    return total / len(assignment)


def test_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(12, 7, generator=g) for _ in range(5)]
    codes = [torch.softmax(torch.randn(12, 7, generator=g), dim=1) for _ in range(2)]
    got = swapped_prediction_loss(codes, scores, temperature=0.1, assignment_crops=(0, 1))
    assert float(got) == pytest.approx(reference_loss(codes, scores, 0.1, (0, 1)), rel=1e-5)


def test_non_default_assignment_crops() -> None:
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(4, 3, generator=g) for _ in range(3)]
    codes = [torch.softmax(torch.randn(4, 3, generator=g), dim=1)]
    got = swapped_prediction_loss(codes, scores, temperature=0.3, assignment_crops=(2,))
    assert float(got) == pytest.approx(reference_loss(codes, scores, 0.3, (2,)), rel=1e-5)


@pytest.mark.parametrize("prototypes", [10, 3000])
def test_loss_at_collapse_is_ln_k(prototypes: int) -> None:
    # Collapse: all predictions uniform (equal scores); any code distribution gives ln K.
    scores = [torch.full((8, prototypes), 0.37) for _ in range(4)]
    g = torch.Generator().manual_seed(2)
    codes = [torch.softmax(torch.randn(8, prototypes, generator=g), dim=1) for _ in range(2)]
    loss = swapped_prediction_loss(codes, scores, temperature=0.1)
    assert float(loss) == pytest.approx(math.log(prototypes), rel=1e-6)


def test_gradient_flows_to_scores_only() -> None:
    scores = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    codes = [torch.softmax(torch.randn(4, 5), dim=1) for _ in range(2)]
    swapped_prediction_loss(codes, scores).backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in scores)


def test_default_temperature_is_the_papers_0_1() -> None:
    """Without ``temperature`` the predictions are ``softmax(scores / 0.1)`` (the paper's tau)."""
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(6, 5, generator=g) for _ in range(3)]
    codes = [torch.softmax(torch.randn(6, 5, generator=g), dim=1) for _ in range(2)]
    got = swapped_prediction_loss(codes, scores)
    assert float(got) == pytest.approx(reference_loss(codes, scores, 0.1, (0, 1)), rel=1e-5)
    assert float(got) != pytest.approx(reference_loss(codes, scores, 0.2, (0, 1)), rel=1e-3)
