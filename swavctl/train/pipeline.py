"""The per-epoch data pipeline of pretraining: sampler, loader, decode and multi-crop, prefetch.

Built once per run (:class:`DataPipeline`); :meth:`DataPipeline.epoch` then gives the batches of
one epoch from the batch a (resumed) run is at, each ready for its step: decoded, multi-cropped
(in the loader workers or on the device) and on the device, with the time the step waited for it.
A batch's crops are seeded by (seed, epoch, step, rank), so they depend neither on the loader
workers nor on where a run was interrupted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import torch

from swavctl.config import Settings
from swavctl.data.dataset import Batch, pretrain_dataset, pretrain_loader, refuse_skipped, sample_seed
from swavctl.data.sampler import EpochBatchSampler
from swavctl.train.build import crop_specs
from swavctl.train.device_batch import batch_crops, decode_batch
from swavctl.train.prefetch import Prefetcher, Prepare, Ready, side_stream
from swavctl.train.profiling import phase
from swavctl.train.report import Reporter


class DataPipeline:
    """The crops, the dataset and the prefetch settings of a run, on this rank."""

    def __init__(
        self,
        settings: Settings,
        paths: list[Path],
        *,
        device: torch.device,
        rank: int,
        world: int,
        reporter: Reporter,
    ) -> None:
        self.settings, self.device, self.rank, self.world = settings, device, rank, world
        self.reporter = reporter
        self.crops = crop_specs(settings)
        self.augment = settings.data.augment  # the multi-crop's photometric spec itself
        self.dataset = pretrain_dataset(
            paths,
            seed=settings.train.seed,
            crops=self.crops,
            augment=self.augment,
            augment_on=settings.data.augment_on,
            device=device,
        )
        depth = settings.data.prefetch
        self.prefetch_depth = depth if depth is not None else (1 if device.type == "cuda" else 0)
        self.prefetch_stream = side_stream(device) if self.prefetch_depth > 0 else None  # one for every epoch
        self.warned_cpu_decode = False

    @contextlib.contextmanager
    def epoch(
        self, epoch: int, *, start_batch: int, first_step: int
    ) -> Iterator[Iterator[tuple[Ready, float]]]:
        """The batches of ``epoch`` from its batch ``start_batch`` (optimizer step ``first_step``)
        on, each with the seconds waited for it; the loader's workers and the prefetch thread end
        when the block is left."""
        settings = self.settings
        sampler = EpochBatchSampler(
            len(self.dataset),
            batch_size=settings.train.batch_size,
            epoch=epoch,
            seed=settings.train.seed,
            rank=self.rank,
            world_size=self.world,
            start_batch=start_batch,
        )
        loader = pretrain_loader(
            self.dataset,
            sampler,
            workers=settings.data.workers,
            device=self.device,
            seed=sample_seed(settings.train.seed, epoch, -1 - self.rank),
        )
        prefetcher = Prefetcher(
            iter(loader),
            self._prepare_for(epoch, first_step),
            device=self.device,
            depth=self.prefetch_depth,
            stream=self.prefetch_stream,
        )
        batches = self._ready(prefetcher)
        try:
            yield batches
        finally:
            batches.close()
            prefetcher.close()
            del batches, prefetcher, loader  # the loader's workers end here, before the next epoch's start

    def _prepare_for(self, epoch: int, first_step: int) -> Prepare:
        """``prepare(batch, index)`` for the prefetcher: the crops of step ``first_step + index``."""
        dataset, crops, augment, device = self.dataset, self.crops, self.augment, self.device
        seed, channels_last = self.settings.train.seed, self.settings.train.channels_last

        def prepare(batch: Batch, index: int) -> tuple[Batch, list[torch.Tensor] | None]:
            """Decode, then augment or copy to the device: the crops of step first_step + index."""
            with phase("augment"):
                if batch.images is not None:
                    batch = decode_batch(batch, dataset.paths, device)
                if batch.size == 0:
                    return batch, None
                crops_t = batch_crops(batch, crops, augment, device, seed, epoch)
                if channels_last:
                    crops_t = [c.contiguous(memory_format=torch.channels_last) for c in crops_t]
                return batch, crops_t

        return prepare

    def _ready(self, prefetcher: Prefetcher) -> Generator[tuple[Ready, float], None, None]:
        wait_start = time.perf_counter()
        while True:
            with phase("data_wait"):
                try:
                    ready = next(prefetcher)
                except StopIteration:
                    return
            waited = time.perf_counter() - wait_start
            self._check(ready.batch)
            yield ready, waited
            wait_start = time.perf_counter()

    def _check(self, batch: Batch) -> None:
        """Refuse or report the batch's unreadable files, and say once when nvjpeg fell back."""
        if self.settings.data.on_bad_image == "error":
            refuse_skipped(batch)
        for bad in batch.skipped:
            self.reporter.warn(f"skipped unreadable file {bad.path}: {bad.reason}")
        if batch.cpu_decoded and not self.warned_cpu_decode:
            self.warned_cpu_decode = True  # once: it can be every batch (nvjpeg missing)
            self.reporter.warn(
                f"nvjpeg could not decode {batch.cpu_decoded} of a batch's {batch.size} JPEGs; "
                "they were decoded on the CPU (slower; CMYK or unusual JPEGs do this)"
            )
