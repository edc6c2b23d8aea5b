"""What the ranks agree on around each training step: one small collective before it, one after.

Before a step (:func:`agree_on_step_start`): the stop signals any rank received, whether some
rank's batch is empty, the global batch and the skipped files. After it (:func:`read_step`): the
finiteness of every rank's loss and gradients, the global loss and whether time is up, in the
step's single device-to-host read. Every rank gets the same answers, so all ranks checkpoint,
skip, stop and count alike, and none is left waiting in a collective the others skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swavctl.distributed import dist
from swavctl.distributed.stop import STOP_SIGNALS, StopFlag


@dataclass(frozen=True)
class StepReadout:
    """What the host learns of a step, read back once (see :func:`read_step`)."""

    bad_loss: list[int]  # ranks whose loss is not finite
    bad_grads: list[int]  # ranks with a non-finite gradient
    loss: float  # the mean of the ranks' losses: the loss of the global batch (NaN if any is bad)
    code_entropy: float  # this rank's, from health.code_statistics
    prototypes_used: int  # this rank's
    time_up: bool  # some rank is past train.max_seconds: every rank ends the run after this step


def grads_finite(model: torch.nn.Module) -> torch.Tensor:
    """A bool tensor on the parameters' device: every gradient is finite (no host read)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=next(model.parameters()).device)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def read_step(
    loss: torch.Tensor, grads_ok: torch.Tensor, code_stats: torch.Tensor, *, time_up: bool = False
) -> StepReadout:
    """The step's single device-to-host read, and with a process group its single collective.

    Every value the host needs from a step (the finiteness checks, the loss, the code statistics)
    is stacked on the device and read with one ``tolist``. Each separate ``float(tensor)`` /
    ``bool(tensor)`` on a GPU is a synchronisation after which the GPU idles until the host queues
    more work. The loop used to make five per step (besides Sinkhorn's underflow check), the last
    one after the optimizer step, so the host's work on the next batch (loading, decoding, queueing
    the augmentation) never overlapped the GPU's optimizer step.

    ``time_up`` (this rank's clock is past ``train.max_seconds``) rides along, so all ranks end the
    run after the same step: each rank's own clock could cross the limit a step apart, and the
    rank that stopped first would leave the others waiting in a collective.
    """
    value = loss.detach().to(torch.float64).reshape(())
    world, rank = dist.world_size(), dist.rank()  # 1 and 0 without a process group
    # Per rank: loss not finite, gradients not finite; then time up and the loss, summed over the ranks.
    shared = torch.zeros(2 * world + 2, dtype=torch.float64, device=value.device)
    shared[rank] = (~torch.isfinite(value)).to(torch.float64)
    shared[world + rank] = (~grads_ok.reshape(())).to(torch.float64)
    shared[-2] = float(time_up)
    shared[-1] = value
    dist.all_reduce_sum(shared)  # a no-op on one process
    flat = torch.cat([shared, code_stats.to(torch.float64)]).tolist()
    return StepReadout(
        bad_loss=[r for r in range(world) if flat[r]],
        bad_grads=[r for r in range(world) if flat[world + r]],
        loss=flat[2 * world + 1] / world,
        code_entropy=flat[-2],
        prototypes_used=int(flat[-1]),
        time_up=bool(flat[2 * world]),
    )


@dataclass(frozen=True)
class StepStart:
    """What every rank agrees on before a step (see :func:`agree_on_step_start`)."""

    signals: set[int]  # the stop signals any rank received
    any_empty: bool  # some rank's batch has no readable image: all ranks skip the step
    images: int  # the global batch: the images all ranks read for this step
    skipped: int  # the files all ranks could not read for this step


def agree_on_step_start(stop: StopFlag, images: int, skipped: int, device: torch.device) -> StepStart:
    """One collective (a sum over ranks) before each step, so all ranks checkpoint, skip and count alike.

    The global batch weighs each rank's loss when files were skipped and the ranks' batches differ
    in size; the skipped count makes ``skipped_images`` the run's, not rank 0's.
    """
    local = [float(s in stop.received) for s in STOP_SIGNALS]
    local += [float(images == 0), float(images), float(skipped)]
    if dist.is_distributed():
        tensor = torch.tensor(local, dtype=torch.float64, device=device)
        dist.all_reduce_sum(tensor)
        local = tensor.tolist()
    *flags, empty, total, dropped = local
    return StepStart(
        signals={int(s) for s, v in zip(STOP_SIGNALS, flags, strict=True) if v},
        any_empty=bool(empty),
        images=int(total),
        skipped=int(dropped),
    )
