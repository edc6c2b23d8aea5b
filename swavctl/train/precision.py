"""Which parts of the model keep float32 under mixed precision: the prototype scores.

Sinkhorn exponentiates ``scores / epsilon``: at epsilon 0.05 a score's rounding error is
multiplied by 20 before ``exp``. bf16 keeps 8 bits of mantissa, so a score near 1 is off by up to
2^-9, which moves its weight in the code by up to exp(20 * 2^-9) - 1 = 4% (4.8% measured for the
top code of 4096 samples near 3000 prototypes); the original's fp16 (apex O1) keeps 11 bits, 8x
finer (0.4%). The prototype layer is one K x D matrix product (3000 x 128 for the paper: under
1 GFLOP for a whole batch of crops), so computing it in float32 costs nothing measurable, and the
codes and the loss's logits then carry only the embeddings' rounding, which averages over the D
components instead of rounding their sum.

The model itself knows nothing of autocast (``swavctl/model``); :func:`keep_scores_fp32` changes
its prototype layer's class at the edge, in place, so the parameter, the state-dict keys and any
optimizer already holding the parameter are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swavctl.config import Settings
from swavctl.errors import UserError
from swavctl.model.swav import SwAV


class Float32Linear(nn.Linear):
    """An ``nn.Linear`` that computes in float32 under autocast (a float32 result from any input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def keep_scores_fp32(model: SwAV) -> SwAV:
    """Make ``model``'s prototype scores float32 under autocast, every set's (in place; returns
    ``model``)."""
    for layer in model.prototype_sets:
        if type(layer) is nn.Linear:
            layer.__class__ = Float32Linear
    return model


def autocast_dtype(settings: Settings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = full fp32).

    On a GPU ``auto`` is bf16. On a CPU ``auto`` is fp32 and ``bf16`` is bf16 (oneDNN's bf16
    kernels: on a CPU with AMX, convnet-tiny's training step took 0.36x the fp32 time,
    ``bench/cpu_bf16.py``); fp16 on a CPU is refused by :func:`check_precision` first.
    """
    precision = settings.train.precision
    if precision == "fp32" or (device.type != "cuda" and precision == "auto"):
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def check_precision(settings: Settings, device: torch.device) -> None:
    """Refuse ``train.precision = "fp16"`` on a CPU (its loss scaling and fp16 kernels are CUDA's)."""
    if device.type != "cuda" and settings.train.precision == "fp16":
        raise UserError(
            "train.precision=fp16 needs a CUDA GPU; on a CPU use bf16 (fast on CPUs with AMX) or fp32 "
            "(e.g. --set train.precision=bf16)"
        )
