"""Prototype assignments: the argmax answer and the balanced (equal-partition) answer.

Scores are cosines ``s_ik = z_i . c_k`` between the L2-normalised embedding of image ``i`` and
the unit-norm prototype ``c_k`` (arXiv 2006.09882, Sec. 3.1).

**argmax** is the usual inference answer: ``k*(i) = argmax_k s_ik``, with the model's own
prediction ``p_ik = softmax_k(s_ik / tau)`` (tau = ``swav.temperature``) as its confidence.

**balanced** is the SeLa view (Asano et al., arXiv 1911.05371) that SwAV solves per batch during
training, solved here once over the whole dataset of N images: the transport plan

    Q = diag(a) P diag(b),   P_ik = exp(s_ik / epsilon)

with sample marginals ``sum_k Q_ik = 1/N`` and prototype marginals ``sum_i Q_ik = 1/K``.
Sinkhorn-Knopp alternates the two normalisations. Holding Q (N x K) is out of the question for a
large dataset, but the per-sample factor never needs storing: for a given prototype factor b,

    a_i = 1 / (N sum_k P_ik b_k)               (each sample's column, normalised on the fly)
    Q_ik = softmax_k(s_ik / epsilon + log b_k) / N

so one pass over the data gives the prototype masses ``c_k = sum_i Q_ik`` and the update
``log b_k <- log b_k - log c_k - log K``. The first pass normalises the raw rows of P
(``log b_k = -logsumexp_i(s_ik / epsilon) - log K``). After T passes the codes
``softmax_k(s_ik / epsilon + log b_k)`` equal :func:`swavctl.sinkhorn` with ``iterations=T`` on
the whole dataset at once; memory is one chunk of scores plus K numbers. The balanced assignment
is ``argmax_k (s_ik / epsilon + log b_k)``; the per-sample factor ``a_i`` does not change it.
All of it runs in float64 and in the log domain, so nothing under- or overflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


def prototype_scores(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine scores ``z C^T`` (B x K) of embeddings (B x D) and prototypes (K x D, rows normalised here)."""
    weight = torch.nn.functional.normalize(prototypes.to(embeddings.dtype), dim=1, p=2)
    return embeddings @ weight.t()


def top_predictions(
    scores: torch.Tensor, *, temperature: float, k: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable prototypes under ``softmax(scores / temperature)`` and their probabilities.

    Returns (indices B x k, probabilities B x k), most probable first. Ties go to the lower index,
    as with ``torch.argmax``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    probs = torch.softmax(scores.double() / temperature, dim=1)
    k = min(k, probs.shape[1])
    # A stable sort on the negated probabilities keeps the lower index first among equals.
    order = torch.sort(-probs, dim=1, stable=True).indices[:, :k]
    return order, probs.gather(1, order)


@dataclass
class BalancedScaling:
    """The prototype factor of the whole-dataset Sinkhorn solution, and how far it got."""

    log_b: torch.Tensor  # K, float64
    epsilon: float
    passes: int  # passes over the data that updated log_b (= Sinkhorn iterations done)
    max_marginal_error: float | None  # max_k |K c_k - 1| measured before the last update (None after 1 pass)
    converged: bool  # stopped because the error fell below the tolerance
    data_passes: int = 0  # passes over the embeddings: passes, plus the measuring one when converged

    def logits(self, scores: torch.Tensor) -> torch.Tensor:
        """``s / epsilon + log b`` (B x K, float64): argmax is the balanced assignment, softmax its codes."""
        return scores.double() / self.epsilon + self.log_b.to(scores.device)


def balanced_codes(scores: torch.Tensor, scaling: BalancedScaling) -> torch.Tensor:
    """Soft balanced codes ``softmax_k(s_ik / epsilon + log b_k)`` (B x K, rows sum to 1)."""
    return torch.softmax(scaling.logits(scores), dim=1)


def _streaming_logsumexp(
    chunks: Iterable[torch.Tensor], transform: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """``logsumexp`` over all rows of ``transform(chunk)`` for every chunk (K), and the row count."""
    total: torch.Tensor | None = None
    rows = 0
    for chunk in chunks:
        if chunk.shape[0] == 0:
            continue
        part = torch.logsumexp(transform(chunk), dim=0).cpu()
        total = part if total is None else torch.logaddexp(total, part)
        rows += int(chunk.shape[0])
    if total is None:
        raise ValueError("balanced assignment needs at least one sample")
    return total, rows


@torch.no_grad()
def balance(
    chunks: Callable[[], Iterable[torch.Tensor]],
    *,
    epsilon: float,
    iterations: int,
    tolerance: float = 0.0,
    on_pass: Callable[[int, float | None], None] | None = None,
) -> BalancedScaling:
    """Streaming Sinkhorn-Knopp over the whole dataset; returns the prototype factor ``log b``.

    ``chunks()`` must return a fresh iterable over the score chunks (B_j x K) in any fixed order;
    it is called once per pass. Pass 1 normalises the rows of ``P = exp(s / epsilon)``; each
    further pass measures the prototype masses ``c_k`` under the current ``b`` and rescales them to
    ``1/K``. It stops after ``iterations`` passes, or earlier once ``max_k |K c_k - 1| <= tolerance``
    (``tolerance=0`` runs all of them, which reproduces :func:`swavctl.sinkhorn` exactly).
    ``on_pass(pass_number, error)`` is called after every pass.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    lse, _ = _streaming_logsumexp(chunks(), lambda s: s.double() / epsilon)
    log_k = math.log(lse.shape[0])
    log_b = -lse - log_k
    if on_pass is not None:
        on_pass(1, None)
    error: float | None = None
    for done in range(1, iterations):
        # log c_k = logsumexp_i log_softmax_k(s_i / eps + log b) - log N: the prototype masses.
        def per_sample(s: torch.Tensor, log_b: torch.Tensor = log_b) -> torch.Tensor:
            return torch.log_softmax(s.double() / epsilon + log_b.to(s.device), dim=1)

        log_mass, rows = _streaming_logsumexp(chunks(), per_sample)
        log_c = log_mass - math.log(rows)
        error = float((torch.exp(log_c + log_k) - 1).abs().max())
        if error <= tolerance:
            if on_pass is not None:
                on_pass(done + 1, error)
            return BalancedScaling(log_b, epsilon, done, error, True, data_passes=done + 1)
        log_b = log_b - log_c - log_k
        if on_pass is not None:
            on_pass(done + 1, error)
    return BalancedScaling(log_b, epsilon, iterations, error, False, data_passes=iterations)
