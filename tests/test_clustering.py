"""The clustering math of DeepCluster-v2 and SeLa-v2 (swavctl.clustering) against float64 references.

The references here are written from the official code (methods-reference §1-2: DC:345-413,
SK:112-139, MN:84-90 and 149-156), independently of the implementation. The two-rank checks run
one pair of forked gloo workers on 127.0.0.1; each saves what it computed and the tests compare
that with one process on the concatenated bank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from swavctl.clustering import (
    MemoryBank,
    assign_to_nearest,
    balanced_initial_labels,
    gather_dataset_labels,
    hard_label_loss,
    initial_centroids,
    offline_sinkhorn,
    sela_solve_epochs,
    sela_solve_steps,
    spherical_kmeans,
)
from tests.conftest import free_port

# ---------------------------------------------------------------------------------------------
# data and float64 references


def blobs(
    per_cluster: int, clusters: int, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows around ``clusters`` orthogonal directions e_0.. (float32), and each row's cluster."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(clusters).repeat_interleave(per_cluster)
    rows = F.one_hot(truth, dim).double() + noise * torch.randn(
        len(truth), dim, generator=g, dtype=torch.float64
    )
    return F.normalize(rows, dim=1).float(), truth


def random_unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)


def reference_kmeans(
    bank: torch.Tensor, centroids: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DC:360-387 in float64, one cluster at a time (as the official per-cluster torch.sum)."""
    x, c = bank.double(), centroids.double().clone()
    for _ in range(iterations):
        nearest = (x @ c.t()).argmax(dim=1)
        for k in range(c.shape[0]):
            members = x[nearest == k]
            if len(members):
                c[k] = members.sum(dim=0) / len(members)
        c = c / c.norm(dim=1, keepdim=True)
    return c, (x @ c.t()).argmax(dim=1)


