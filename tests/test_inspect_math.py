"""The pure pieces of ``inspect-clusters``: streaming Sinkhorn, label metrics, size statistics, heaps.

References are float64 computations written out here (or scikit-learn on per-image labels),
never numbers copied from the implementation.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from swavctl.clustering.sinkhorn_knopp import sinkhorn
from swavctl.inspect import assign, metrics, stats
from swavctl.inspect.embeddings import EmbeddingStore
from swavctl.inspect.topn import Reservoir, TopN


def _chunks(scores: torch.Tensor, size: int):  # type: ignore[no-untyped-def]
    return lambda: (scores[i : i + size] for i in range(0, scores.shape[0], size))


def _sinkhorn_float64(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The textbook (non-log) Sinkhorn-Knopp of the SwAV paper, in float64 (B x K codes)."""
    q = torch.exp(scores.double() / epsilon).t()  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


@pytest.mark.parametrize("iterations", [1, 2, 3, 10])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_streaming_sinkhorn_equals_the_in_memory_solve(iterations: int, chunk: int) -> None:
    torch.manual_seed(iterations * 100 + chunk)
    z = torch.nn.functional.normalize(torch.randn(203, 16, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(11, 16, dtype=torch.float64), dim=1)
    scores = z @ c.t()
    scaling = assign.balance(_chunks(scores, chunk), epsilon=0.05, iterations=iterations)
    streamed = assign.balanced_codes(scores, scaling)
    reference = _sinkhorn_float64(scores, 0.05, iterations)
    assert scaling.passes == iterations and not scaling.converged
    torch.testing.assert_close(streamed, reference, rtol=1e-9, atol=1e-12)
    # ... and the project's own batch Sinkhorn on the whole set at once.
    torch.testing.assert_close(
        streamed, sinkhorn(scores, epsilon=0.05, iterations=iterations), rtol=1e-7, atol=1e-10
    )


def test_streaming_sinkhorn_converges_to_equal_prototype_masses() -> None:
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(300, 8, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    scores = z @ c.t()
    seen: list[tuple[int, float | None]] = []
    scaling = assign.balance(
        _chunks(scores, 50),
        epsilon=0.05,
        iterations=500,
        tolerance=1e-6,
        on_pass=lambda n, e: seen.append((n, e)),
    )
    assert scaling.converged and scaling.max_marginal_error is not None and scaling.max_marginal_error <= 1e-6
    codes = assign.balanced_codes(scores, scaling)
    mass = codes.sum(dim=0) / codes.shape[0]  # each prototype's share of the samples
    torch.testing.assert_close(mass, torch.full((6,), 1 / 6, dtype=torch.float64), atol=2e-7, rtol=0)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(300, dtype=torch.float64))
    assert [n for n, _ in seen] == list(range(1, len(seen) + 1))
    # Hard balanced assignment: sizes close to N/K = 50, while argmax is uneven here.
    sizes = np.bincount(scaling.logits(scores).argmax(dim=1).numpy(), minlength=6)
    assert np.abs(sizes - 50).max() <= 5
    argmax_sizes = np.bincount(scores.argmax(dim=1).numpy(), minlength=6)
    assert np.abs(argmax_sizes - 50).max() > 10


def test_streaming_sinkhorn_stays_finite_for_far_prototypes_and_small_epsilon() -> None:
    z = torch.nn.functional.normalize(torch.randn(50, 4, dtype=torch.float64), dim=1)
    c = torch.cat([z[:3], -z[:1]])  # the last prototype is far from most samples
    scores = z @ c.t()
    scaling = assign.balance(_chunks(scores, 16), epsilon=0.005, iterations=20)
    assert torch.isfinite(scaling.log_b).all()
    assert torch.isfinite(assign.balanced_codes(scores, scaling)).all()


def test_top_predictions_are_softmax_ordered() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    idx, prob = assign.top_predictions(scores, temperature=0.1, k=3)
    assert idx.tolist() == [[1, 3, 2], [0, 1, 2]]  # ties: the lower index first
    reference = torch.softmax(scores.double() / 0.1, dim=1)
    torch.testing.assert_close(prob, reference.gather(1, idx))


def _table(labels: np.ndarray, clusters: np.ndarray, c: int, k: int) -> np.ndarray:
    table = np.zeros((c, k), dtype=np.int64)
    metrics.add_to_table(table, labels, clusters)
    return table


@pytest.mark.parametrize("seed", range(5))
def test_label_metrics_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c, k = 500, 4 + seed, 3 + 2 * seed
    labels = rng.integers(c, size=n)
    clusters = np.where(rng.random(n) < 0.6, labels % k, rng.integers(k, size=n))
    table = _table(labels, clusters, c, k)
    assert metrics.nmi(table) == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert metrics.ari(table) == pytest.approx(adjusted_rand_score(labels, clusters), abs=1e-12)
    majority = sum(np.bincount(labels[clusters == j]).max() for j in np.unique(clusters))
    assert metrics.purity(table) == pytest.approx(majority / n)
    # Hungarian accuracy: brute force over every one-to-one map on a small case.
    small = table[:3, :3]
    best = max(sum(small[i, p[i]] for i in range(3)) for p in itertools.permutations(range(3)))
    accuracy, mapping = metrics.hungarian_accuracy(small)
    assert accuracy == pytest.approx(best / small.sum())
    assert sorted(mapping) == [0, 1, 2]


def test_label_metrics_of_a_perfect_relabelled_clustering() -> None:
    labels = np.repeat(np.arange(4), 10)
    clusters = (labels * 3 + 1) % 7  # a renaming into 7 prototypes, 3 of them unused
    table = _table(labels, clusters, 4, 7)
    assert metrics.label_metrics(table) == pytest.approx(
        {"nmi": 1.0, "ari": 1.0, "purity": 1.0, "accuracy": 1.0}
    )
    one = _table(np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.int64), 1, 3)
    assert metrics.nmi(one) == normalized_mutual_info_score(np.zeros(5), np.zeros(5))


