"""Sinkhorn-Knopp codes against a float64 reference of the official procedure, and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from swavctl.clustering.sinkhorn_knopp import sinkhorn


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


def reference_sinkhorn_log(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The official procedure in float64 log space: exact where ``exp(scores / epsilon)`` is not."""
    log_q = (scores.double() / epsilon).t()  # K x B
    prototypes, batch = log_q.shape
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(prototypes)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(batch)
    return torch.exp(log_q + math.log(batch)).t()


def _count_log_domain_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``_sinkhorn_log_domain`` so that each call is counted and still computed."""
    import swavctl.clustering.sinkhorn_knopp as module

    calls: list[int] = []
    original = module._sinkhorn_log_domain

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_sinkhorn_log_domain", counting)
    return calls


def far_sample_scores() -> torch.Tensor:
    """Unit scores where sample 5 is opposite to every prototype and every prototype peaks >= 0.35."""
    scores = unit_scores(64, 12)
    scores[:, 0] = scores[:, 0].clamp(min=0.5)
    scores[5, :] = -1.0  # after the clamp: sample 5 is below every column maximum by more than 1.3
    return scores


def test_far_sample_switches_to_the_log_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample opposite to every prototype at epsilon 0.005 underflows its whole float32 row after
    the row shift (exp(-270) and less): the log-domain path takes over and matches both float64
    references (the literal one is still finite in float64)."""
    scores = far_sample_scores()
    shifted = (scores - scores.amax(dim=0, keepdim=True)) / 0.005
    assert bool((torch.exp(shifted[5]) == 0).all())  # the float32 row of sample 5 really underflows
    calls = _count_log_domain_calls(monkeypatch)
    codes = sinkhorn(scores, epsilon=0.005, iterations=3)
    assert calls == [1]
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores, 0.005, 3), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(codes.double(), reference_sinkhorn_log(scores, 0.005, 3), atol=1e-5, rtol=1e-4)


def test_log_domain_float64_is_exact_where_the_literal_formula_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At epsilon 0.001 even the float64 row of the far sample underflows (exp(-1000) and less), so
    the literal formula gives 0/0 there; the float64 log-domain solve equals the exact reference."""
    scores = far_sample_scores().double()
    assert not torch.isfinite(reference_sinkhorn(scores, 0.001, 4)[5]).any()
    calls = _count_log_domain_calls(monkeypatch)
    codes = sinkhorn(scores, epsilon=0.001, iterations=4)
    assert calls == [1]
    assert codes.dtype == torch.float64
    torch.testing.assert_close(codes, reference_sinkhorn_log(scores, 0.001, 4), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64, dtype=torch.float64), atol=1e-12, rtol=0)


def test_far_prototype_does_not_underflow() -> None:
    # A prototype opposite to every sample: exp((s - max) / 0.01) underflows float32 in the
    # official formula, giving an all-zero row and 0/0. The per-prototype maximum shift keeps it exact.
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