def reference_sela(p: torch.Tensor, tol: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """SeLa's optimize_L_sk (SK:112-139) on P (K x N, already raised to lambda), float64."""
    k, n = p.shape
    r = torch.ones(k, 1, dtype=torch.float64) / k
    c = torch.ones(n, 1, dtype=torch.float64) / n
    err, counter = 1e6, 0
    while err > tol:
        r = (1.0 / k) / (p @ c)
        c_new = (1.0 / n) / (r.t() @ p).t()
        if counter % 10 == 0:
            err = float(torch.nansum(torch.abs(c / c_new - 1)))
        c = c_new
        counter += 1
    q = p * c.squeeze()
    q = (q.t() * r.squeeze()).t()
    return q.argmax(dim=0), r.squeeze(), c.squeeze(), counter


def sela_p(bank: torch.Tensor, prototypes: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """SeLa's P: softmax(scores / tau) ** lambda, K x N."""
    return torch.softmax(bank.double() @ prototypes.double().t() / tau, dim=1).t() ** lam


# ---------------------------------------------------------------------------------------------
# spherical k-means


def test_kmeans_seeded_one_point_per_cluster_recovers_the_clusters_and_an_empty_one_stays() -> None:
    bank, truth = blobs(per_cluster=40, clusters=5, dim=8, noise=0.15, seed=0)
    seeds = bank[torch.arange(5) * 40 + 7]  # one member of each cluster
    unused = F.one_hot(torch.tensor([7]), 8).float()  # exactly unit, far from every row
    result = spherical_kmeans(bank, torch.cat([seeds, unused]), iterations=10)
    assert torch.equal(result.assignments, truth)
    assert torch.equal(result.centroids[5], unused[0])  # the empty cluster kept its centroid
    reference, _ = reference_kmeans(bank, torch.cat([seeds, unused]), 10)
    torch.testing.assert_close(result.centroids.double(), reference, atol=1e-6, rtol=0)


def test_kmeans_empty_cluster_keeps_its_centroid_while_the_others_move() -> None:
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(
        0.3 * torch.randn(300, 6, generator=g) + F.one_hot(torch.tensor(0), 6), dim=1
    )  # a cone
    start = bank[:4].clone()
    start[3] = -F.one_hot(torch.tensor(0), 6).float()  # exactly unit, behind every row: always empty
    assert (bank @ start[3]).max() < 0 < (bank @ start[:3].t()).max(dim=1).values.min()
    for iterations in (1, 10):
        result = spherical_kmeans(bank, start, iterations=iterations)
        assert torch.equal(result.centroids[3], start[3])
        assert not torch.allclose(result.centroids[:3], start[:3], atol=1e-3)
        assert set(result.assignments.tolist()) == {0, 1, 2}


def test_kmeans_matches_a_float64_reference_and_its_invariants() -> None:
    bank = random_unit(500, 16, seed=2).float()
    start = initial_centroids(bank, 12, torch.Generator().manual_seed(5))
    result = spherical_kmeans(bank, start, iterations=10, block_rows=64)
    # the unit centroids, and every row assigned to its nearest one (the final E-step)
    torch.testing.assert_close(result.centroids.double().norm(dim=1), torch.ones(12, dtype=torch.float64))
    assert torch.equal(result.assignments, (bank.double() @ result.centroids.double().t()).argmax(1))
    reference, labels = reference_kmeans(bank, start, 10)
    assert torch.equal(result.assignments, labels)
    torch.testing.assert_close(result.centroids.double(), reference, atol=1e-5, rtol=0)
    assert result.centroids.dtype == torch.float32 and result.assignments.dtype == torch.int64
    # blocks do not change the result; the initial centroids are not modified
    whole = spherical_kmeans(bank, start, iterations=10, block_rows=10_000)
    assert torch.equal(whole.assignments, result.assignments)
    assert torch.equal(start, initial_centroids(bank, 12, torch.Generator().manual_seed(5)))


def test_initial_centroids_are_rows_of_the_bank_drawn_by_randperm() -> None:
    bank = random_unit(50, 4, seed=3).float()
    got = initial_centroids(bank, 7, torch.Generator().manual_seed(9))
    expected = bank[torch.randperm(50, generator=torch.Generator().manual_seed(9))[:7]]
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="at least 51 bank rows"):
        initial_centroids(bank, 51, torch.Generator())


def test_a_collapsed_bank_gives_one_cluster_and_a_loss_of_ln_k() -> None:
    k = 3000
    row = F.normalize(torch.randn(1, 16, generator=torch.Generator().manual_seed(4)), dim=1)
    bank = row.repeat(k + 5, 1)
    result = spherical_kmeans(bank, initial_centroids(bank, k, torch.Generator().manual_seed(0)))
    # one cluster (which one depends on fp32 rounding of the identical rows' mean, as officially)
    assert torch.equal(result.assignments, result.assignments[:1].expand(k + 5))
    batch, crops = 6, 4
    embeddings = row.repeat(crops * batch, 1)  # crop-major rows of a collapsed model
    scores = [embeddings @ result.centroids.t()] * 3
    labels = result.assignments[:batch].repeat(3, 1)
    loss = hard_label_loss(scores, labels, temperature=0.1)
    assert abs(loss.item() - math.log(k)) < 1e-5  # ln 3000 = 8.0064


# ---------------------------------------------------------------------------------------------
# offline Sinkhorn


PATHS = {"direct": {}, "log": {"cache_elements": 0, "block_rows": 64}}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_offline_sinkhorn_transport_plan_has_the_marginals(path: str) -> None:
    bank, prototypes, eps = random_unit(200, 8, seed=5), random_unit(10, 8, seed=6), 0.02
    result = offline_sinkhorn(bank, prototypes, epsilon=eps, tol=1e-10, max_iterations=5000, **PATHS[path])
    assert result.converged and result.log_domain == (path == "log")
    q = torch.exp(result.log_r[:, None] + (prototypes @ bank.t()) / eps + result.log_c[None, :])  # K x N
    torch.testing.assert_close(
        q.sum(dim=1), torch.full((10,), 1 / 10, dtype=torch.float64), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        q.sum(dim=0), torch.full((200,), 1 / 200, dtype=torch.float64), atol=1e-14, rtol=0
    )
    assert torch.equal(result.labels, q.argmax(dim=0))


@pytest.fixture(scope="module")
def sela_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    bank, prototypes = random_unit(3000, 16, seed=0), random_unit(30, 16, seed=1)
    return reference_sela(sela_p(bank, prototypes, 0.1, 25))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_offline_sinkhorn_equals_selas_reference_loop(
    sela_reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], path: str
) -> None:
    """With SeLa's own P (softmax ** lambda) the iterates match step for step: same stop, same labels."""
    bank, prototypes = random_unit(3000, 16, seed=0), random_unit(30, 16, seed=1)
    labels, r, c, counter = sela_reference
    options = {**PATHS[path], "block_rows": 1024}  # 3 blocks
    result = offline_sinkhorn(bank, prototypes, epsilon=0.1 / 25, softmax_temperature=0.1, **options)
    assert result.iterations == counter and result.converged and result.log_domain == (path == "log")
    assert torch.equal(result.labels, labels)
    torch.testing.assert_close(result.log_r, r.log(), atol=1e-9, rtol=0)
    torch.testing.assert_close(result.log_c, c.log(), atol=1e-9, rtol=0)
    counts = torch.bincount(result.labels, minlength=30)  # methods-reference §5: near N/K = 100
    assert counts.min() >= 96 and counts.max() <= 104, counts


