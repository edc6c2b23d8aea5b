"""Batches made ready for the training step ahead of time, on a background thread.

Without it, the step's host work runs one piece after another: take a batch from the DataLoader,
decode it (nvjpeg), queue its augmentation or its host-to-device copy, then queue the forward.
The GPU has nothing to do while the host does the first pieces. With ``depth`` > 0, a thread does
them for the next ``depth`` batches while the step before is still running; on a GPU it queues
that work on a side CUDA stream, so copies and augmentation kernels can also overlap the
step's kernels (as timm's ``PrefetchLoader`` does for the copy). The step's stream waits for a
batch's event before it uses the batch, and ``record_stream`` keeps the caching allocator from
reusing the crops' memory while the step's stream still reads them.

Results do not depend on ``depth``: the batches come in the sampler's order and the augmentation
of each is seeded by its step, not by anything that runs in between. An exception in the thread
(an unreadable image with ``data.on_bad_image=error``, an out-of-memory error) is raised by
:meth:`Prefetcher.__next__` at the position of the batch it belongs to.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from swavctl.data.dataset import Batch

#: ``prepare(batch, index)`` -> (the batch as the step sees it, its crops on the device or None).
Prepare = Callable[[Batch, int], tuple[Batch, list[torch.Tensor] | None]]

_END, _ITEM, _ERROR = "end", "item", "error"


def side_stream(device: torch.device) -> Any:
    """A CUDA stream for the prefetch thread's work on ``device`` (None on other devices)."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


@dataclass
class Ready:
    """A batch and its crops, ready for the step (``crops`` is None for an empty batch)."""

    batch: Batch
    crops: list[torch.Tensor] | None
    event: Any = None  # a torch.cuda.Event on the side stream, or None


class Prefetcher:
    """Iterates over ``batches`` (one epoch of the DataLoader) as :class:`Ready` items.

    ``prepare`` is called with each batch and its index (0, 1, ... in this iterator). With
    ``depth`` = 0 everything happens in :meth:`__next__`, in the caller's thread. Call
    :meth:`close` when done, also after an error: it stops and joins the thread.

    On a GPU the work is queued on ``stream``; pass one stream (:func:`side_stream`) for every
    epoch of a run. ``torch.cuda.Stream()`` hands out streams from a small round-robin pool, and
    the caching allocator reuses a freed block only on the stream it was allocated on: a new
    stream each epoch would strand the last epoch's cached augmentation memory, and now and then
    be the stream that NCCL's all-reduce runs on.
    """

    def __init__(
        self,
        batches: Iterator[Batch],
        prepare: Prepare,
        *,
        device: torch.device,
        depth: int,
        stream: Any = None,
    ) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._batches = batches
        self._prepare = prepare
        self._device = device
        self._index = 0
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        if depth == 0:
            return
        if device.type == "cuda":
            self._stream = stream if stream is not None else side_stream(device)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swavctl-prefetch", daemon=True)
        self._thread.start()

    # ----- the thread

    def _run(self) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self._device)  # the current device is per thread
            for index, batch in enumerate(self._batches):
                if self._stop.is_set():
                    return
                ready = self._make_ready(batch, index)
                if not self._put((_ITEM, ready)):
                    return
            self._put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((_ERROR, exc))

    def _make_ready(self, batch: Batch, index: int) -> Ready:
        if self._stream is None:
            return Ready(*self._prepare(batch, index))
        with torch.cuda.stream(self._stream):
            prepared, crops = self._prepare(batch, index)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Ready(prepared, crops, event)

    def _put(self, item: tuple[str, Any]) -> bool:
        """Put ``item`` unless :meth:`close` was called first; returns whether it was put."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    # ----- the consumer

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Ready:
        if self._thread is None:
            batch = next(self._batches)  # StopIteration ends the epoch
            self._index += 1
            return Ready(*self._prepare(batch, self._index - 1))
        kind, value = self._queue.get()
        if kind == _END:
            self._queue.put((_END, None))  # later calls end too
            raise StopIteration
        if kind == _ERROR:
            self._queue.put((_ERROR, value))
            raise value
        ready: Ready = value
        if ready.event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(ready.event)
            for crop in ready.crops or []:
                crop.record_stream(current)
        return ready

    def close(self) -> None:
        """Stop the thread (it may first finish the batch it is making) and wait for it."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
