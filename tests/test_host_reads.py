"""The training step queues device work without making the host wait, except where it must.

On a GPU every blocking host-to-device copy and every ``float(tensor)`` / ``bool(tensor)`` /
``.item()`` synchronises the host with the device; the GPU then idles until the host queues more
work. No GPU here: the checks use the ``meta`` device (every CPU-to-meta copy is a host-to-device
transfer whose ``non_blocking`` flag can be read) and count the scalar reads that torch
dispatches (``aten::_local_scalar_dense``). The GPU-only test at the end checks the same with
CUDA's own sync detector.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swavctl.config import resolve
from swavctl.data.multicrop import batch_multicrop, size_groups
from swavctl.train.build import crop_specs
from swavctl.train.health import code_statistics
from swavctl.train.loop import pretrain
from tests.conftest import write_image_folder

COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class HostDeviceLog(TorchDispatchMode):
    """Records host-to-``meta`` copies (with their non_blocking flag) and scalar reads: all of them,
    and those of tensors that are not on the CPU (a read of a ``meta`` tensor raises anyway)."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[bool] = []
        self.scalar_reads = 0
        self.device_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
            self.device_reads += args[0].device.type != "cpu"
        out = func(*args, **kwargs)
        if func in COPIES:
            if func is torch.ops.aten.copy_.default:
                dst, src = args[0], args[1]
                non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
            else:
                dst, src = out, args[0]
                non_blocking = bool(kwargs.get("non_blocking", False))
            if src.device.type == "cpu" and dst.device.type == "meta":
                self.uploads.append(non_blocking)
        return out


def test_batched_augmentation_uploads_its_parameters_without_blocking() -> None:
    settings = resolve()  # the paper's 2x224 + 6x96 with every random op enabled
    # Landscape, portrait and one large photo: several padding groups (multicrop.size_groups).
    sizes = [(500, 375) if i % 4 == 0 else (375 + i % 3, 500) for i in range(15)] + [(1000, 1400)]
    assert len(size_groups(sizes)) >= 3
    images = [torch.empty((3, h, w), dtype=torch.uint8, device="meta") for h, w in sizes]
    with HostDeviceLog() as log:
        crops = batch_multicrop(
            images,
            crop_specs(settings),
            settings.data.augment,
            generator=torch.Generator().manual_seed(0),
        )
    assert [tuple(c.shape) for c in crops] == [(16, 3, 224, 224)] * 2 + [(16, 3, 96, 96)] * 6
    # Boxes, flips, jitter factors and sample indices, blur sigmas, mean and std: each is one
    # small upload per crop size. A plain .to(device) among them would be a blocking copy.
    assert len(log.uploads) > 40
    assert Counter(log.uploads) == {True: len(log.uploads)}
    assert log.device_reads == 0


def test_code_statistics_match_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.softmax(torch.randn(64, 12, generator=g, dtype=torch.float64) * 3, dim=1)
    codes[:, 5] = 0  # a prototype nobody picks
    codes = codes / codes.sum(dim=1, keepdim=True)
    stats = code_statistics(codes.float())
    entropies = [-sum(p * math.log(max(p, 1e-12)) for p in row) for row in codes.tolist()]
    assert stats.dtype == torch.float64 and stats.shape == (2,)
    assert stats[0].item() == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    assert int(stats[1]) == len(set(codes.argmax(dim=1).tolist()))
    assert int(stats[1]) < 12
    one_hot = torch.eye(12)[[3, 3, 7, 3]]  # collapsed codes: zero entropy, two prototypes
    assert code_statistics(one_hot).tolist() == pytest.approx([0.0, 2.0], abs=1e-9)


def test_a_training_step_reads_the_device_only_for_sinkhorn_and_its_one_readout(tmp_path: Path) -> None:
    """Steps after the first make exactly one scalar read per assignment crop (Sinkhorn's check of
    a column underflow, which decides between two code paths); everything the loop itself needs
    comes back in one ``tolist`` (not a dispatched op). On the CPU every tensor is a host tensor,
    so the run stays inside one epoch: a new epoch's DataLoader draws its seed with ``.item()``."""
    data = write_image_folder(tmp_path / "images", classes=2, per_class=24, size=16)  # 6 steps/epoch
    settings = resolve(
        preset="smoke",
        overrides=[
            f"data.path={data}",
            f"out={tmp_path / 'run'}",
            "dist.gpus=0",
            "train.max_steps=5",
            "data.workers=1",  # augmentation (and its own scalar reads) in a worker process
            "checkpoint.every_steps=1000",
        ],
    )
    reads_at_step: dict[int, int] = {}
    with HostDeviceLog() as log, contextlib.chdir(tmp_path):  # runs/latest: not the checkout's
        pretrain(settings, on_step=lambda step: reads_at_step.__setitem__(step, log.scalar_reads))
    per_step = [reads_at_step[s + 1] - reads_at_step[s] for s in range(1, 5)]
    assert per_step == [len(settings.swav.assignment_crops)] * 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_augmentation_on_cuda_never_synchronises() -> None:
    settings = resolve()
    images = [
        torch.randint(0, 256, (3, 375 + i % 3, 500), dtype=torch.uint8, device="cuda") for i in range(8)
    ]
    spec, augment = crop_specs(settings), settings.data.augment
    batch_multicrop(images, spec, augment, generator=torch.Generator().manual_seed(0))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crops = batch_multicrop(images, spec, augment, generator=torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(c.is_cuda for c in crops)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_decoding_never_overwrites_memory_that_queued_kernels_still_read(tmp_path: Path) -> None:
    """Free tensors the stream's queued kernels still read, then decode: the decoder is handed those
    blocks by the caching allocator; the kernels must still see their data (see
    ``dataset._decode_jpeg_cuda``)."""
    from swavctl.bench.jpegs import write_jpeg
    from swavctl.data.dataset import decode_images

    device = torch.device("cuda", torch.cuda.current_device())
    paths = [tmp_path / f"{i}.jpg" for i in range(8)]
    for i, path in enumerate(paths):
        write_jpeg(path, seed=i, width=500, height=375)
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    slow = torch.randn(4096, 4096, device=device)
    corrupted = 0
    for _ in range(10):
        held = [torch.full((3, 375, 500), 7 + i, dtype=torch.uint8, device=device) for i in range(8)]
        torch.cuda.synchronize()
        for _ in range(20):  # tens of milliseconds of queued work before the reads
            slow = torch.tanh(slow @ slow / 4096)
        sums = [t.sum(dtype=torch.int64) for t in held]
        del held  # freed on the stream while the sums are still queued
        images, failures, cpu_decoded = decode_images(encoded, device)
        torch.cuda.synchronize()
        assert not failures and len(images) == 8
        assert cpu_decoded == 0  # nvjpeg decoded them (the CPU fallback would not race)
        expected = [(7 + i) * 3 * 375 * 500 for i in range(8)]
        corrupted += sum(int(s) != e for s, e in zip(sums, expected, strict=True))
    assert corrupted == 0, f"{corrupted} reductions read memory the decoder had overwritten"
