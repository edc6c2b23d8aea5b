"""The pretraining dataset: decoded images, optionally multi-cropped in the loader workers.

Items are addressed by ``(epoch, index)`` from :class:`~swavctl.data.sampler.EpochBatchSampler`.
The per-image augmentation is seeded from ``(seed, epoch, index)``, so a sample's crops do not
depend on the worker that made them, and a resumed run sees exactly the crops it would have seen.
Unreadable files come back as :class:`Skipped` records and are counted, not raised, unless
``on_bad_image="error"``.

Three kinds of item, chosen by :func:`pretrain_dataset` from ``data.augment_on`` and the device:

* ``workers``: the worker decodes and multi-crops (:class:`~swavctl.data.multicrop.MultiCrop`);
  the batch holds stacked crops;
* ``device`` on a CPU: the worker decodes; the loop multi-crops the batch
  (:func:`~swavctl.data.multicrop.batch_multicrop`, from the same per-sample seeds, so the
  crops are the worker path's up to the resize's rounding);
* ``device`` on a GPU: the worker only reads the file. JPEG files travel as their raw bytes (a
  1-D uint8 tensor) and are decoded on the GPU by :func:`decode_images` (nvjpeg), other formats
  are decoded in the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from swavctl.data.images import BadImage, decode_bytes, decode_file
from swavctl.data.multicrop import AugmentSpec, CropSpec, MultiCrop
from swavctl.errors import UserError

JPEG_MAGIC = b"\xff\xd8\xff"  # start-of-image marker + the first marker's 0xff

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that mixes (seed, epoch, index) with a splitmix64-style hash."""
    value = (seed * _MIX + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & (2**64 - 1)
    value ^= value >> 32
    return value & (2**63 - 1)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Batch:
    """One collated batch: either crops (worker augmentation) or raw images (device augmentation)."""

    crops: list[torch.Tensor] | None
    images: list[torch.Tensor] | None
    indices: list[int]
    skipped: list[Skipped] = field(default_factory=list)
    cpu_decoded: int = 0  # JPEGs meant for nvjpeg that had to be decoded on the CPU instead

    @property
    def size(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (the DataLoader's pin thread calls this), so the
        host-to-device copies of the loop run asynchronously."""
        return Batch(
            crops=None if self.crops is None else [c.pin_memory() for c in self.crops],
            images=None if self.images is None else [im.pin_memory() for im in self.images],
            indices=self.indices,
            skipped=self.skipped,
        )


class PretrainDataset(Dataset):
    """Images under a folder; ``transform`` (if given) maps a uint8 image to its list of crops,
    drawn from a generator seeded by :func:`sample_seed` of (seed, epoch, index).

    With ``encoded=True`` (and no transform) a JPEG file comes back undecoded, as its bytes in a
    1-D uint8 tensor, for :func:`decode_images` to decode on the device; other files are decoded.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        seed: int,
        transform: MultiCrop | None = None,
        encoded: bool = False,
    ) -> None:
        if encoded and transform is not None:
            raise ValueError("encoded=True returns file bytes; it cannot be combined with a transform")
        self.paths = [str(p) for p in paths]
        self.seed = seed
        self.transform = transform
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        epoch, index = key
        path = self.paths[index]
        try:
            if self.encoded:
                data = _read(Path(path))
                if data.startswith(JPEG_MAGIC):
                    return index, torch.frombuffer(bytearray(data), dtype=torch.uint8)
                image = decode_bytes(data, path)
            else:
                image = decode_file(Path(path))
        except BadImage as exc:  # data.on_bad_image=error is enforced by the reader: refuse_skipped
            return index, Skipped(path, str(exc))
        if self.transform is None:
            return index, image
        # A private generator: torch.manual_seed also seeds (lazily) every accelerator backend,
        # which costs more than the crops of a small image.
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return index, self.transform(image, generator=generator)


def collate(items: list[tuple[int, Any]]) -> Batch:
    """Stack crops per crop position (or keep raw images as a list); set skipped files aside."""
    good = [(i, x) for i, x in items if not isinstance(x, Skipped)]
    skipped = [x for _, x in items if isinstance(x, Skipped)]
    indices = [i for i, _ in good]
    if not good:
        return Batch(crops=None, images=None, indices=[], skipped=skipped)
    first = good[0][1]
    if isinstance(first, torch.Tensor):
        return Batch(crops=None, images=[x for _, x in good], indices=indices, skipped=skipped)
    # default_collate stacks straight into shared memory inside a worker (one copy fewer).
    crops = [default_collate([x[v] for _, x in good]) for v in range(len(first))]
    return Batch(crops=crops, images=None, indices=indices, skipped=skipped)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror})") from None


def is_encoded(item: torch.Tensor) -> bool:
    """True for an undecoded item (1-D uint8 file bytes), False for a decoded ``[3, H, W]`` image."""
    return item.dim() == 1


class DecodedImages(NamedTuple):
    """What :func:`decode_images` made of a batch's items."""

    images: list[torch.Tensor]  # in the order of the items that decoded
    failures: list[tuple[int, str]]  # (position in the items, reason) of those no decoder could read
    cpu_decoded: int  # on a GPU: encoded JPEGs nvjpeg could not decode, decoded on the CPU instead


