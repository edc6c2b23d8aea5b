"""Synchronized batch normalization that also runs on CPUs (gloo), for multi-process training.

SwAV normalizes with statistics over the global batch (the paper trains with SyncBatchNorm,
arXiv 2006.09882, App. A). ``torch.nn.SyncBatchNorm`` only accepts GPU tensors, so on GPUs we use
it, and elsewhere this module: with N samples over all ranks, per channel

    mean = sum_r sum_i x_ri / N,   var = sum_r sum_i (x_ri - mean)^2 / N        (two all-reduces)
    y = (x - mean) / sqrt(var + eps) * weight + bias

and the running variance takes the unbiased ``var * N / (N - 1)``, as BatchNorm does. Backward,
with xhat = (x - mean) / sqrt(var + eps) and the all-reduced sums of dy and dy * xhat,

    dx = weight / sqrt(var + eps) * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)

while dweight = sum_i dy * xhat and dbias = sum_i dy stay local (DDP averages them). Statistics
are accumulated in float64, so 2 ranks x B/2 equal 1 rank x B to rounding.

With a ``process_group`` the sums run over that group's ranks only (the official 800-epoch run
normalised over groups of 8 GPUs: apex's ``syncbn_process_group_size``; ``dist.sync_batchnorm_group``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from swavctl.distributed import dist


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _shape(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return stat.view(1, -1, *([1] * (x.dim() - 2)))


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        momentum: float,
        group: Any,
    ) -> torch.Tensor:
        dims = _channel_dims(x)
        x64 = x.double()
        local = torch.cat(
            [
                x64.sum(dims),
                torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=torch.float64, device=x.device),
            ]
        )
        dist.all_reduce_sum(local, group)
        count = float(local[-1])
        if count < 2:
            raise ValueError(f"expected more than 1 value per channel over all ranks, got {count:.0f}")
        mean = local[:-1] / count
        centered = x64 - _shape(mean, x)
        var = dist.all_reduce_sum((centered * centered).sum(dims), group) / count
        invstd = torch.rsqrt(var + eps)
        xhat = centered * _shape(invstd, x)
        out = xhat
        if weight is not None:
            out = out * _shape(weight.double(), x)
        if bias is not None:
            out = out + _shape(bias.double(), x)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * count / (count - 1)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(xhat.to(x.dtype), weight, invstd)
        ctx.count = count
        ctx.group = group
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        xhat, weight, invstd = ctx.saved_tensors
        dims = _channel_dims(grad_out)
        dy = grad_out.double()
        xhat64 = xhat.double()
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat64).sum(dims)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(grad_out.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = dist.all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            channels = sum_dy.numel()
            mean_dy = _shape(both[:channels] / ctx.count, dy)
            mean_dy_xhat = _shape(both[channels:] / ctx.count, dy)
            scale = invstd if weight is None else invstd * weight.double()
            grad_x = (_shape(scale, dy) * (dy - mean_dy - xhat64 * mean_dy_xhat)).to(grad_out.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all ranks (or of ``process_group``'s); plain BatchNorm
    without a process group or in eval."""

    process_group: Any = None  # None: every rank

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = self.training and self.track_running_stats
        if not (use_batch_stats and dist.is_distributed()):
            return F.batch_norm(
                input,
                self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight,
                self.bias,
                use_batch_stats,
                factor,
                self.eps,
            )
        return _SyncBatchNormFunction.apply(  # type: ignore[no-any-return]
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.eps,
            factor,
            self.process_group,
        )


def convert_sync_batchnorm(module: nn.Module, *, device_type: str, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer with a synchronized one (torch's on CUDA, ours elsewhere).

    The statistics are reduced over ``process_group`` (None: every rank). Parameters and buffers
    are carried over, so state-dict keys do not change.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        converted.process_group = process_group
    for name, child in module.named_children():
        converted.add_module(
            name, convert_sync_batchnorm(child, device_type=device_type, process_group=process_group)
        )
    return converted
