"""LR schedule, LARC and the queue against the official semantics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from swavctl.queue import EmbeddingQueue
from swavctl.train.lars import LARC, parameter_groups
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
