"""``swavctl bench step``: training steps alone, on synthetic batches of the configured crops.

Each step is the pretrain loop's step: normalise the prototypes, forward all crops under the
loop's autocast (one backbone pass per run of equal-size crops), Sinkhorn codes and the swapped
prediction loss (:class:`~swavctl.objective.swav.SwAVObjective`), backward, the prototype
freeze, the finiteness check, and the LARC/SGD step, with the loop's model, optimizer,
precision, ``channels_last`` and ``compile`` rules. The crops are random tensors made once on
the device, so no data loading is measured. With a queue (``swav.queue_length``), the step is
the one after ``swav.queue_start_epoch``: the queue is full (of random unit embeddings), and each
assignment crop's Sinkhorn runs on the queue's rows and the batch's, as in the loop. The queue
is this process's share of the run's (``dist.gpus``, or ``dist.procs``, processes).

The phases are timed separately (the device is synchronised between them, which costs a little
overlap): ``forward_backward`` is the forward, backward and optimizer step; ``sinkhorn_loss`` is
the codes and the loss. ``samples_per_s`` is the batch size over the whole step time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swavctl.bench.common import RN50_SWAV_FLOP_PER_SAMPLE, crops_label, sync
from swavctl.config import Settings
from swavctl.distributed.agreement import grads_finite
from swavctl.distributed.device import pick_devices
from swavctl.distributed.launch import processes_asked
from swavctl.errors import UserError
from swavctl.model.swav import SwAV
from swavctl.objective import StepInputs, SwAVObjective
from swavctl.objective.queue import queue_length_per_rank
from swavctl.train.build import build_model as build_swav
from swavctl.train.build import build_optimizer, crop_specs
from swavctl.train.larc import LARC
from swavctl.train.precision import autocast_dtype


@dataclass
class StepBenchResult:
    arch: str
    batch_size: int
    crops: str
    device: str
    precision: str
    channels_last: bool
    compile: bool
    steps: int
    first_step_s: float  # the first warm-up step (compilation, allocator and kernel selection)
    step_ms: float  # median over the measured steps
    forward_backward_ms: float
    sinkhorn_loss_ms: float
    samples_per_s: float
    forward_backward_samples_per_s: float
    sinkhorn_loss_samples_per_s: float
    queue_rows: int  # rows of the (full) queue per assignment crop in this process; 0 without a queue
    first_loss: float  # the loss of the first step (equal weights and crops in every run of a setting)
    final_loss: float
    mfu: float | None  # model FLOP utilisation (ResNet-50 at the paper's crops on a GPU), else None
    peak_tflops: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def build_model(settings: Settings, device: torch.device) -> tuple[SwAV, nn.Module, LARC, bool]:
    """(model, the module to call, optimizer, channels_last) as the pretrain loop builds them."""
    model = build_swav(settings)
    model.to(device)
    channels_last = settings.train.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(model, settings)
    train_model: nn.Module = model
    if settings.train.compile:
        train_model = torch.compile(model)  # type: ignore[assignment]
    return model, train_model, optimizer, channels_last


def synthetic_crops(
    settings: Settings, device: torch.device, *, channels_last: bool, seed: int = 0
) -> list[torch.Tensor]:
    """One normalised-looking random batch per crop (standard normal values)."""
    g = torch.Generator().manual_seed(seed)
    bs = settings.train.batch_size
    crops = [torch.randn(bs, 3, c.size, c.size, generator=g).to(device) for c in crop_specs(settings)]
    if channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    return crops


def objective_in_use(settings: Settings, model: SwAV, device: torch.device) -> SwAVObjective:
    """The SwAV objective as the loop has it from ``swav.queue_start_epoch`` on: its queue (this
    process's share, when there is one) full of random unit embeddings, and in use."""
    world = processes_asked(settings.dist.gpus, settings.dist.procs)
    length = queue_length_per_rank(settings, world, lambda _: None)
    objective = SwAVObjective.from_settings(settings, queue_per_rank=length)
    if objective.queue is not None:
        queue = objective.queue
        g = torch.Generator().manual_seed(1)
        queue.buffer = F.normalize(torch.randn(queue.buffer.shape, generator=g), dim=-1)
        queue.filled = length
    objective.to(device).start_epoch(settings.swav.queue_start_epoch, model)
    return objective


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs, in TFLOP/s (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("V100", 125.0)):
        if key in name:
            return value
    return None


class StepRunner:
    """The pretrain loop's step on fixed synthetic crops; :meth:`step` returns its phase times."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = pick_devices(settings.dist.gpus)[0]
        self.model, self.train_model, self.optimizer, self.channels_last = build_model(settings, self.device)
        self.amp_dtype = autocast_dtype(settings, self.device)
        self.crops = synthetic_crops(settings, self.device, channels_last=self.channels_last)
        self.objective = objective_in_use(settings, self.model, self.device)
        self.queue = self.objective.queue  # this process's share of the run's queue (None without)
        self.steps_done = 0
        self.loss = float("nan")
        self.first_loss = float("nan")

    def step(self) -> tuple[float, float]:
        """One training step: (forward + backward + optimizer seconds, Sinkhorn + loss seconds)."""
        device, objective, model = self.device, self.objective, self.model
        amp = self.amp_dtype
        batch_size = self.settings.train.batch_size
        sync(device)
        t0 = time.perf_counter()
        objective.before_forward(model)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            embeddings, scores = self.train_model(self.crops)
        sync(device)
        t1 = time.perf_counter()
        out = objective(
            StepInputs(embeddings, scores, model.prototypes.weight, batch_size, range(batch_size))
        )
        sync(device)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        objective.after_backward(model, self.steps_done)
        finite = bool(torch.isfinite(out.loss.detach()) & grads_finite(model))
        self.optimizer.step()
        self.loss = float(out.loss.detach())
        sync(device)
        t3 = time.perf_counter()
        if not finite:
            raise UserError(f"non-finite loss or gradients at benchmark step {self.steps_done}")
        if self.steps_done == 0:
            self.first_loss = self.loss
        self.steps_done += 1
        return (t1 - t0) + (t3 - t2), t2 - t1


def bench_step(
    settings: Settings, *, steps: int = 10, warmup: int = 2, max_seconds: float | None = None
) -> StepBenchResult:
    """Time ``steps`` training steps after ``warmup`` untimed ones (medians over the timed steps)."""
    if steps < 1 or warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    runner = StepRunner(settings)
    fb: list[float] = []
    sl: list[float] = []
    first_step = 0.0
    started = time.perf_counter()
    for i in range(warmup + steps):
        a, b = runner.step()
        if i == 0:
            first_step = a + b
        if i >= warmup:
            fb.append(a)
            sl.append(b)
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                break
    return summarize(settings, runner, fb, sl, first_step)


def summarize(
    settings: Settings, runner: StepRunner, fb: list[float], sl: list[float], first_step: float
) -> StepBenchResult:
    """Medians of the phase times as a :class:`StepBenchResult`."""
    bs = settings.train.batch_size
    device = runner.device
    fb_s, sl_s = statistics.median(fb), statistics.median(sl)
    step_s = statistics.median(a + b for a, b in zip(fb, sl, strict=True))
    sps = bs / step_s
    peak = peak_tflops(device)
    is_paper = settings.model.arch == "resnet50" and crops_label(settings) == "2x224+6x96"
    amp = runner.amp_dtype
    return StepBenchResult(
        arch=settings.model.arch,
        batch_size=bs,
        crops=crops_label(settings),
        device=str(device),
        precision=str(amp).replace("torch.", "") if amp is not None else "float32",
        channels_last=runner.channels_last,
        compile=settings.train.compile,
        steps=len(fb),
        first_step_s=first_step,
        step_ms=1000 * step_s,
        forward_backward_ms=1000 * fb_s,
        sinkhorn_loss_ms=1000 * sl_s,
        samples_per_s=sps,
        forward_backward_samples_per_s=bs / fb_s,
        sinkhorn_loss_samples_per_s=bs / sl_s,
        queue_rows=runner.queue.length if runner.queue is not None else 0,
        first_loss=runner.first_loss,
        final_loss=runner.loss,
        mfu=sps * RN50_SWAV_FLOP_PER_SAMPLE / (peak * 1e12) if (peak and is_paper) else None,
        peak_tflops=peak,
    )