def test_offline_sinkhorn_labels_do_not_need_the_softmax() -> None:
    """exp(s / eps) and softmax(s / tau) ** (tau / eps) differ by a per-sample factor, which c absorbs."""
    bank, prototypes = random_unit(400, 8, seed=7), random_unit(12, 8, seed=8)
    fixed: dict[str, Any] = {"epsilon": 0.004, "tol": 1e-9, "max_iterations": 20_000}
    with_softmax = offline_sinkhorn(bank, prototypes, softmax_temperature=0.1, **fixed)
    without = offline_sinkhorn(bank, prototypes, **fixed)
    assert with_softmax.converged and without.converged
    assert torch.equal(with_softmax.labels, without.labels)
    torch.testing.assert_close(
        with_softmax.log_r - with_softmax.log_r.mean(), without.log_r - without.log_r.mean()
    )


def test_offline_sinkhorn_permutations_permute_the_labels() -> None:
    bank, prototypes = random_unit(300, 8, seed=9), random_unit(15, 8, seed=10)
    settings: dict[str, Any] = {"epsilon": 0.004, "tol": 0.0, "max_iterations": 200}
    base = offline_sinkhorn(bank, prototypes, **settings).labels
    samples = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(offline_sinkhorn(bank[samples], prototypes, **settings).labels, base[samples])
    protos = torch.randperm(15, generator=torch.Generator().manual_seed(2))  # new prototype j = old protos[j]
    permuted = offline_sinkhorn(bank, prototypes[protos], **settings).labels
    assert torch.equal(protos[permuted], base)


def test_offline_sinkhorn_blocks_and_cache_do_not_change_the_result() -> None:
    bank, prototypes = random_unit(250, 8, seed=11).float(), random_unit(9, 8, seed=12).float()
    cached = offline_sinkhorn(bank, prototypes, epsilon=0.01, block_rows=4096)
    streamed = offline_sinkhorn(bank, prototypes, epsilon=0.01, block_rows=17, cache_elements=0)
    assert torch.equal(cached.labels, streamed.labels) and cached.iterations == streamed.iterations
    torch.testing.assert_close(cached.log_c, streamed.log_c, atol=1e-12, rtol=0)
    assert cached.log_r.dtype == torch.float64
    assert not cached.log_domain and streamed.log_domain
    capped = offline_sinkhorn(bank, prototypes, epsilon=0.01, tol=0.0, max_iterations=7)
    assert capped.iterations == 7 and not capped.converged


