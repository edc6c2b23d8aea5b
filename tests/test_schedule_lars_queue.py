"""LR schedule, LARC and the queue against the official semantics."""

from __future__ import annotations

import copy
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from swavctl.objective.queue import EmbeddingQueue
from swavctl.train.larc import LARC, parameter_groups
from swavctl.train.schedule import learning_rate, schedule_conflicts


def official_schedule(steps_per_epoch, epochs, base, final, warmup_epochs, start):  # type: ignore[no-untyped-def]
    warmup = np.linspace(start, base, steps_per_epoch * warmup_epochs)
    iters = np.arange(steps_per_epoch * (epochs - warmup_epochs))
    cosine = np.array(
        [
            final
            + 0.5
            * (base - final)
            * (1 + math.cos(math.pi * t / (steps_per_epoch * (epochs - warmup_epochs))))
            for t in iters
        ]
    )
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize(("warmup", "start"), [(10, 0.3), (0, 0.0), (2, 0.05)])
def test_schedule_matches_official_numpy(warmup: int, start: float) -> None:
    expected = official_schedule(7, 20, 4.8, 0.0048, warmup, start)
    got = [
        learning_rate(
            s,
            steps_per_epoch=7,
            epochs=20,
            base_lr=4.8,
            final_lr=0.0048,
            warmup_epochs=warmup,
            start_warmup_lr=start,
        )
        for s in range(len(expected))
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_schedule_conflicts_name_settings_that_cannot_take_effect() -> None:
    # The bs256 recipe's one-ImageNet-epoch freeze on 10k images at batch 256, for 100 epochs.
    small = dict(steps_per_epoch=39, epochs=100, warmup_epochs=0.0, queue_length=3840, queue_start_epoch=15)
    (freeze,) = schedule_conflicts(**small, freeze_prototypes_steps=5005)  # type: ignore[arg-type]
    assert "swav.freeze_prototypes_steps=5005 covers the whole run (3900 steps" in freeze
    assert schedule_conflicts(**small, freeze_prototypes_steps=3899) == []  # type: ignore[arg-type]
    late = schedule_conflicts(
        steps_per_epoch=10, epochs=2, warmup_epochs=5, freeze_prototypes_steps=0,
        queue_length=16, queue_start_epoch=2,
    )  # fmt: skip
    assert len(late) == 2 and "queue_start_epoch=2 is not before train.epochs=2" in late[0]
    assert "optim.warmup_epochs=5 exceeds train.epochs=2" in late[1]
    no_queue = schedule_conflicts(
        steps_per_epoch=10, epochs=2, warmup_epochs=2, freeze_prototypes_steps=0,
        queue_length=0, queue_start_epoch=15,
    )  # fmt: skip
    assert no_queue == []  # a start epoch without a queue, and a warmup of the whole run, are fine


@pytest.mark.parametrize("preset", ["smoke", "demo", "swav-rn50-800ep", "swav-rn50-400ep-bs256"])
def test_the_presets_have_no_schedule_conflict_on_their_data(preset: str) -> None:
    from swavctl import config

    s = config.resolve(preset=preset)
    steps = {"smoke": 4, "demo": 1438 // s.train.batch_size}.get(preset, 1_281_167 // 4096)
    assert schedule_conflicts(
        steps_per_epoch=steps, epochs=s.train.epochs, warmup_epochs=s.optim.warmup_epochs,
        freeze_prototypes_steps=s.swav.freeze_prototypes_steps, queue_length=s.swav.queue_length,
        queue_start_epoch=s.swav.queue_start_epoch,
    ) == []  # fmt: skip


def test_larc_matches_reference_formula() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3, bias=False))
    model[0].bias.data.zero_()  # zero-norm parameter: official quirk skips it entirely
    params = [p.detach().clone().double() for p in model.parameters()]
    x = torch.randn(8, 5)
    model(x).pow(2).sum().backward()
    grads = [p.grad.detach().clone().double() for p in model.parameters()]
    lr, wd, trust, momentum = 0.5, 1e-4, 0.001, 0.9
    sgd = torch.optim.SGD(
        parameter_groups(model, weight_decay=wd, exclude_bias_norm=False), lr=lr, momentum=momentum
    )
    LARC(sgd, trust_coefficient=trust).step()
    for before, grad, after in zip(params, grads, model.parameters(), strict=True):
        p_norm, g_norm = before.norm(), grad.norm()
        if p_norm != 0 and g_norm != 0:
            local = trust * p_norm / (g_norm + p_norm * wd + 1e-8)
            update = (grad + wd * before) * local
        else:
            update = grad  # no adaptation, no weight decay
        torch.testing.assert_close(after.detach().double(), before - lr * update, atol=1e-7, rtol=1e-6)
    assert sgd.param_groups[0]["weight_decay"] == wd  # restored after the step