def test_size_statistics_against_their_definitions() -> None:
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 50, size=37)
    sizes[[2, 5]] = 0
    p = sizes[sizes > 0] / sizes.sum()
    assert stats.size_entropy(sizes) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert stats.entropy_ratio(sizes) == pytest.approx(stats.size_entropy(sizes) / math.log(37))
    pairwise = np.abs(sizes[:, None] - sizes[None, :]).sum() / (2 * len(sizes) ** 2 * sizes.mean())
    assert stats.gini(sizes) == pytest.approx(pairwise, abs=1e-12)
    assert stats.largest_over_median(sizes) == pytest.approx(sizes.max() / np.median(sizes[sizes > 0]))
    even = np.full(10, 7)
    assert stats.gini(even) == pytest.approx(0.0, abs=1e-12)
    assert stats.entropy_ratio(even) == pytest.approx(1.0)
    assert stats.largest_over_median(even) == 1.0
    one = np.array([0, 0, 0, 12])
    assert stats.gini(one) == pytest.approx(3 / 4) and stats.entropy_ratio(one) == 0.0
    assert stats.largest_over_median(np.zeros(4)) is None


def test_prototype_similarity_finds_nearest_and_duplicates() -> None:
    torch.manual_seed(1)
    w = torch.nn.functional.normalize(torch.randn(40, 32, dtype=torch.float64), dim=1)
    w[7] = torch.nn.functional.normalize(w[3] + 0.05 * w[11], dim=0)  # cosine ~ 0.999 with 3
    w[30] = w[12]  # an exact copy
    cos = (w @ w.t()).numpy()
    np.fill_diagonal(cos, -np.inf)
    for rows in (1, 8, 1024):
        sim = stats.prototype_similarity(w * 3.0, threshold=0.95, rows=rows)  # scale does not matter
        assert sim.nearest.tolist() == cos.argmax(axis=1).tolist()
        np.testing.assert_allclose(sim.nearest_cosine, cos.max(axis=1), atol=1e-12)
        expected = {(i, j) for i in range(40) for j in range(i + 1, 40) if cos[i, j] > 0.95}
        assert {(i, j) for i, j, _ in sim.duplicates} == expected == {(3, 7), (12, 30)}


def test_topn_keeps_the_highest_scores_per_cluster() -> None:
    rng = np.random.default_rng(0)
    clusters = rng.integers(5, size=2000)
    scores = rng.random(2000).round(2)  # many ties
    top = TopN(7)
    top.push_many(clusters, scores, np.arange(2000))
    for c in range(5):
        members = [(i, scores[i]) for i in range(2000) if clusters[i] == c]
        expected = sorted(members, key=lambda m: (-m[1], m[0]))[:7]
        assert top.items(c) == [(i, float(s)) for i, s in expected]
    assert top.items(99) == []


def test_reservoir_is_a_uniform_sample_of_the_members() -> None:
    counts = np.zeros(20)
    for seed in range(2000):
        res = Reservoir(3, seed=seed)
        res.push_many(np.zeros(20, dtype=np.int64), np.arange(20))
        picked = res.items(0)
        assert len(picked) == len(set(picked)) == 3
        counts[picked] += 1
    # Each of the 20 members is kept with probability 3/20: 300 expected of 2000 draws.
    assert np.abs(counts - 300).max() < 5 * math.sqrt(2000 * 0.15 * 0.85)
    small = Reservoir(5, seed=0)
    small.push_many(np.array([1, 1]), np.array([4, 9]))
    assert small.items(1) == [4, 9]


def test_embedding_store_round_trip(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "z.f32", 3)
    parts = [torch.randn(n, 3) for n in (5, 1, 9)]
    for part in parts:
        store.append(part)
    store.finish()
    back = torch.cat([z for _, z in store.chunks(4)])
    torch.testing.assert_close(back, torch.cat(parts))
    assert [start for start, _ in store.chunks(4)] == [0, 4, 8, 12]
    store.remove()
    assert not (tmp_path / "z.f32").exists()


def test_unlabelled_images_leave_the_contingency_table_unchanged() -> None:
    """A label of -1 (no label) is skipped: it must not wrap around to the last label's row."""
    table = np.zeros((3, 4), dtype=np.int64)
    metrics.add_to_table(table, np.array([-1, -1, -1]), np.array([0, 3, 3]))
    assert not table.any()
    metrics.add_to_table(table, np.array([2, -1, 0, -1, 2]), np.array([3, 3, 1, 0, 3]))
    expected = np.zeros((3, 4), dtype=np.int64)
    expected[2, 3], expected[0, 1] = 2, 1
    np.testing.assert_array_equal(table, expected)


def test_one_cluster_has_entropy_plus_zero_not_minus_zero() -> None:
    import math

    from swavctl.inspect.stats import entropy_ratio, size_entropy

    assert math.copysign(1.0, size_entropy(np.array([7, 0, 0]))) == 1.0
    assert f"{entropy_ratio(np.array([7, 0, 0])):.3f}" == "0.000"
