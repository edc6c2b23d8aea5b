"""safetensors files: validated reading, atomic writing (:mod:`swavctl.files.atomic`), hashing.

Everything here is a pure function with no CLI. Bad input from the user (a malformed or hostile
file) raises :class:`~swavctl.errors.UserError` with a one-line message naming the file and the
reason; anything else is a bug.

safetensors layout (https://github.com/huggingface/safetensors)::

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON header][data region]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the data region) plus an optional ``"__metadata__"`` str->str dict.
:func:`read_safetensors` checks all of this itself, using only the header bytes, before the file
reaches the safetensors library, so a hostile header (say, a declared length of 2**60 bytes) is
refused at once without allocating memory proportional to the declared sizes.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from swavctl.errors import UserError
from swavctl.files.atomic import write_atomic
from swavctl.weights.containers import MAX_HEADER_BYTES, header_or_refuse

__all__ = [
    "DTYPES",
    "assert_finite",
    "payload_sha256",
    "read_safetensors",
    "read_safetensors_header",
    "read_safetensors_metadata",
    "write_safetensors_atomic",
]


def _build_dtypes() -> dict[str, torch.dtype]:
    table: dict[str, torch.dtype] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    # F8 types only where both this torch and the installed safetensors know them.
    try:
        import safetensors.torch as st_torch

        lib_types: Mapping[str, Any] = getattr(st_torch, "_TYPES", {})
    except ImportError:  # pragma: no cover - safetensors is a hard dependency
        lib_types = {}
    for name, attr in (
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ):
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype) and lib_types.get(name) == dtype:
            table[name] = dtype
    return table


#: safetensors dtype name -> torch dtype, for every dtype this module reads and writes.
DTYPES: dict[str, torch.dtype] = _build_dtypes()
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _validate_header(path: Path, max_header_bytes: int) -> tuple[dict[str, Any], dict[str, str]]:
    return header_or_refuse(path, max_header_bytes, _ITEMSIZE)


def _validate(path: Path, max_header_bytes: int) -> dict[str, str]:
    return _validate_header(path, max_header_bytes)[1]


def read_safetensors(
    path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate and load a safetensors file; return ``(tensors, metadata)`` with CPU tensors.

    The header is checked first (length, UTF-8 JSON object, str->str ``__metadata__``, known
    dtypes, non-negative integer shapes, ``data_offsets`` sizes agreeing with shape and dtype,
    tensors tiling the data region exactly with no gap, overlap or trailing bytes). Only then is
    the file handed to ``safetensors``. Any problem raises :class:`UserError`.
    """
    path = Path(path)
    metadata = _validate(path, max_header_bytes)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{path}: not a valid safetensors file: {reason}") from None
    return tensors, metadata


def read_safetensors_metadata(
    path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> dict[str, str]:
    """Validate a safetensors file as :func:`read_safetensors` does; return only its metadata.

    Reads the header only, never the tensor data (for ``export --info``).
    """
    return _validate(Path(path), max_header_bytes)


def read_safetensors_header(
    path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Validate a safetensors file as :func:`read_safetensors` does; return its header only.

    Returns ``(entries, metadata)``: ``entries`` maps each tensor name to its validated
    ``{"dtype", "shape", "data_offsets"}``. The tensor data is never read.
    """
    return _validate_header(Path(path), max_header_bytes)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def assert_finite(tensors: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise :class:`UserError` if a floating-point tensor holds NaN or Inf.

    Keys are checked in sorted order, so the message names the first bad key in that order.
    Integer, empty and meta-device tensors are skipped.
    ``source`` (a file name or a description) starts the message.
    """
    for key in sorted(tensors):
        t = tensors[key]
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0 or t.is_meta:
            continue  # meta tensors have no values to check
        if t.element_size() == 1:  # float8: isfinite is not implemented for it
            t = t.float()
        # Fast path: NaN and Inf propagate through a sum (inf - inf is NaN), so a finite sum
        # proves every element finite. A non-finite sum may be mere overflow: check exactly.
        if bool(torch.isfinite(t.sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{source}: tensor {key!r} contains NaN or Inf values")


def _prepare_for_write(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be str, got {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key!r} is a {type(value).__name__}, not a torch.Tensor")
        if value.dtype not in _DTYPE_NAMES:
            raise UserError(f"{path}: tensor {key!r} has dtype {value.dtype}, which cannot be saved")
        t = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory; give every tensor its own storage.
        if t.numel() > 0:
            if t.untyped_storage().data_ptr() in seen_storage:
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def write_safetensors_atomic(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` as safetensors, atomically (:func:`write_atomic`).

    Tensors are detached, moved to CPU and made contiguous; non-finite values are refused
    (:func:`assert_finite`) before anything touches the disk. The file is serialised in memory
    and written by :func:`write_atomic`, so the only temporary is ours (``safetensors.save_file``
    makes its own, which a kill would leave behind) and a write failure is one line.
    """
    from safetensors.torch import save

    path = Path(path)
    meta: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
        meta[key] = value
    if "__metadata__" in tensors:
        raise UserError(f"{path}: '__metadata__' cannot be used as a tensor name")
    prepared = _prepare_for_write(tensors, path)
    assert_finite(prepared, source=str(path))
    data = save(prepared, metadata=meta)
    del prepared
    write_atomic(path, lambda handle: handle.write(data))


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a set of tensors, independent of dict order and file layout.

    Recipe, for a third party to recompute. ``u64(n)`` is ``n`` as 8 bytes little-endian and
    ``blob(b)`` is ``u64(len(b)) + b``. For each key in sorted order (Python ``sorted`` on
    ``str``, i.e. by Unicode code point), feed to one SHA-256::

        blob(key.encode("utf-8"))
        blob(dtype.encode("ascii"))          # safetensors dtype name: "F32", "BF16", "I64", ...
        u64(ndim) + u64(dim_0) + ... + u64(dim_{ndim-1})
        blob(raw)                            # the C-contiguous element bytes, little-endian

    ``raw`` is exactly the bytes safetensors stores for the tensor (bf16 as its 2-byte patterns,
    bool as one byte 0/1 per element). Device, strides and ``requires_grad`` do not matter.
    """
    h = hashlib.sha256()

    def u64(n: int) -> bytes:
        return struct.pack("<Q", n)

    for key in sorted(tensors):
        t = tensors[key]
        name = _DTYPE_NAMES.get(t.dtype)
        if name is None:
            raise TypeError(f"tensor {key!r}: dtype {t.dtype} has no safetensors name")
        key_bytes = key.encode("utf-8")
        h.update(u64(len(key_bytes)) + key_bytes)
        h.update(u64(len(name)) + name.encode("ascii"))
        h.update(u64(t.dim()) + b"".join(u64(d) for d in t.shape))
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()  # bf16/f8/bool all have a uint8 view
        if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover
            raw = raw.reshape(-1, t.element_size())[:, ::-1].copy().reshape(-1)
        h.update(u64(raw.nbytes))
        h.update(raw.data)  # no copy
    return h.hexdigest()
