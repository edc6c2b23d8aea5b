"""``swavctl bench data``: the pretrain loader alone, in multi-crop samples per second.

The measurement reproduces the loop's data path exactly: the same dataset
(:func:`~swavctl.data.dataset.pretrain_dataset`), sampler, DataLoader arguments and a new loader
per epoch (the loop's epoch restarts are part of the figure), and the same
``batch_crops`` that puts the crops on the device (with ``data.augment_on="device"`` that is
where the batch is decoded and augmented). Only the model is missing, so this is the rate the
loader can feed, and ``1 / samples_per_s`` is the per-sample share the loop's ``data_wait``
tends to when the loader is the bottleneck.

For each worker count: the first ``warmup`` batches (worker start-up, first touches of the files)
are timed separately as ``startup_s``; the rate is over the next ``batches`` batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from swavctl.bench.common import crops_label, sync
from swavctl.config import Settings
from swavctl.data.dataset import Batch, pretrain_dataset, pretrain_loader, refuse_skipped
from swavctl.data.sampler import EpochBatchSampler, steps_per_epoch
from swavctl.distributed.device import pick_devices
from swavctl.errors import UserError
from swavctl.train.build import crop_specs
from swavctl.train.device_batch import batch_crops, decode_batch
from swavctl.train.plan import data_paths
from swavctl.train.report import QuietReporter, Reporter

#: Worker counts whose rate is within this fraction of the best count as "enough".
ENOUGH = 0.95


@dataclass
class WorkerFigure:
    workers: int
    samples_per_s: float
    batches: int
    seconds: float
    startup_s: float
    skipped_images: int


@dataclass
class DataBenchResult:
    data: str
    images: int
    batch_size: int
    crops: str
    augment_on: str
    decode: str  # where images are decoded: "workers", or "device" (nvjpeg, JPEGs on a GPU)
    device: str
    figures: list[WorkerFigure] = field(default_factory=list)
    best_workers: int = 0  # the fewest workers within ENOUGH of the fastest count
    best_samples_per_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _measure(
    settings: Settings,
    dataset: object,
    num_images: int,
    workers: int,
    *,
    batches: int,
    warmup: int,
    max_seconds: float | None,
    device: torch.device,
) -> WorkerFigure:
    crops = crop_specs(settings)
    augment = settings.data.augment
    bs = settings.train.batch_size
    done = 0
    samples = 0
    skipped = 0
    started = time.perf_counter()
    measure_start = started
    startup = 0.0
    epoch = 0
    while done < warmup + batches:
        sampler = EpochBatchSampler(num_images, batch_size=bs, epoch=epoch, seed=settings.train.seed)
        loader = pretrain_loader(dataset, sampler, workers=workers, device=device)  # type: ignore[arg-type]
        for batch in loader:
            assert isinstance(batch, Batch)
            if batch.images is not None:
                batch = decode_batch(batch, dataset.paths, device)  # type: ignore[attr-defined]
            if settings.data.on_bad_image == "error":
                refuse_skipped(batch)
            skipped += len(batch.skipped)
            if batch.size:
                batch_crops(batch, crops, augment, device, settings.train.seed, epoch)
                sync(device)
            done += 1
            if done == warmup:
                measure_start = time.perf_counter()
                startup = measure_start - started
            elif done > warmup:
                samples += batch.size
            if done >= warmup + batches:
                break
            if (
                max_seconds is not None
                and done > warmup
                and time.perf_counter() - measure_start > max_seconds
            ):
                batches = done - warmup
                break
        del loader
        epoch += 1
    seconds = time.perf_counter() - measure_start
    return WorkerFigure(
        workers=workers,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        batches=batches,
        seconds=seconds,
        startup_s=startup,
        skipped_images=skipped,
    )


def bench_data(
    settings: Settings,
    *,
    workers: Sequence[int] = (),
    batches: int = 20,
    warmup: int = 2,
    max_seconds: float | None = None,
    decode_in_workers: bool = False,
    reporter: Reporter | None = None,
) -> DataBenchResult:
    """Measure the pretrain loader at each worker count (``data.workers`` when none are given)."""
    reporter = reporter or QuietReporter()
    if batches < 1 or warmup < 0:
        raise UserError("--batches must be at least 1 and --warmup at least 0")
    counts = list(dict.fromkeys(workers or [settings.data.workers]))
    if any(w < 0 for w in counts):
        raise UserError("worker counts must be 0 or more")
    device = pick_devices(settings.dist.gpus)[0]
    if decode_in_workers and (device.type != "cuda" or settings.data.augment_on != "device"):
        reporter.warn(
            "--decode-in-workers has no effect here: it applies with data.augment_on=device on a GPU "
            f"(now augment_on={settings.data.augment_on}, device {device.type}); the workers decode anyway"
        )
    folder, paths = data_paths(settings, reporter)
    if steps_per_epoch(len(paths), settings.train.batch_size) == 0:
        raise UserError(
            f"{len(paths)} images under {folder} are fewer than one batch of {settings.train.batch_size}; "
            "lower --batch-size"
        )
    dataset = pretrain_dataset(
        paths,
        seed=settings.train.seed,
        crops=crop_specs(settings),
        augment=settings.data.augment,
        augment_on=settings.data.augment_on,
        device=device,
        decode_in_workers=decode_in_workers,
    )
    result = DataBenchResult(
        data=str(folder),
        images=len(paths),
        batch_size=settings.train.batch_size,
        crops=crops_label(settings),
        augment_on=settings.data.augment_on,
        decode="device" if dataset.encoded else "workers",
        device=str(device),
    )
    for count in counts:
        figure = _measure(
            settings,
            dataset,
            len(paths),
            count,
            batches=batches,
            warmup=warmup,
            max_seconds=max_seconds,
            device=device,
        )
        reporter.info(
            f"workers {count:>2}: {figure.samples_per_s:8.1f} samples/s "
            f"({figure.batches} batches in {figure.seconds:.1f} s, start-up {figure.startup_s:.1f} s)"
        )
        result.figures.append(figure)
    fastest = max(f.samples_per_s for f in result.figures)
    enough = min((f for f in result.figures if f.samples_per_s >= ENOUGH * fastest), key=lambda f: f.workers)
    result.best_workers = enough.workers
    result.best_samples_per_s = enough.samples_per_s
    return result