def test_larc_clip_and_exclusion() -> None:
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    before_bias = model.bias.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    bias_grad = model.bias.grad.detach().clone()
    sgd = torch.optim.SGD(parameter_groups(model, weight_decay=0.1, exclude_bias_norm=True), lr=0.1)
    LARC(sgd, clip=True).step()
    # The excluded (1-D) bias gets a plain SGD step: no adaptation, no weight decay.
    torch.testing.assert_close(model.bias.detach(), before_bias - 0.1 * bias_grad)


@pytest.mark.parametrize("lars", [True, False])
def test_optim_lars_switches_larc_on_and_off(lars: bool) -> None:
    """``optim.lars = false`` is plain SGD with weight decay; true is not (LARC rescales the step)."""
    from swavctl import config
    from swavctl.train.build import build_model, build_optimizer

    settings = config.resolve(preset="smoke", flags={}, overrides=[f"optim.lars={str(lars).lower()}"])
    model = build_model(settings)
    reference = copy.deepcopy(model)
    images = torch.randn(4, 3, 32, 32)
    for net in (model, reference):
        net.backbone(images).pow(2).mean().backward()
    optimizer = build_optimizer(model, settings)
    optimizer.step()
    plain = torch.optim.SGD(
        reference.parameters(), lr=settings.optim.base_lr, weight_decay=settings.optim.weight_decay
    )
    plain.step()
    trained = [p for p in model.parameters() if p.grad is not None]
    same = all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(trained, [p for p in reference.parameters() if p.grad is not None], strict=True)
    )
    assert same is not lars


def test_queue_fifo_and_state() -> None:
    queue = EmbeddingQueue(2, 6, 3)
    assert not queue.is_full
    for i in range(3):
        for slot in range(2):
            queue.push(slot, torch.full((2, 3), float(10 * slot + i)))
    assert queue.is_full
    # Newest first, as in the official code.
    assert queue.buffer[0, :, 0].tolist() == [2, 2, 1, 1, 0, 0]
    assert queue.buffer[1, :, 0].tolist() == [12, 12, 11, 11, 10, 10]
    protos = torch.eye(3)
    torch.testing.assert_close(queue.scores(1, protos), queue.buffer[1])
    copy = EmbeddingQueue(2, 6, 3)
    copy.load_state_dict(queue.state_dict())
    assert copy.is_full and torch.equal(copy.buffer, queue.buffer)
    with pytest.raises(ValueError):
        EmbeddingQueue(2, 4, 3).load_state_dict(queue.state_dict())


# ---------------------------------------------------------------------------------------------
# Schedule corners


def _lr(step: int, *, steps_per_epoch: int = 7, epochs: int = 3, warmup_epochs: float = 0.0) -> float:
    return learning_rate(
        step,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        base_lr=1.0,
        final_lr=0.01,
        warmup_epochs=warmup_epochs,
        start_warmup_lr=0.1,
    )


