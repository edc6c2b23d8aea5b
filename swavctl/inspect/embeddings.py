"""A disk-backed store of embeddings: written once while streaming, read back chunk by chunk.

The balanced assignment needs several passes over the embeddings of the whole dataset. Running
the backbone again on every pass would multiply the cost; holding them in memory would not scale
(1.28M x 128 floats is 655 MB, and a 1.2M-image folder must not hold all features). So the
embeddings (float32, N x D) are appended to a raw file and memory-mapped for the later passes;
memory stays at one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from swavctl.errors import OutputWriteError


class EmbeddingStore:
    """Append-only float32 N x D rows in ``path``; iterate them back with :meth:`chunks`."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        self.rows = 0
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in finish()/remove()
        self._map: np.memmap | None = None

    def append(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected N x {self.dim} embeddings, got {tuple(embeddings.shape)}")
        array = embeddings.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            self._handle.write(array.tobytes())
        except OSError as exc:
            raise self._write_error(exc) from None
        self.rows += int(array.shape[0])

    def _write_error(self, exc: OSError) -> OutputWriteError:
        where = f"the embeddings in {self.path.parent} ({self.rows} rows so far)"
        return OutputWriteError(where, exc.errno, str(exc.strerror or exc))

    def finish(self) -> None:
        """Stop writing; the rows become readable."""
        if not self._handle.closed:
            try:
                self._handle.close()
            except OSError as exc:
                raise self._write_error(exc) from None
        if self.rows and self._map is None:
            self._map = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows x D float32 tensor) for consecutive blocks of at most ``rows`` rows."""
        if self._map is None:
            raise RuntimeError("call finish() before reading")
        for start in range(0, self.rows, rows):
            yield start, torch.from_numpy(np.array(self._map[start : start + rows]))

    def remove(self) -> None:
        """Close and delete the file."""
        if not self._handle.closed:
            self._handle.close()
        self._map = None
        self.path.unlink(missing_ok=True)
