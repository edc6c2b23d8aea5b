"""``data.prefetch``: batches made ready ahead of the step on a background thread.

The thread must not change a run's results, must hand errors over at the batch they belong to,
and must stop when the loop stops.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swavctl.config import resolve
from swavctl.data.dataset import Batch
from swavctl.data.images import BadImage
from swavctl.errors import UserError
from swavctl.train.loop import pretrain
from swavctl.train.prefetch import Prefetcher, side_stream
from tests.conftest import wait_until, write_image_folder


def _batches(n: int, *, fail_at: int | None = None) -> Iterator[Batch]:
    for i in range(n):
        if i == fail_at:
            raise BadImage(f"image {i} is broken")
        yield Batch(crops=[torch.full((2, 3), float(i))], images=None, indices=[2 * i, 2 * i + 1])


def _prepare(batch: Batch, index: int) -> tuple[Batch, list[torch.Tensor] | None]:
    assert batch.crops is not None
    return batch, [batch.crops[0] + 100 * index]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_come_in_order_with_their_index(depth: int) -> None:
    with Prefetcher(_batches(6), _prepare, device=torch.device("cpu"), depth=depth) as prefetcher:
        got = [(r.batch.indices, float(r.crops[0][0, 0])) for r in prefetcher if r.crops is not None]
    assert got == [([2 * i, 2 * i + 1], 101.0 * i) for i in range(6)]


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_is_raised_at_the_batch_it_belongs_to_and_again_after(depth: int) -> None:
    prefetcher = Prefetcher(_batches(6, fail_at=3), _prepare, device=torch.device("cpu"), depth=depth)
    try:
        assert [next(prefetcher).batch.indices[0] for _ in range(3)] == [0, 2, 4]
        with pytest.raises(BadImage, match="image 3 is broken"):
            next(prefetcher)
        if depth:  # the thread has ended; asking again gives the same error, not a hang
            with pytest.raises(BadImage):
                next(prefetcher)
    finally:
        prefetcher.close()


def test_the_end_is_repeated_and_the_thread_ends() -> None:
    prefetcher = Prefetcher(_batches(2), _prepare, device=torch.device("cpu"), depth=2)
    assert len(list(prefetcher)) == 2
    with pytest.raises(StopIteration):
        next(prefetcher)
    prefetcher.close()
    assert not any(t.name == "swavctl-prefetch" and t.is_alive() for t in threading.enumerate())


def test_close_stops_a_thread_that_waits_on_a_full_queue() -> None:
    made: list[int] = []

    def counting(batch: Batch, index: int) -> tuple[Batch, list[torch.Tensor] | None]:
        made.append(index)
        return _prepare(batch, index)

    prefetcher = Prefetcher(_batches(1000), counting, device=torch.device("cpu"), depth=2)
    next(prefetcher)
    wait_until(lambda: len(made) >= 3, timeout=60)  # one taken, two queued, one waiting
    started = time.monotonic()
    prefetcher.close()
    assert time.monotonic() - started < 2
    assert len(made) <= 4  # it made at most the batches the queue had room for, and one more
    assert not any(t.name == "swavctl-prefetch" and t.is_alive() for t in threading.enumerate())


def _run(tmp_path: Path, name: str, data: Path, *overrides: str) -> list[dict[str, float]]:
    settings = resolve(
        preset="smoke",
        overrides=[
            f"data.path={data}",
            f"out={tmp_path / name}",
            "dist.gpus=0",
            "train.max_steps=9",  # across the epoch boundary (6 steps per epoch)
            *overrides,
        ],
    )
    with contextlib.chdir(tmp_path):  # runs/latest goes under the working folder: not the checkout's
        pretrain(settings)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "where", [("data.augment_on=device", "data.workers=0"), ("data.augment_on=workers", "data.workers=2")]
)
def test_a_run_with_a_prefetch_thread_is_identical_to_one_without(
    tmp_path: Path, where: tuple[str, ...]
) -> None:
    data = write_image_folder(tmp_path / "images", classes=2, per_class=24, size=20)
    inline = _run(tmp_path, "inline", data, *where, "data.prefetch=0")
    ahead = _run(tmp_path, "ahead", data, *where, "data.prefetch=2")
    keys = ("step", "loss", "lr", "code_entropy", "prototypes_used")
    assert [r["step"] for r in inline] == list(range(1, 10))
    assert [[r[k] for k in keys] for r in ahead] == [[r[k] for k in keys] for r in inline]


def test_a_strict_unreadable_image_stops_a_prefetched_run_with_the_usual_error(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "images", classes=2, per_class=24, size=20)
    (data / "class1" / "zz-broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"unreadable image \(data.on_bad_image=error\).*zz-broken.png"):
        _run(tmp_path, "strict", data, "data.prefetch=2", "data.on_bad_image=error", "data.workers=0")
    assert not any(t.name == "swavctl-prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_on_cuda_the_side_stream_gives_the_same_run(tmp_path: Path, augment_on: str) -> None:
    """nvjpeg + batched augmentation (or pinned copies) on the side stream, against the same work
    on the step's stream. fp32 without TF32: only the order of some GPU sums may differ."""
    data = write_image_folder(tmp_path / "images", classes=2, per_class=24, size=20, fmt="jpg")
    common = (
        f"data.augment_on={augment_on}",
        "data.workers=2",
        "dist.gpus=1",
        "train.precision=fp32",
        "train.channels_last=false",
    )
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        inline = _run(tmp_path, "inline", data, *common, "data.prefetch=0")
        ahead = _run(tmp_path, "ahead", data, *common, "data.prefetch=2")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert [r["step"] for r in ahead] == [r["step"] for r in inline] == list(range(1, 10))
    for a, b in zip(inline, ahead, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["prototypes_used"] == a["prototypes_used"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_epoch_queues_on_the_one_stream_it_is_given() -> None:
    """A new torch.cuda.Stream() per epoch would strand the cached memory of the last epoch's
    stream; the loop makes one side stream per run and every epoch's thread must use it."""
    device = torch.device("cuda", torch.cuda.current_device())
    stream = side_stream(device)
    seen: list[torch.cuda.Stream] = []

    def prepare(batch: Batch, index: int) -> tuple[Batch, list[torch.Tensor] | None]:
        seen.append(torch.cuda.current_stream(device))
        assert batch.crops is not None
        return batch, [batch.crops[0].to(device, non_blocking=True) + index]

    for _ in range(3):  # epochs
        with Prefetcher(_batches(4), prepare, device=device, depth=1, stream=stream) as prefetcher:
            crops = [r.crops[0] for r in prefetcher if r.crops is not None]
        assert [float(c[0, 0]) for c in crops] == [float(i + i) for i in range(4)]
    assert seen == [stream] * 12 and stream != torch.cuda.current_stream(device)
