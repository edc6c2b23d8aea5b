"""Two gloo processes on CPU against one process: Sinkhorn, SyncBatchNorm, and one training step.

The two-rank math checks run in one pair of forked workers (tcp://127.0.0.1); each rank saves
what it computed and the test compares it, in float64, with a single-process computation on the
whole batch. The training-step check runs the real CLI: 2 ranks x B/2 against 1 rank x B.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from swavctl.clustering.sinkhorn_knopp import sinkhorn
from swavctl.distributed import dist
from swavctl.distributed.agreement import read_step
from swavctl.distributed.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from swavctl.errors import UserError
from tests.conftest import cli_env, free_port, run_cli, write_image_folder
from tests.test_sinkhorn import far_sample_scores, reference_sinkhorn_log

GLOBAL_BATCH, PROTOTYPES = 48, 30
SPLITS = {"halves": (24, 24), "uneven": (31, 17)}  # rows per rank
FAR_SPLIT, FAR_EPSILON = 40, 0.005  # rank 0 holds rows 0-39 of far_sample_scores(), with its far sample


def official_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The paper's procedure, literally, in float64 on the whole batch (no log domain)."""
    q = torch.exp(scores.double() / epsilon).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def _scores(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    z = nn.functional.normalize(torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64), dim=1)
    c = nn.functional.normalize(torch.randn(PROTOTYPES, 8, generator=g, dtype=torch.float64), dim=1)
    return (z @ c.t()).to(dtype)


def _bn_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "x2d": torch.randn(16, 5, 3, 3, generator=g, dtype=torch.float64) * 3 + 1,
        "w2d": torch.randn(16, 5, 3, 3, generator=g, dtype=torch.float64),
        "x1d": torch.randn(16, 7, generator=g, dtype=torch.float64) * 0.5 - 2,
        "w1d": torch.randn(16, 7, generator=g, dtype=torch.float64),
    }


