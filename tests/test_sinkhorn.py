"""Sinkhorn-Knopp codes against a float64 reference of the official procedure, and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from swavctl.sinkhorn import sinkhorn


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The official procedure, literally, in float64 (no max subtraction)."""
    q = torch.exp(scores.double() / epsilon).t()  # K x B
    batch, prototypes = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


def unit_scores(batch: int, prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.t()


@pytest.mark.parametrize(("batch", "prototypes"), [(64, 10), (256, 3000), (7, 50)])
def test_equals_float64_reference(batch: int, prototypes: int) -> None:
    scores = unit_scores(batch, prototypes)
    expected = reference_sinkhorn(scores, 0.05, 3)
    got = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert got.shape == (batch, prototypes)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_float64_input_stays_float64_and_exact() -> None:
    scores = unit_scores(32, 20).double()
    got = sinkhorn(scores, epsilon=0.05, iterations=5)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_sinkhorn(scores, 0.05, 5), atol=1e-12, rtol=1e-10)


def test_rows_sum_to_one_and_prototype_marginals_converge() -> None:
    scores = unit_scores(128, 16)
    codes = sinkhorn(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(128), atol=1e-5, rtol=0)
    # Equal partition: each prototype receives B/K of the mass.
    torch.testing.assert_close(codes.sum(dim=0), torch.full((16,), 128 / 16), atol=1e-3, rtol=1e-3)


def test_rows_sum_to_one_after_three_iterations() -> None:
    codes = sinkhorn(unit_scores(100, 30), epsilon=0.05, iterations=3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(100), atol=1e-5, rtol=0)
    assert bool((codes >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_stay_finite(dtype: torch.dtype) -> None:
    # Scores near 1 overflow exp(s / 0.05) in fp16 (> 65504 above ~0.555) in the official formula.
    scores = (unit_scores(64, 40) * 0.5 + 0.5).to(dtype)
    if dtype == torch.float16:
        assert not torch.isfinite(torch.exp(scores / 0.05)).all()  # the naive formula does overflow
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(
        codes.double(), reference_sinkhorn(scores.double(), 0.05, 3), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("epsilon", [0.05, 0.02, 0.01, 0.005])
def test_small_epsilon_stays_finite(epsilon: float) -> None:
    scores = unit_scores(64, 40)
    codes = sinkhorn(scores, epsilon=epsilon, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-4, rtol=0)
    if math.isfinite(float(torch.exp(torch.tensor(1.0, dtype=torch.float64) / epsilon))):
        torch.testing.assert_close(
            codes.double(), reference_sinkhorn(scores, epsilon, 3), atol=1e-5, rtol=1e-4
        )


def test_far_sample_switches_to_the_log_domain() -> None:
    # A sample opposite to every prototype at epsilon 0.005: its whole column underflows float32
    # after the row shift (exp(-400)); the log-domain path must take over and stay exact.
    scores = unit_scores(64, 12)
    scores[5, :] = -1.0
    scores[:, 0] = scores[:, 0].clamp(min=0.5)
    codes = sinkhorn(scores, epsilon=0.005, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores, 0.005, 3), atol=1e-5, rtol=1e-4)


def test_far_prototype_does_not_underflow() -> None:
    # A prototype opposite to every sample: exp((s - max) / 0.01) underflows float32 in the
    # official formula, giving an all-zero row and 0/0. The log-domain solve keeps it exact.
    scores = unit_scores(64, 12)
    scores[:, 0] = -1.0
    codes = sinkhorn(scores, epsilon=0.01, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores, 0.01, 3), atol=1e-5, rtol=1e-4)


def test_shift_invariance_of_a_constant() -> None:
    scores = unit_scores(20, 8)
    torch.testing.assert_close(sinkhorn(scores), sinkhorn(scores + 3.0), atol=1e-6, rtol=1e-5)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(3, 4), epsilon=0)