def test_offline_sinkhorn_falls_back_to_logs_where_the_kernel_underflows() -> None:
    """At epsilon 1e-4 the cosines span exp(-2e4) within a row: the direct path would underflow."""
    bank, prototypes = random_unit(120, 4, seed=13), random_unit(6, 4, seed=14)
    fixed: dict[str, Any] = {"epsilon": 1e-4, "tol": 0.0, "max_iterations": 40}
    cached = offline_sinkhorn(bank, prototypes, **fixed)
    streamed = offline_sinkhorn(bank, prototypes, cache_elements=0, **fixed)
    assert cached.log_domain and torch.isfinite(cached.log_r).all() and torch.isfinite(cached.log_c).all()
    assert torch.equal(cached.labels, streamed.labels)
    torch.testing.assert_close(cached.log_c, streamed.log_c, atol=0, rtol=0)
    columns = torch.logsumexp(cached.log_r[None, :] + bank @ prototypes.t() / 1e-4, dim=1) + cached.log_c
    torch.testing.assert_close(columns, torch.full((120,), -math.log(120), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# hard-label loss


def reference_loss(scores: list[torch.Tensor], labels: torch.Tensor, tau: float) -> float:
    """Per head: mean over kept rows of -log softmax(s/tau)[y]; row c*B + b is crop c of sample b."""
    batch, heads = labels.shape[1], []
    for s, y in zip(scores, labels, strict=True):
        logp = torch.log_softmax(s.detach().double() / tau, dim=1)
        terms = [-logp[row, y[row % batch]] for row in range(s.shape[0]) if y[row % batch] != -100]
        heads.append(torch.stack(terms).mean())
    return float(torch.stack(heads).mean())


def test_hard_label_loss_matches_the_reference_and_ignores_minus_100() -> None:
    g = torch.Generator().manual_seed(13)
    batch, crops, k = 5, 3, 7
    scores = [torch.randn(crops * batch, k, generator=g, requires_grad=True) for _ in range(2)]
    labels = torch.randint(0, k, (2, batch), generator=g)
    labels[:, 1] = -100  # sample 1 is in no bank: its rows (1, 6, 11) are ignored on every head
    loss = hard_label_loss(scores, labels, temperature=0.1)
    assert abs(loss.item() - reference_loss(scores, labels, 0.1)) < 1e-5
    loss.backward()
    for s in scores:
        assert s.grad is not None
        assert torch.equal(s.grad[[1, 6, 11]], torch.zeros(3, k))
        assert s.grad[[0, 5, 10]].abs().sum() > 0
    changed = [s.detach().clone() for s in scores]
    for s in changed:
        s[[1, 6, 11]] = 100.0
    assert hard_label_loss(changed, labels, temperature=0.1).item() == loss.item()


def test_hard_label_loss_with_every_row_ignored_is_zero() -> None:
    scores = [torch.randn(4, 3, requires_grad=True)]
    loss = hard_label_loss(scores, torch.full((1, 2), -100), temperature=0.1)
    loss.backward()
    assert (
        loss.item() == 0.0 and scores[0].grad is not None and torch.equal(scores[0].grad, torch.zeros(4, 3))
    )
    with pytest.raises(ValueError, match="whole number of crops"):
        hard_label_loss([torch.randn(5, 3)], torch.zeros(1, 2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# memory bank, gather, SeLa's schedule


def test_bank_write_state_and_gather() -> None:
    bank = MemoryBank(num_crops=2, steps_per_epoch=3, batch_size=4, dim=5)
    assert bank.length == 12 and not bank.filled().any()
    g = torch.Generator().manual_seed(14)
    crops = torch.randn(2, 4, 5, generator=g)
    bank.write(1, torch.tensor([8, 3, 9, 0]), crops)
    assert torch.equal(bank.embeddings[:, 4:8], crops) and torch.equal(
        bank.indices[4:8], torch.tensor([8, 3, 9, 0])
    )
    bank.write(2, torch.tensor([3, 5]), [crops[0, :2], crops[1, :2]])  # a short batch: rows 10, 11 unwritten
    assert bank.filled().tolist() == [False] * 4 + [True] * 6 + [False] * 2
    labels = torch.arange(12).repeat(2, 1) * torch.tensor(
        [[1], [10]]
    )  # head h labels row j with j * (1, 10)[h]
    gathered = bank.gather_labels(labels, dataset_size=11)
    expected = torch.full((11,), -100)
    expected[[8, 3, 9, 0, 5]] = torch.tensor([4, 8, 6, 7, 9])  # index 3 is at rows 5 and 8: the last wins
    assert torch.equal(gathered[0], expected)
    assert torch.equal(gathered[1], torch.where(expected >= 0, expected * 10, expected))
    assert torch.equal(bank.gather_labels(labels[0], dataset_size=11), expected)
    restored = MemoryBank(2, 3, 4, 5)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.embeddings, bank.embeddings) and torch.equal(restored.indices, bank.indices)
    with pytest.raises(RuntimeError, match="size mismatch"):
        MemoryBank(2, 4, 4, 5).load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        bank.write(3, torch.tensor([1]), crops[:, :1])
    with pytest.raises(ValueError, match="must lie in"):
        gather_dataset_labels(bank.indices, labels[0], dataset_size=9)


def test_balanced_initial_labels_and_selas_schedule() -> None:
    labels = balanced_initial_labels(1003, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels, minlength=10)
    assert sorted(set(counts.tolist())) == [100, 101] and counts.sum() == 1003
    assert not torch.equal(labels, torch.arange(1003) % 10)  # permuted
    epochs = sela_solve_epochs(400, 100)
    assert [round(e, 2) for e in epochs[:6]] == [0.0, 0.04, 0.16, 0.37, 0.65, 1.02]
    assert epochs[-1] == pytest.approx(401.01) and len(epochs) == 100
    # N = 1000, batch 100: t_i * N / batch iterations; close solves go one per iteration
    steps = sela_solve_steps(1, 5, dataset_size=1000, batch_size=100)
    assert steps == [0, 2, 6, 12, 21]  # ceil(2.01 * (i/4)^2 * 10) = 0, 2, 6 (5.025), 12 (11.31), 21 (20.1)
    assert sela_solve_steps(0, 4, dataset_size=10, batch_size=100) == [0, 1, 2, 3]


def test_assign_to_nearest_breaks_ties_to_the_lowest_index() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    centroids = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert assign_to_nearest(bank, centroids).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------
# two gloo ranks against one process

KMEANS_SPLIT = (130, 70)  # rows per rank of the 200-row k-means bank
SINKHORN_SPLIT = (37, 263)


def kmeans_bank() -> torch.Tensor:
    return blobs(per_cluster=40, clusters=5, dim=8, noise=0.6, seed=21)[0]


def sinkhorn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return random_unit(300, 8, seed=22).float(), random_unit(11, 8, seed=23).float()


def _rows(split: tuple[int, int], rank: int) -> slice:
    return slice(0, split[0]) if rank == 0 else slice(split[0], split[0] + split[1])


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        results: dict[str, Any] = {}
        bank = kmeans_bank()[_rows(KMEANS_SPLIT, rank)]
        start = kmeans_bank()[:9]  # injected: the same on both ranks
        km = spherical_kmeans(bank, start, iterations=10, block_rows=32)
        results["kmeans"] = (km.centroids, km.assignments)
        # rank 1's generator is ignored: rank 0 draws, then broadcasts
        results["init"] = initial_centroids(bank, 9, torch.Generator().manual_seed(31 + rank))
        try:
            initial_centroids(bank, KMEANS_SPLIT[0] + 1, torch.Generator())
            results["init_error"] = ""
        except ValueError as exc:
            results["init_error"] = str(exc)
        sk_bank, prototypes = sinkhorn_inputs()
        for path in PATHS:  # "log": rank 1 streams, so both ranks take the log path
            options = PATHS[path] if rank == 1 else {}
            sk = offline_sinkhorn(sk_bank[_rows(SINKHORN_SPLIT, rank)], prototypes, epsilon=0.004, **options)
            results[f"sinkhorn/{path}"] = (sk.labels, sk.log_r, sk.log_c, sk.iterations, sk.log_domain)
        indices = torch.tensor([[4, 1, -1], [1, 6, 2]][rank])
        results["gather"] = gather_dataset_labels(
            indices, torch.tensor([[10, 11, 12], [20, 21, 22]][rank]), 8
        )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("clustering-two-ranks")
    mp.start_processes(_two_rank_worker, args=(free_port(), str(out)), nprocs=2, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_kmeans_on_two_ranks_equals_one_process(two_ranks: list[dict[str, Any]]) -> None:
    whole = spherical_kmeans(kmeans_bank(), kmeans_bank()[:9], iterations=10)
    for r in range(2):
        torch.testing.assert_close(two_ranks[r]["kmeans"][0], whole.centroids, atol=1e-6, rtol=0)
    assignments = torch.cat([two_ranks[r]["kmeans"][1] for r in range(2)])
    assert torch.equal(assignments, whole.assignments)
    assert len(set(whole.assignments.tolist())) > 3  # not a degenerate clustering


def test_initial_centroids_come_from_rank_0_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    drawn = torch.randperm(KMEANS_SPLIT[0], generator=torch.Generator().manual_seed(31))[:9]
    expected = kmeans_bank()[drawn]
    assert torch.equal(two_ranks[0]["init"], expected) and torch.equal(two_ranks[1]["init"], expected)
    for r in range(2):  # both ranks refuse, on rank 0's bank size
        assert "at least 131 bank rows" in two_ranks[r]["init_error"]


@pytest.mark.parametrize("path", sorted(PATHS))
def test_offline_sinkhorn_on_two_ranks_equals_one_process(two_ranks: list[dict[str, Any]], path: str) -> None:
    bank, prototypes = sinkhorn_inputs()
    whole = offline_sinkhorn(bank, prototypes, epsilon=0.004, **PATHS[path])
    got = [two_ranks[r][f"sinkhorn/{path}"] for r in range(2)]
    assert torch.equal(torch.cat([got[0][0], got[1][0]]), whole.labels)
    torch.testing.assert_close(torch.cat([got[0][2], got[1][2]]), whole.log_c, atol=1e-9, rtol=0)
    for r in range(2):
        torch.testing.assert_close(got[r][1], whole.log_r, atol=1e-9, rtol=0)
        assert got[r][3] == whole.iterations and got[r][4] == whole.log_domain == (path == "log")
    # the equipartition is global: rank 0's rows solved alone get other labels
    alone = offline_sinkhorn(bank[: SINKHORN_SPLIT[0]], prototypes, epsilon=0.004).labels
    assert not torch.equal(alone, whole.labels[: SINKHORN_SPLIT[0]])


def test_gather_dataset_labels_on_two_ranks(two_ranks: list[dict[str, Any]]) -> None:
    # rank 0 rows: 4->10, 1->11, (unwritten); rank 1 rows: 1->20, 6->21, 2->22. Index 1: rank 1 wins.
    expected = torch.tensor([-100, 20, 22, -100, 10, -100, 21, -100])
    for r in range(2):
        assert torch.equal(two_ranks[r]["gather"], expected)