@pytest.mark.parametrize(("steps_per_epoch", "warmup_epochs", "warmup_steps"), [(7, 0.5, 4), (10, 0.34, 3)])
def test_fractional_warmup_rounds_to_the_nearest_step(
    steps_per_epoch: int, warmup_epochs: float, warmup_steps: int
) -> None:
    """``W = round(steps_per_epoch * warmup_epochs)`` (3.5 -> 4, 3.4 -> 3): a linspace from the start
    to the base rate over W steps, then the cosine from the base rate over the remaining steps."""
    got = [_lr(s, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs) for s in range(40)]
    warmup = np.linspace(0.1, 1.0, warmup_steps)
    decay = steps_per_epoch * 3 - warmup_steps
    np.testing.assert_allclose(got[:warmup_steps], warmup, rtol=1e-12, atol=1e-12)
    for t in range(decay):
        expected = 0.01 + 0.5 * (1.0 - 0.01) * (1 + math.cos(math.pi * t / decay))
        assert got[warmup_steps + t] == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_one_step_warmup_starts_at_the_warmup_rate() -> None:
    """A warmup of one step is ``numpy.linspace(start, base, 1) == [start]``, then the cosine at base."""
    assert _lr(0, steps_per_epoch=4, warmup_epochs=0.25) == 0.1
    assert _lr(1, steps_per_epoch=4, warmup_epochs=0.25) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(
        [_lr(s, steps_per_epoch=4, warmup_epochs=0.25) for s in range(12)],
        [0.1] + [0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * t / 11)) for t in range(11)],
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_past_the_end_the_rate_stays_final_without_climbing_back(warmup_epochs: float) -> None:
    """Steps past ``steps_per_epoch * epochs`` keep ``final_lr``; the decay never rises again."""
    total = 7 * 3
    after_warmup = [_lr(s, warmup_epochs=warmup_epochs) for s in range(round(7 * warmup_epochs), 3 * total)]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:], strict=False))
    assert _lr(total - 1, warmup_epochs=warmup_epochs) > 0.01
    for step in (total, total + 1, total + 5, 2 * total, 10 * total):
        assert _lr(step, warmup_epochs=warmup_epochs) == pytest.approx(0.01, rel=0, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# LARC with a large weight decay and in clip mode


def _larc_case(seed: int, grad_scale: float) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A bias-free Linear with unit-norm weights and a gradient of norm ``grad_scale``."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.div_(model.weight.norm())
    model(torch.randn(6, 4)).pow(2).sum().backward()
    with torch.no_grad():
        model.weight.grad.mul_(grad_scale / model.weight.grad.norm())
    return model, model.weight.detach().clone().double(), model.weight.grad.detach().clone().double()


def test_larc_weight_decay_enters_the_trust_ratio_denominator() -> None:
    """``local = trust * ||p|| / (||g|| + wd * ||p|| + eps)`` with wd = 0.1 and ||g|| = 0.1, where the
    decay term doubles the denominator; the update is ``lr * (g + wd * p) * local``."""
    model, before, grad = _larc_case(seed=2, grad_scale=0.1)
    lr, wd, trust = 0.5, 0.1, 0.001
    sgd = torch.optim.SGD(parameter_groups(model, weight_decay=wd, exclude_bias_norm=False), lr=lr)
    LARC(sgd, trust_coefficient=trust).step()
    local = trust * before.norm() / (grad.norm() + wd * before.norm() + 1e-8)
    without_decay_term = trust * before.norm() / (grad.norm() + 1e-8)
    assert float(local) == pytest.approx(float(without_decay_term) / 2, rel=1e-6)  # the term matters
    expected = before - lr * (grad + wd * before) * local
    torch.testing.assert_close(model.weight.detach().double(), expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize(("trust", "clipped"), [(0.001, False), (10.0, True)])
def test_larc_clip_mode_caps_the_adapted_rate_at_the_learning_rate(trust: float, clipped: bool) -> None:
    """Clip mode on a weight that is not excluded: the effective rate is
    ``lr * min(trust * ||p|| / (||g|| + wd * ||p||) / lr, 1)``, i.e. never above ``lr``."""
    model, before, grad = _larc_case(seed=3, grad_scale=0.3)
    lr, wd = 0.1, 0.1
    groups = parameter_groups(model, weight_decay=wd, exclude_bias_norm=True)
    assert groups[0]["params"] == [model.weight] and not groups[0]["lars_exclude"]
    sgd = torch.optim.SGD(groups, lr=lr)
    LARC(sgd, trust_coefficient=trust, clip=True).step()
    ratio = trust * before.norm() / (grad.norm() + wd * before.norm() + 1e-8) / lr
    assert bool(ratio > 1) is clipped
    effective_lr = lr * min(float(ratio), 1.0)
    expected = before - effective_lr * (grad + wd * before)
    torch.testing.assert_close(model.weight.detach().double(), expected, atol=1e-9, rtol=1e-7)
    assert sgd.param_groups[0]["weight_decay"] == wd  # restored after the step


# ---------------------------------------------------------------------------------------------
# Queue length per rank, and a partially filled queue's state


def _queue_settings(queue_length: int, batch_size: int):  # type: ignore[no-untyped-def]
    from swavctl import config

    return config.resolve(
        preset="smoke", overrides=[f"swav.queue_length={queue_length}", f"train.batch_size={batch_size}"]
    )


@pytest.mark.parametrize(
    ("requested", "batch", "world", "per_rank", "warned"),
    [
        (3840, 100, 4, 900, True),  # global batch 400: 3840 -> 3600 in all, 900 per rank
        (3840, 256, 1, 3840, False),  # already 15 global batches
        (3840, 128, 3, 1280, False),  # 3840 = 10 x 384, split over 3 ranks
        (1000, 300, 1, 900, True),
        (0, 100, 4, 0, False),  # no queue
    ],
)
def test_queue_length_is_rounded_down_to_the_global_batch_and_split(
    requested: int, batch: int, world: int, per_rank: int, warned: bool
) -> None:
    """The global length is rounded down to a multiple of ``batch_size * world`` (one warning when
    it changes) and each rank holds ``rounded / world`` rows."""
    from swavctl.objective.queue import queue_length_per_rank

    warnings: list[str] = []
    got = queue_length_per_rank(_queue_settings(requested, batch), world, warnings.append)
    assert got == per_rank
    assert len(warnings) == int(warned)
    if warned:
        assert f"{requested} rounded down to {per_rank * world}" in warnings[0]


def test_queue_length_below_the_global_batch_is_an_error() -> None:
    """A requested length shorter than one global batch would round to 0: a UserError, no warning."""
    from swavctl.errors import UserError
    from swavctl.objective.queue import queue_length_per_rank

    warnings: list[str] = []
    with pytest.raises(UserError, match="smaller than the global batch 400"):
        queue_length_per_rank(_queue_settings(399, 100), 4, warnings.append)
    assert warnings == []


def test_partially_filled_queue_round_trips_as_not_full() -> None:
    """``filled`` counts rows once per batch (not per slot), and survives a state round trip: a
    restored partial queue is still not full and fills after the same number of pushes."""
    queue = EmbeddingQueue(2, 6, 3)
    for slot in range(2):
        queue.push(slot, torch.full((2, 3), float(slot + 1)))
    assert queue.filled == 2 and not queue.is_full
    state = queue.state_dict()
    queue.push(0, torch.full((2, 3), 9.0))  # the saved state is a copy
    assert bool((state["buffer"][0, :2] == 1).all())
    restored = EmbeddingQueue(2, 6, 3)
    restored.load_state_dict(state)
    assert restored.filled == 2 and not restored.is_full
    assert torch.equal(restored.buffer, state["buffer"])
    for _ in range(2):
        assert not restored.is_full
        for slot in range(2):
            restored.push(slot, torch.zeros(2, 3))
    assert restored.is_full and restored.filled == 6


# ---------------------------------------------------------------------------------------------
# Checkpoint purge: stale temporary files


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_purge_removes_dead_writers_temp_files_and_keeps_live_ones(tmp_path: Path) -> None:
    """After a commit, temp files of a dead writer's pid go; this process's own and other live
    processes' temp files stay, as do names without a pid; an older never-committed state goes."""
    from swavctl.weights import checkpoint as ckpt

    ckpt.save_checkpoint(tmp_path, 3, 0, {"x": torch.zeros(1)}, keep=1)
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    dead, alive, parent = _dead_pid(), os.getpid(), os.getppid()
    names = {
        "dead": f".step-000000011.pt.tmp-{dead}",
        "dead_json": f".step-000000011.json.tmp-{dead}",
        "own": f".step-000000011.pt.tmp-{alive}",
        "parent": f".step-000000012.pt.tmp-{parent}",
        "no_pid": ".step-000000011.pt.tmp-abc",
        "old_uncommitted": "step-000000005.pt",
        "new_uncommitted": "step-000000020.pt",
    }
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    ckpt.save_checkpoint(tmp_path, 9, 1, {"x": torch.ones(1)}, keep=1)
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted(
        [
            names["own"],
            names["parent"],
            names["no_pid"],
            names["new_uncommitted"],
            "step-000000009.json",
            "step-000000009.pt",
        ]
    )
