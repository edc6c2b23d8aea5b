"""The pretraining loop: data, model, optimizer, resume, steps, checkpoints and the final export.

Devices, DDP, autocast and checkpoints are handled here, at the edge; the model and the math
modules know nothing of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from swavctl import dist
from swavctl.config import Settings, to_toml
from swavctl.data.augment import AugmentSpec, PerImageMultiCrop, expand_crops
from swavctl.data.dataset import Batch, PretrainDataset, collate, sample_seed
from swavctl.data.demo import resolve_data_path
from swavctl.data.images import BadImage, list_images, resolve_image_root
from swavctl.data.sampler import EpochBatchSampler, steps_per_epoch
from swavctl.errors import UserError
from swavctl.model.swav import SwAV
from swavctl.queue import EmbeddingQueue
from swavctl.train import checkpoint as ckpt
from swavctl.train import rng
from swavctl.train.health import CollapseDetector, MetricsLog, code_statistics
from swavctl.train.lars import LARC, parameter_groups
from swavctl.train.run_dir import (
    RESOLVED_FILE,
    SUMMARY_FILE,
    incompatible_changes,
    point_latest,
    read_resolved,
    select_run_dir,
    settings_diff,
)
from swavctl.train.schedule import learning_rate
from swavctl.train.step import swav_loss_from_outputs

EXIT_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Reporter(Protocol):
    """What the loop tells the outside world (the CLI renders it)."""

    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def start(self, total_steps: int, done_steps: int) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class QuietReporter:
    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def start(self, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = EXIT_SIGNAL.get(signal.Signals(signum), 128 + signum)
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; checkpoint {checkpoint}")


class NonFiniteError(Exception):
    """Loss or gradients became NaN/Inf; the last good checkpoint stays."""


@dataclass
class Summary:
    out_dir: str
    steps: int
    epochs_done: float
    final_loss: float | None
    samples_per_s: float
    skipped_images: int
    images: int
    checkpoint: str | None
    backbone: str | None
    resumed_from_step: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        data.update(self.extra)
        return data


# ---------------------------------------------------------------------------------------------


def pick_device(settings: Settings) -> torch.device:
    gpus = settings.dist.gpus
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    if gpus > 0:
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {gpus} asked for, but CUDA is not available (use --gpus 0 for the CPU)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(settings: Settings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = full fp32). The CPU always runs fp32."""
    if device.type != "cuda" or settings.train.precision == "fp32":
        return None
    return torch.float16 if settings.train.precision == "fp16" else torch.bfloat16