def _bn_pass(bn: Any, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward, then backward of sum(out * w) (a loss summed over samples, as DDP sums grads)."""
    x = x.clone().requires_grad_(True)
    out = bn(x)
    (out * w).sum().backward()
    assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
    return {
        "out": out.detach(),
        "grad_x": x.grad,
        "grad_weight": bn.weight.grad,
        "grad_bias": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def _fresh_bn(kind: str) -> nn.Module:
    torch.manual_seed(11)
    bn = nn.BatchNorm2d(5) if kind == "2d" else nn.BatchNorm1d(7)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.double()


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        results: dict[str, Any] = {}
        for name, (first, second) in SPLITS.items():
            rows = slice(0, first) if rank == 0 else slice(first, first + second)
            for dtype in (torch.float64, torch.float32):
                mine = _scores(dtype)[rows]
                results[f"sinkhorn/{name}/{dtype}"] = sinkhorn(mine, epsilon=0.05, iterations=3)
        # Only rank 0 holds the sample that underflows: both ranks must take the log domain.
        far = far_sample_scores()
        mine = far[:FAR_SPLIT] if rank == 0 else far[FAR_SPLIT:]
        results["sinkhorn/log-domain"] = sinkhorn(mine, epsilon=FAR_EPSILON, iterations=3)
        data = _bn_inputs()
        half = slice(0, 8) if rank == 0 else slice(8, 16)
        for kind in ("2d", "1d"):
            bn = convert_sync_batchnorm(_fresh_bn(kind), device_type="cpu")
            assert isinstance(bn, SyncBatchNorm)
            got = _bn_pass(bn, data[f"x{kind}"][half], data[f"w{kind}"][half])
            results.update({f"bn{kind}/{key}": value for key, value in got.items()})
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("two-ranks")
    # fork: no re-import of torch in the children (they use one thread, so no OpenMP pool is needed).
    mp.start_processes(_two_rank_worker, args=(free_port(), str(out)), nprocs=2, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_sinkhorn_on_two_ranks_equals_one_process(two_rank_results: list[dict[str, Any]], split: str) -> None:
    for dtype in (torch.float64, torch.float32):
        codes = torch.cat([two_rank_results[r][f"sinkhorn/{split}/{dtype}"] for r in range(2)])
        whole = _scores(dtype)
        single = sinkhorn(whole, epsilon=0.05, iterations=3)
        assert codes.dtype == dtype and codes.shape == (GLOBAL_BATCH, PROTOTYPES)
        torch.testing.assert_close(codes, single, atol=1e-6, rtol=0)
        reference = official_sinkhorn(whole, 0.05, 3)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(codes.double(), reference, atol=tol, rtol=0)
        # The last normalisation is over samples: every code sums to 1.
        ones = torch.ones(GLOBAL_BATCH, dtype=torch.float64)
        torch.testing.assert_close(codes.double().sum(1), ones, atol=tol, rtol=0)


def test_log_domain_sinkhorn_on_two_ranks_equals_one_process(two_rank_results: list[dict[str, Any]]) -> None:
    """A sample on rank 0 underflows its whole float32 row: both ranks switch to the log domain
    (rank 1 on rank 0's word; otherwise their collectives would not match), and the codes equal the
    one-process solve and the float64 log-domain reference."""
    codes = torch.cat([two_rank_results[r]["sinkhorn/log-domain"] for r in range(2)])
    whole = far_sample_scores()
    assert codes.shape == whole.shape and torch.isfinite(codes).all()
    torch.testing.assert_close(codes, sinkhorn(whole, epsilon=FAR_EPSILON, iterations=3), atol=1e-6, rtol=0)
    reference = reference_sinkhorn_log(whole, FAR_EPSILON, 3)
    torch.testing.assert_close(codes.double(), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_sync_batchnorm_on_two_ranks_equals_one_batch(
    two_rank_results: list[dict[str, Any]], kind: str
) -> None:
    data = _bn_inputs()
    expected = _bn_pass(_fresh_bn(kind), data[f"x{kind}"], data[f"w{kind}"])
    got = [
        {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(f"bn{kind}/")}
        for res in two_rank_results
    ]
    for key in ("out", "grad_x"):  # per-sample: the ranks' halves concatenated
        torch.testing.assert_close(
            torch.cat([got[0][key], got[1][key]]), expected[key], atol=1e-12, rtol=1e-12
        )
    for key in ("grad_weight", "grad_bias"):  # local sums; DDP adds them up across ranks
        torch.testing.assert_close(got[0][key] + got[1][key], expected[key], atol=1e-12, rtol=1e-12)
    for key in ("running_mean", "running_var"):  # the same global statistics on every rank
        for r in range(2):
            torch.testing.assert_close(got[r][key], expected[key], atol=1e-12, rtol=1e-12)


def test_sync_batchnorm_without_a_group_is_batchnorm() -> None:
    data = _bn_inputs()
    expected = _bn_pass(_fresh_bn("2d"), data["x2d"], data["w2d"])
    converted = convert_sync_batchnorm(nn.Sequential(_fresh_bn("2d")), device_type="cpu")
    layer = converted.get_submodule("0")
    assert isinstance(layer, SyncBatchNorm)
    got = _bn_pass(layer, data["x2d"], data["w2d"])
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-14, rtol=0)
    # Keys do not change, so checkpoints and exports load into plain BatchNorm.
    assert set(converted.state_dict()) == {f"0.{k}" for k in _fresh_bn("2d").state_dict()}


def _four_rank_group_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4
    )
    try:
        results: dict[str, Any] = {"whole_for_8": dist.subgroups(8) is None}
        try:
            dist.subgroups(3)
            results["error_for_3"] = ""
        except UserError as exc:
            results["error_for_3"] = str(exc)
        data = _bn_inputs()
        quarter = slice(4 * rank, 4 * rank + 4)
        bn = convert_sync_batchnorm(_fresh_bn("2d"), device_type="cpu", process_group=dist.subgroups(2))
        results["bn"] = _bn_pass(bn, data["x2d"][quarter], data["w2d"][quarter])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sync_batchnorm_in_groups_of_two_of_four_ranks_equals_two_half_batches(tmp_path: Path) -> None:
    """dist.sync_batchnorm_group=2 on 4 ranks: ranks 0+1 normalise over their 8 rows, 2+3 over theirs."""
    mp.start_processes(
        _four_rank_group_worker, args=(free_port(), str(tmp_path)), nprocs=4, start_method="fork"
    )
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    data = _bn_inputs()
    for pair in ((0, 1), (2, 3)):
        rows = slice(4 * pair[0], 4 * pair[1] + 4)
        expected = _bn_pass(_fresh_bn("2d"), data["x2d"][rows], data["w2d"][rows])
        first, second = (got[r]["bn"] for r in pair)
        for key in ("out", "grad_x"):
            torch.testing.assert_close(
                torch.cat([first[key], second[key]]), expected[key], atol=1e-12, rtol=1e-12
            )
        for key in ("grad_weight", "grad_bias"):
            torch.testing.assert_close(first[key] + second[key], expected[key], atol=1e-12, rtol=1e-12)
        for key in ("running_mean", "running_var"):
            for res in (first, second):
                torch.testing.assert_close(res[key], expected[key], atol=1e-12, rtol=1e-12)
    assert all(res["whole_for_8"] for res in got)  # a group as large as the world is the world
    assert all(
        "sync_batchnorm_group=3 must divide the number of processes (4)" in res["error_for_3"] for res in got
    )


@pytest.mark.parametrize("unreadable", [False, True], ids=["all-read", "one-unreadable"])
def test_training_steps_two_ranks_equal_one_rank_with_sync_batchnorm(
    tmp_path: Path, unreadable: bool
) -> None:
    """2 ranks x 4 images per step == 1 rank x 8 images: same samples, same crops, global Sinkhorn.

    With one unreadable file, rank 1 trains on 3 images and rank 0 on 4: the loss is still the mean
    over the 7 (each rank's share weighted by its size, not the two ranks' means averaged), and the
    skipped file is counted whichever rank met it."""
    data = write_image_folder(tmp_path / "images", per_class=32)
    if unreadable:
        from swavctl.config import resolve
        from swavctl.data.sampler import EpochBatchSampler
        from swavctl.files.image_folder import list_images

        seed = resolve(preset="smoke").train.seed
        first = [
            i
            for _, i in next(
                iter(EpochBatchSampler(64, batch_size=4, epoch=0, seed=seed, rank=1, world_size=2))
            )
        ]
        list_images(data)[first[0]].write_bytes(b"not an image")  # in global batch 0, on rank 1
    common = (
        "pretrain",
        "--preset",
        "smoke",
        "--gpus",
        "0",
        "--data",
        str(data),
        "--max-steps",
        "2",
        "--json",
    )
    one = run_cli(*common, "--batch-size", "8", "--out", "one", cwd=tmp_path, env=cli_env())
    two = run_cli(*common, "--batch-size", "4", "--procs", "2", "--out", "two", cwd=tmp_path, env=cli_env())
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    summary_one, summary_two = json.loads(one.stdout), json.loads(two.stdout)
    assert set(summary_one) == set(summary_two)  # the same summary whatever the launch
    assert (summary_one["world_size"], summary_two["world_size"]) == (1, 2)
    assert summary_one["steps"] == summary_two["steps"] == 2
    assert summary_one["skipped_images"] == summary_two["skipped_images"] == int(unreadable)
    # The reported loss is the global batch's on both (rank 0's local loss would differ).
    assert math.isclose(summary_one["final_loss"], summary_two["final_loss"], rel_tol=1e-5)

    def weights(run: str) -> dict[str, torch.Tensor]:
        state = torch.load(tmp_path / run / "checkpoints" / "step-000000002.pt", weights_only=True)
        return state["model"]

    a, b = weights("one"), weights("two")
    assert a.keys() == b.keys()
    moved = 0
    initial = _initial_weights()
    # The bias of the Linear in front of the head's BatchNorm has a zero gradient in exact
    # arithmetic (BN removes the mean), so LARC's g / ||g|| turns rounding noise into a step of
    # fixed size: its value (and the BN running mean after it) is arbitrary in both runs.
    noise = {"head.0.bias", "head.1.running_mean"}
    for key, value in a.items():
        if key in noise:
            continue
        if value.dtype.is_floating_point:
            # fp32 sums in another order (the split batch, SyncBN's all-reduce): rounding that
            # LARC's normalised step carries into the weights, far below one step's change. It is
            # bounded by 5e-7 or 1e-4 of the tensor's change over the two steps, whichever is more:
            # the differences measured are up to 9e-6 of the change (5.5e-7 on a bias that moved
            # 0.064), where a wrong weighting of the ranks' shares moves the step by percents.
            change = (value - initial[key]).abs().max().item()
            torch.testing.assert_close(b[key], value, atol=max(5e-7, 1e-4 * change), rtol=1e-6, msg=key)
            moved += int(not torch.equal(value, initial[key]))
        else:
            assert torch.equal(b[key], value), key
    assert moved > len(a) // 2  # the steps did change the weights
    # The smoke preset freezes the prototypes for 2 steps (gradients dropped after backward, no
    # find_unused_parameters): under DDP too they have not moved.
    assert torch.equal(b["prototypes.weight"], initial["prototypes.weight"])


def _initial_weights() -> dict[str, torch.Tensor]:
    from swavctl.config import resolve
    from swavctl.model.swav import SwAV

    settings = resolve(preset="smoke")
    torch.manual_seed(settings.train.seed)
    model = SwAV(
        settings.model.arch,
        settings.model.hidden_dim,
        settings.model.embedding_dim,
        settings.model.prototypes,
    )
    model.normalize_prototypes()
    return model.state_dict()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_steps_on_cuda_match(tmp_path: Path) -> None:
    """On a GPU machine: 2 NCCL ranks x B/2 against 1 GPU x B (with 2+ GPUs), else 1 GPU against
    the CPU. fp32 without TF32 and channels_last off, so only summation order differs."""
    data = write_image_folder(tmp_path / "images", per_class=32)
    common = (
        "pretrain", "--preset", "smoke", "--data", str(data), "--max-steps", "2", "--json",
        "--set", "train.precision=fp32", "--set", "train.channels_last=false",
    )  # fmt: skip
    env = cli_env(NVIDIA_TF32_OVERRIDE="0")
    two_gpus = torch.cuda.device_count() >= 2
    one = run_cli(*common, "--gpus", "1", "--batch-size", "8", "--out", "one", cwd=tmp_path, env=env)
    if two_gpus:
        other = run_cli(*common, "--gpus", "2", "--batch-size", "4", "--out", "other", cwd=tmp_path, env=env)
    else:
        other = run_cli(*common, "--gpus", "0", "--batch-size", "8", "--out", "other", cwd=tmp_path, env=env)
    assert one.returncode == 0, one.stderr
    assert other.returncode == 0, other.stderr
    a = torch.load(
        tmp_path / "one" / "checkpoints" / "step-000000002.pt", map_location="cpu", weights_only=True
    )["model"]
    b = torch.load(
        tmp_path / "other" / "checkpoints" / "step-000000002.pt", map_location="cpu", weights_only=True
    )["model"]
    worst = 0.0
    for key, value in a.items():
        if key in {"head.0.bias", "head.1.running_mean"} or not value.dtype.is_floating_point:
            continue  # see test_training_steps_two_ranks_equal_one_rank_with_sync_batchnorm
        worst = max(worst, float((value - b[key]).abs().max()))
        torch.testing.assert_close(b[key], value, atol=1e-5, rtol=1e-4, msg=key)
    what = "2 GPUs (NCCL) vs 1 GPU" if two_gpus else "1 GPU vs the CPU"
    print(f"largest parameter difference after 2 steps, {what}: {worst:.2e}")


def _time_up_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        readout = read_step(
            torch.tensor(1.0 + rank),
            torch.tensor(True),
            torch.tensor([0.5, 3.0]),
            time_up=rank == 0,  # only rank 0's clock is past train.max_seconds
        )
        torch.save({"time_up": readout.time_up, "loss": readout.loss}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_all_ranks_stop_after_the_step_any_rank_ran_out_of_time(tmp_path: Path) -> None:
    """Each rank's clock crosses train.max_seconds at its own moment; they must end at one step."""
    mp.start_processes(_time_up_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["time_up"] for r in results] == [True, True]
    assert all(math.isclose(r["loss"], 1.5) for r in results)  # the loss still the ranks' mean
    one = read_step(torch.tensor(2.0), torch.tensor(True), torch.tensor([0.5, 3.0]))
    assert (one.time_up, one.loss, one.prototypes_used) == (False, 2.0, 3)


def test_a_batchnorm_group_that_does_not_divide_the_processes_is_refused_before_the_run(
    tmp_path: Path,
) -> None:
    data = write_image_folder(tmp_path / "images")
    result = run_cli(
        "pretrain", "--data", str(data), "--preset", "smoke", "--gpus", "0", "--procs", "3",
        "--set", "dist.sync_batchnorm_group=2", "--out", str(tmp_path / "run"),
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "dist.sync_batchnorm_group=2 must divide the number of processes (3)" in result.stderr
    assert not (tmp_path / "run").exists()
