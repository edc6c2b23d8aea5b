"""The pickle policy: a PyTorch pickle is read only with ``torch.load(weights_only=True)``.

Only tensors and plain containers and scalars are allowed, on a torch without known bypasses of
that mode (:data:`MIN_SAFE_TORCH`); a file that would build any other object (and so could run
code) is refused with a one-line :class:`~swavctl.errors.UserError`.
"""

from __future__ import annotations

import itertools
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from swavctl.errors import UserError


def _unpickler_detail(message: str) -> str:
    marker = "WeightsUnpickler error:"
    idx = message.find(marker)
    if idx < 0:
        return ""
    detail = message[idx + len(marker) :]
    for stop in ("Please use", "Check the documentation"):
        cut = detail.find(stop)
        if cut >= 0:
            detail = detail[:cut]
    detail = " ".join(detail.split())
    return detail if len(detail) <= 200 else detail[:197] + "..."


#: Oldest torch whose ``torch.load(weights_only=True)`` has no known bypass (pyproject requires it).
MIN_SAFE_TORCH = (2, 10)


def torch_version_is_safe(version: str | None = None) -> bool:
    """Whether torch ``version`` (default: the running one) is at least :data:`MIN_SAFE_TORCH`."""
    text = torch.__version__ if version is None else version
    parts = []
    for piece in str(text).split("+")[0].split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            return False
        parts.append(int(digits))
    return len(parts) == 2 and tuple(parts) >= MIN_SAFE_TORCH


def load_pickle_weights(path: str | Path) -> Any:
    """Load a PyTorch pickle checkpoint with ``torch.load(weights_only=True)`` on the CPU.

    Only tensors and plain containers/scalars are allowed; a file that would build any other
    object (and so could run code) is refused with :class:`UserError`, as are missing,
    unreadable, truncated and corrupt files, and any torch older than :data:`MIN_SAFE_TORCH`.
    """
    path = Path(path)
    if not torch_version_is_safe():
        raise UserError(
            f"{path}: refusing to unpickle with torch {torch.__version__}: torch.load(weights_only=True) "
            f"has known bypasses before {MIN_SAFE_TORCH[0]}.{MIN_SAFE_TORCH[1]}; upgrade torch"
        )
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    # torch.save writes a zip archive; its legacy format (and plain pickles since protocol 2)
    # start with the PROTO opcode 0x80. Anything else is no checkpoint, hostile or not.
    if magic and not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x80")):
        raise UserError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        suffix = f" ({detail})" if detail else ""
        raise UserError(
            f"{path}: refused for safety: the file contains code or objects that are not plain "
            f"weights{suffix}"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (
        EOFError,
        RuntimeError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        struct.error,
        zipfile.BadZipFile,
        UnicodeDecodeError,
        RecursionError,
        MemoryError,
    ) as exc:
        text = " ".join(str(exc).split())
        if len(text) > 200:
            text = text[:197] + "..."
        reason = (
            text if isinstance(exc, RuntimeError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")
        )
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {reason}"
        ) from None