def decode_images(items: Sequence[torch.Tensor], device: torch.device) -> DecodedImages:
    """Decode a batch's items onto ``device`` (see :class:`DecodedImages`).

    Encoded JPEGs are decoded together by ``torchvision.io.decode_jpeg(device=cuda)`` (nvjpeg)
    when ``device`` is a GPU; whatever that cannot decode (a CMYK or otherwise unusual JPEG,
    nvjpeg missing) is decoded on the CPU with :func:`~swavctl.data.images.decode_bytes` and
    moved. Decoded items are moved as they are. ``images`` keeps the order of the items that
    decoded; failures are the positions (in ``items``) that no decoder could read.

    nvjpeg's pixels are not libjpeg-turbo's (its IDCT and chroma upsampling differ by a few grey
    levels), so a GPU run and a CPU run see slightly different images, and a damaged file one
    decoder accepts the other may refuse.
    """
    out: list[torch.Tensor | None] = [None] * len(items)
    pending = [i for i, item in enumerate(items) if is_encoded(item)]
    for i, item in enumerate(items):
        if not is_encoded(item):
            out[i] = item.to(device, non_blocking=True)
    cpu_decoded = 0
    if pending and device.type == "cuda":
        out_gpu = _decode_jpeg_cuda([items[i] for i in pending], device)
        still = []
        for i, image in zip(pending, out_gpu, strict=True):
            if image is None:
                still.append(i)
            else:
                out[i] = image
        pending = still
        cpu_decoded = len(still)
    failures: list[tuple[int, str]] = []
    for i in pending:
        try:
            out[i] = decode_bytes(items[i].cpu().numpy().tobytes()).to(device, non_blocking=True)
        except BadImage as exc:
            failures.append((i, str(exc)))
    return DecodedImages([im for im in out if im is not None], failures, cpu_decoded)


def _decode_jpeg_cuda(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """nvjpeg decode of a list of JPEGs; one call for the batch, per image where the batch fails.

    The caller's stream is synchronised first. nvJPEG (its hardware engine at least) can write
    the output buffers before the work already queued on the stream has run, and the buffers come
    from torch's caching allocator, which hands out a block as soon as it is freed on that stream,
    while queued kernels may still read it. Without the wait the decoder can overwrite memory that
    the previous batch's augmentation or the optimizer step has yet to read (reported as
    pytorch/vision#9606 and meta-pytorch/torchcodec#1634). In the loop this runs on the prefetch
    thread's side stream, so that stream alone waits, for the previous batch's augmentation.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    cpu = [e if e.device.type == "cpu" else e.cpu() for e in encoded]
    torch.cuda.current_stream(device).synchronize()
    try:
        images = decode_jpeg(cpu, mode=ImageReadMode.RGB, device=device)
        return [_rgb(im) for im in images]
    except (RuntimeError, ValueError):
        pass
    result: list[torch.Tensor | None] = []
    for e in cpu:
        try:
            result.append(_rgb(decode_jpeg(e, mode=ImageReadMode.RGB, device=device)))
        except (RuntimeError, ValueError):
            result.append(None)
    return result


def _rgb(image: torch.Tensor) -> torch.Tensor | None:
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        return None
    return image


def refuse_skipped(batch: Batch) -> None:
    """``data.on_bad_image = "error"``: a :class:`UserError` naming the batch's first unreadable file.

    Checked where batches are read (the training loop, ``bench data``), after the device decode,
    so files that fail in a loader worker and JPEGs that fail on the GPU stop the run alike.
    """
    if batch.skipped:
        first = batch.skipped[0]
        raise UserError(f"unreadable image (data.on_bad_image=error): {first.path}: {first.reason}")


def pretrain_dataset(
    paths: Sequence[Path],
    *,
    seed: int,
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    augment_on: str,
    device: torch.device,
    decode_in_workers: bool = False,
) -> PretrainDataset:
    """The dataset the pretrain loop reads (see the module docstring for the three kinds of item).

    ``decode_in_workers`` keeps JPEG decoding in the workers for device augmentation on a GPU
    (a measurement option of ``swavctl bench data``).
    """
    on_device = augment_on == "device"
    return PretrainDataset(
        paths,
        seed=seed,
        transform=None if on_device else MultiCrop(crops, augment),
        encoded=on_device and device.type == "cuda" and not decode_in_workers,
    )


def pretrain_loader(
    dataset: PretrainDataset, batch_sampler: Any, *, workers: int, device: torch.device, seed: int = 0
) -> DataLoader:
    """The loop's DataLoader for one epoch (the same arguments as in ``swavctl.train.loop``).

    Its own generator, seeded with ``seed``, gives the workers their base seed, so starting it
    draws nothing from torch's global generator (which a checkpoint saves): a run resumed
    mid-epoch starts one more loader than the uninterrupted run, and must still save the same
    random states. The crops do not depend on it (each image's are seeded from its index).
    """
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