class _StopFlag:
    """Signal handlers that only record the signal; the loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


def _data_paths(settings: Settings, reporter: Reporter) -> tuple[Path, list[Path]]:
    if not settings.data.path:
        raise UserError("no data: pass --data DIR (or --data demo, or --preset demo)")
    folder, used_train = resolve_image_root(resolve_data_path(settings.data.path))
    if used_train:
        reporter.info(f"found train/ in {folder.parent}: pretraining on {folder}")
    paths = list_images(folder)
    if settings.data.max_images:
        paths = paths[: settings.data.max_images]
    return folder, paths


def _queue_length_per_rank(settings: Settings, world: int, reporter: Reporter) -> int:
    """Official rule: the global length is rounded down to a multiple of the global batch."""
    requested = settings.swav.queue_length
    if requested == 0:
        return 0
    global_batch = settings.train.batch_size * world
    rounded = requested - requested % global_batch
    if rounded == 0:
        raise UserError(
            f"swav.queue_length {requested} is smaller than the global batch {global_batch}; "
            "make it a multiple of the global batch"
        )
    if rounded != requested:
        reporter.warn(
            f"swav.queue_length {requested} rounded down to {rounded}, a multiple of the global batch {global_batch}"
        )
    return rounded // world


def _freeze_prototype_grads(model: SwAV) -> None:
    for param in model.prototypes.parameters():
        param.grad = None


def _grads_finite(model: nn.Module) -> torch.Tensor:
    flags = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def _export_backbone(model: SwAV, path: Path, settings: Settings, step: int, epoch: int) -> None:
    from swavctl.export import write_export

    write_export(model, path, settings=settings, step=step, epoch=epoch, with_head=False)


def pretrain(
    settings: Settings,
    *,
    reporter: Reporter | None = None,
    fresh: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Summary:
    """Run (or resume) SwAV pretraining with ``settings``; returns the run's summary.

    Raises :class:`UserError` for bad input, :class:`Interrupted` after a signal-triggered
    checkpoint, and :class:`NonFiniteError` when the loss or gradients stop being finite.
    """
    reporter = reporter or QuietReporter()
    world, rank = dist.world_size(), dist.rank()
    device = pick_device(settings)
    image_root, paths = _data_paths(settings, reporter)
    global_batch = settings.train.batch_size * world
    steps_epoch = steps_per_epoch(len(paths), settings.train.batch_size, world)
    if steps_epoch == 0:
        raise UserError(
            f"{len(paths)} images under {image_root} are fewer than one global batch of {global_batch}; "
            "lower --batch-size"
        )

    run_dir, reused = select_run_dir(settings, fresh=fresh)
    if dist.is_distributed():
        run_dir = Path(_broadcast_str(str(run_dir.resolve())))
    settings = settings.model_copy(update={"out": str(run_dir)})
    if reused:
        reporter.info(f"re-running the unfinished run in {run_dir}")
    previous = read_resolved(run_dir)
    if fresh and dist.is_main():
        old = run_dir / ckpt.CHECKPOINT_DIR
        if old.is_dir() and any(old.iterdir()):
            aside = run_dir / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            old.rename(aside)
            reporter.warn(f"--fresh: earlier checkpoints moved to {aside}")
    dist.barrier()

    queue_per_rank = _queue_length_per_rank(settings, world, reporter)
    if global_batch + settings.swav.queue_length < settings.model.prototypes:
        reporter.warn(
            f"global batch {global_batch} + queue {settings.swav.queue_length} < {settings.model.prototypes} "
            "prototypes: the equal-partition constraint cannot fill every prototype each step and clusters "
            "will go empty; use a larger batch, a queue, or fewer prototypes"
        )

    # ----- model and optimizer
    torch.manual_seed(settings.train.seed)
    model = SwAV(
        settings.model.arch,
        settings.model.hidden_dim,
        settings.model.embedding_dim,
        settings.model.prototypes,
    )
    if world > 1 and settings.dist.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
    model.to(device)
    channels_last = device.type == "cuda" and settings.train.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    sgd = torch.optim.SGD(
        parameter_groups(
            model,
            weight_decay=settings.optim.weight_decay,
            exclude_bias_norm=settings.optim.lars_exclude_bias_norm,
        ),
        lr=settings.optim.base_lr,
        momentum=settings.optim.momentum,
    )
    optimizer = LARC(sgd, trust_coefficient=settings.optim.lars_trust, clip=settings.optim.lars_clip)
    amp_dtype = autocast_dtype(settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    queue = (
        EmbeddingQueue(len(settings.swav.assignment_crops), queue_per_rank, settings.model.embedding_dim).to(device)
        if queue_per_rank
        else None
    )
    health = CollapseDetector(
        settings.model.prototypes,
        tolerance=settings.health.collapse_tolerance,
        patience=settings.health.collapse_patience,
        warmup_steps=round(settings.optim.warmup_epochs * steps_epoch),
    )

    # ----- resume
    step = 0
    skipped_total = 0
    resumed_from: int | None = None
    found = ckpt.latest_checkpoint(run_dir, warn=reporter.warn)
    if found is not None:
        checkpoint, state = found
        saved = state.get("settings")
        if previous is None and isinstance(saved, str):
            from swavctl.config import from_toml_text

            previous = from_toml_text(saved, source=str(checkpoint.state_path))
        if previous is not None:
            bad = incompatible_changes(
                previous, settings, old_world=int(state.get("world_size", 1)), new_world=world
            )
            if bad:
                listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in bad.items()))
                raise UserError(
                    f"cannot resume {run_dir}: settings changed the meaning of the saved state ({listing}); "
                    "use --fresh to start over or another --out"
                )
            changed = settings_diff(previous, settings)
            if changed:
                reporter.warn("resuming with changed settings: " + ", ".join(sorted(changed)))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if queue is not None and state.get("queues") is not None:
            queue.load_state_dict(state["queues"][rank])
        health.load_state_dict(state["health"])
        rng.restore(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        step = int(state["step"])
        skipped_total = int(state.get("skipped_images", 0))
        resumed_from = step
        reporter.info(f"resuming from {checkpoint.state_path} (step {step})")

    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESOLVED_FILE).write_text(to_toml(settings))
        point_latest(run_dir)
        (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if dist.is_main():
        metrics.truncate_after(step)
    dist.barrier()

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if settings.train.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    crops = expand_crops(
        settings.data.crop_counts, settings.data.crop_sizes, settings.data.min_scales, settings.data.max_scales
    )
    aug = settings.data.augment
    augment = AugmentSpec(
        flip_prob=aug.flip_prob,
        jitter_prob=aug.jitter_prob,
        brightness=aug.brightness,
        contrast=aug.contrast,
        saturation=aug.saturation,
        hue=aug.hue,
        grayscale_prob=aug.grayscale_prob,
        blur_prob=aug.blur_prob,
        blur_sigma_min=aug.blur_sigma_min,
        blur_sigma_max=aug.blur_sigma_max,
        mean=aug.mean,
        std=aug.std,
    )
    on_device = settings.data.augment_on == "device"
    dataset = PretrainDataset(
        paths,
        seed=settings.train.seed,
        transform=None if on_device else PerImageMultiCrop(crops, augment),
        strict=settings.data.on_bad_image == "error",
    )

    total_steps = steps_epoch * settings.train.epochs
    if settings.train.max_steps is not None:
        total_steps = min(total_steps, settings.train.max_steps)
    num_crops = len(crops)
    bs = settings.train.batch_size
    last_loss: float | None = None
    last_checkpoint: Path | None = None
    checkpoint_step = step if resumed_from is not None else -1
    samples_seen = 0
    started = time.perf_counter()
    reporter.start(total_steps, step)
    reporter.info(
        f"{len(paths)} images, {steps_epoch} steps/epoch, global batch {global_batch}, "
        f"{num_crops} crops {settings.data.crop_counts}x{settings.data.crop_sizes}, device {device}, world {world}"
    )

    def save(epoch_now: int, reason: str) -> Path | None:
        nonlocal last_checkpoint, checkpoint_step
        if checkpoint_step == step:
            return last_checkpoint
        gathered_rng = _gather_objects(rng.capture())
        gathered_queue = _gather_objects(queue.state_dict()) if queue is not None else None
        path = None
        if dist.is_main():
            state = {
                "format": ckpt.FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "queues": gathered_queue,
                "health": health.state_dict(),
                "rng": gathered_rng,
                "step": step,
                "epoch": epoch_now,
                "steps_per_epoch": steps_epoch,
                "world_size": world,
                "skipped_images": skipped_total,
                "settings": to_toml(settings),
                "reason": reason,
            }
            path = ckpt.save_checkpoint(run_dir, step, epoch_now, state, keep=settings.checkpoint.keep)
        dist.barrier()
        last_checkpoint = path or run_dir / ckpt.CHECKPOINT_DIR / f"step-{step:09d}.pt"
        checkpoint_step = step
        return last_checkpoint

    stop = _StopFlag()
    with stop.installed():
        while step < total_steps:
            epoch, batch_in_epoch = divmod(step, steps_epoch)
            sampler = EpochBatchSampler(
                len(dataset),
                batch_size=bs,
                epoch=epoch,
                seed=settings.train.seed,
                rank=rank,
                world_size=world,
                start_batch=batch_in_epoch,
            )
            if queue is not None and epoch < settings.swav.queue_start_epoch:
                active_queue = None
            else:
                active_queue = queue
            loader = DataLoader(
                dataset,  # type: ignore[arg-type]
                batch_sampler=sampler,  # type: ignore[arg-type]
                num_workers=settings.data.workers,
                collate_fn=collate,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
                prefetch_factor=4 if settings.data.workers > 0 else None,
            )
            wait_start = time.perf_counter()
            iterator = iter(loader)
            while step < total_steps:
                try:
                    batch: Batch = next(iterator)
                except StopIteration:
                    break
                except BadImage as exc:
                    raise UserError(f"unreadable image (data.on_bad_image=error): {exc}") from None
                data_wait = time.perf_counter() - wait_start
                step_start = time.perf_counter()
                for bad in batch.skipped:
                    skipped_total += 1
                    reporter.warn(f"skipped unreadable file {bad.path}: {bad.reason}")
                if batch.size == 0:
                    step += 1
                    continue
                crops_t = _batch_crops(batch, crops, augment, device, settings.train.seed, epoch, step, rank)
                if channels_last:
                    crops_t = [c.contiguous(memory_format=torch.channels_last) for c in crops_t]
                lr = learning_rate(
                    step,
                    steps_per_epoch=steps_epoch,
                    epochs=settings.train.epochs,
                    base_lr=settings.optim.base_lr,
                    final_lr=settings.optim.final_lr,
                    warmup_epochs=settings.optim.warmup_epochs,
                    start_warmup_lr=settings.optim.start_warmup_lr,
                )
                for group in sgd.param_groups:
                    group["lr"] = lr
                model.normalize_prototypes()
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    embeddings, scores = train_model(crops_t)
                out = swav_loss_from_outputs(
                    embeddings.float(),
                    scores.float(),
                    batch_size=batch.size,
                    num_crops=num_crops,
                    assignment_crops=settings.swav.assignment_crops,
                    prototypes=model.prototypes.weight,
                    temperature=settings.swav.temperature,
                    epsilon=settings.swav.epsilon,
                    sinkhorn_iterations=settings.swav.sinkhorn_iterations,
                    queue=active_queue,
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                if step < settings.swav.freeze_prototypes_steps:
                    _freeze_prototype_grads(model)
                finite = torch.isfinite(out.loss.detach()) & (_grads_finite(model) | scaler.is_enabled())
                culprits = _ranks_flagging(not bool(finite), device)
                if culprits:
                    raise NonFiniteError(
                        f"non-finite loss or gradients at step {step} on rank(s) {culprits}; "
                        f"the last good checkpoint is {last_checkpoint or 'none'}"
                    )
                if scaler.is_enabled():
                    scaler.unscale_(sgd)
                    optimizer.adapt_gradients()
                    saved_wd = [g["weight_decay"] for g in sgd.param_groups]
                    for g in sgd.param_groups:
                        g["weight_decay"] = 0.0
                    scaler.step(sgd)
                    for g, wd in zip(sgd.param_groups, saved_wd, strict=True):
                        g["weight_decay"] = wd
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                samples_seen += batch.size * world
                loss_value = float(out.loss.detach())
                last_loss = loss_value
                step_time = time.perf_counter() - step_start
                entropy, used = code_statistics(out.codes[0])
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_value,
                    "loss_over_lnk": loss_value / math.log(settings.model.prototypes),
                    "lr": lr,
                    "samples_per_s": batch.size * world / max(step_time + data_wait, 1e-9),
                    "data_wait_fraction": data_wait / max(step_time + data_wait, 1e-9),
                    "code_entropy": entropy,
                    "prototypes_used": used,
                    "queue_in_use": out.queue_in_use,
                    "skipped_images": skipped_total,
                }
                if dist.is_main() and (step % settings.train.log_every == 0 or step == total_steps):
                    metrics.append(record)
                reporter.step(record)
                warning = health.update(step, loss_value)
                if warning:
                    reporter.warn(warning)
                if on_step is not None:
                    on_step(step)
                signum = _agree_on_signal(stop.signum, device)
                if signum is not None:
                    path = save(step // steps_epoch, f"signal {signal.Signals(signum).name}")
                    raise Interrupted(signum, step, path)
                if step % steps_epoch == 0 or step % settings.checkpoint.every_steps == 0:
                    save(step // steps_epoch, "periodic")
                if settings.train.max_seconds and time.perf_counter() - started > settings.train.max_seconds:
                    reporter.info(f"train.max_seconds reached at step {step}")
                    total_steps = step
                wait_start = time.perf_counter()
            del iterator, loader
    final_ckpt = save(step // steps_epoch, "final")
    elapsed = time.perf_counter() - started
    backbone_path = run_dir / "backbone.safetensors"
    summary = Summary(
        out_dir=str(run_dir),
        steps=step,
        epochs_done=step / steps_epoch,
        final_loss=last_loss,
        samples_per_s=samples_seen / elapsed if elapsed > 0 else 0.0,
        skipped_images=skipped_total,
        images=len(paths),
        checkpoint=str(final_ckpt) if final_ckpt else None,
        backbone=str(backbone_path),
        resumed_from_step=resumed_from,
    )
    if dist.is_main():
        _export_backbone(model, backbone_path, settings, step, step // steps_epoch)
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary.as_dict(), indent=1) + "\n")
    dist.barrier()
    reporter.close()
    return summary


def _batch_crops(
    batch: Batch,
    crops: list[Any],
    augment: AugmentSpec,
    device: torch.device,
    seed: int,
    epoch: int,
    step: int,
    rank: int,
) -> list[torch.Tensor]:
    if batch.crops is not None:
        return [c.to(device, non_blocking=True) for c in batch.crops]
    from swavctl.data.batch_augment import batch_multicrop

    assert batch.images is not None
    images = [im.to(device, non_blocking=True) for im in batch.images]
    generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, epoch, step * 1_000_003 + rank))
    return batch_multicrop(images, crops, augment, generator=generator)


def _gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list without a process group)."""
    if not dist.is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _ranks_flagging(flag: bool, device: torch.device) -> list[int]:
    """The ranks whose ``flag`` is set, agreed by all ranks with one collective."""
    if not dist.is_distributed():
        return [0] if flag else []
    flags = torch.zeros(dist.world_size(), device=device)
    flags[dist.rank()] = float(flag)
    dist.all_reduce_sum(flags)
    return [r for r, v in enumerate(flags.tolist()) if v]


def _agree_on_signal(signum: int | None, device: torch.device) -> int | None:
    """The largest signal number any rank received, so all ranks checkpoint at the same step."""
    if not dist.is_distributed():
        return signum
    value = torch.tensor([signum or 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item()) or None


def _broadcast_str(value: str) -> str:
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return str(box[0])
