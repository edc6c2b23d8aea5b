"""Containers checked without torch: a safetensors header, a zip archive, a pickle's first bytes.

A command checks the file it is given here before it imports torch (about 1 to 3 s), so a file
that is no checkpoint or export at all is refused at once. A container that passes is then read
by :mod:`swavctl.weights.safetensors_io`, which validates the header again against the dtypes this torch
knows and checks a pickle's contents (only torch can: ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swavctl.errors import UserError, messages
from swavctl.files import latest

#: Default cap on the JSON header size (100 MiB).
MAX_HEADER_BYTES = 100 * 2**20

#: Bytes per element of every safetensors dtype name (torch may know fewer; safetensors_io checks that).
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
}

#: File suffixes read as PyTorch pickles (torch.save) rather than safetensors.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".tar", ".ckpt", ".bin", ".pkl"})

#: torch.save writes a zip archive; its legacy format (and plain pickles since protocol 2) start
#: with the PROTO opcode 0x80.
PICKLE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x80")


class BadContainer(Exception):
    """The reason a file is malformed (a message completed by the caller)."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadContainer(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise BadContainer(f"header contains the non-JSON constant {name}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_safetensors_header(
    fh: Any, file_size: int, max_header_bytes: int, itemsize: Mapping[str, int] = ITEMSIZE
) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate the header of an open safetensors file; return (tensor entries, metadata).

    ``itemsize`` gives the bytes per element of each dtype name accepted; a tensor's
    ``data_offsets`` must span exactly ``prod(shape) * itemsize[dtype]`` bytes.
    """
    header, header_len = _read_header_object(fh, file_size, max_header_bytes)
    metadata = _pop_metadata(header)
    data_len = file_size - 8 - header_len
    spans = [(*_tensor_span(name, entry, itemsize, data_len), name) for name, entry in header.items()]
    _check_tiling(spans, data_len)
    return header, metadata


def _read_header_object(fh: Any, file_size: int, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    """The header's JSON object and its declared length: 8 bytes of length, then UTF-8 JSON."""
    if file_size < 8:
        raise BadContainer(f"file is {file_size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", fh.read(8))
    if header_len > max_header_bytes:
        raise BadContainer(
            f"declared header length {header_len} exceeds the limit of {max_header_bytes} bytes"
        )
    if header_len > file_size - 8:
        raise BadContainer(f"declared header length {header_len} exceeds the {file_size - 8} bytes after it")
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise BadContainer("file shrank while being read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadContainer(f"header is not valid UTF-8 (byte {exc.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadContainer(f"header is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise BadContainer("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise BadContainer(f"header is a JSON {type(header).__name__}, not an object")
    return header, header_len


def _pop_metadata(header: dict[str, Any]) -> dict[str, str]:
    """Remove ``__metadata__`` from ``header`` and return it, checked to map strings to strings."""
    metadata_raw = header.pop("__metadata__", None)
    if metadata_raw is None:
        metadata_raw = {}
    if not isinstance(metadata_raw, dict):
        raise BadContainer("__metadata__ is not an object of string values")
    metadata: dict[str, str] = {}
    for key, value in metadata_raw.items():
        if not isinstance(value, str):
            raise BadContainer(f"__metadata__ value for {key!r} is not a string")
        metadata[key] = value
    return metadata


def _tensor_span(name: str, entry: Any, itemsize: Mapping[str, int], data_len: int) -> tuple[int, int]:
    """One tensor's checked ``(begin, end)`` in the data region: fields, dtype, shape, size."""
    if not isinstance(entry, dict):
        raise BadContainer(f"tensor {name!r}: entry is not an object")
    missing = {"dtype", "shape", "data_offsets"} - entry.keys()
    if missing:
        raise BadContainer(f"tensor {name!r}: missing field(s) {', '.join(sorted(missing))}")
    extra = entry.keys() - {"dtype", "shape", "data_offsets"}
    if extra:
        raise BadContainer(f"tensor {name!r}: unexpected field(s) {', '.join(sorted(extra))}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in itemsize:
        raise BadContainer(f"tensor {name!r}: unknown dtype {_short(dtype)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise BadContainer(f"tensor {name!r}: shape {_short(shape)} is not a list of non-negative integers")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise BadContainer(f"tensor {name!r}: data_offsets {_short(offsets)} is not [begin, end]")
    begin, end = offsets
    if begin > end:
        raise BadContainer(f"tensor {name!r}: data_offsets begin {begin} is after end {end}")
    if end > data_len:
        raise BadContainer(
            f"tensor {name!r}: data_offsets end {end} is past the end of the {data_len}-byte data region"
        )
    needed = math.prod(shape) * itemsize[dtype]
    if end - begin != needed:
        raise BadContainer(
            f"tensor {name!r}: shape disagrees with dtype: {_short(shape)} x {dtype} needs "
            f"{_short(needed, 30)} bytes but data_offsets span {end - begin}"
        )
    return begin, end


def _check_tiling(spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors tile the data region exactly: no gap, no overlap, no trailing bytes."""
    spans.sort()
    cursor = 0
    prev = None
    for begin, end, name in spans:
        if begin > cursor:
            raise BadContainer(f"gap of {begin - cursor} unused bytes before tensor {name!r}")
        if begin < cursor:
            raise BadContainer(f"tensor {name!r} overlaps tensor {prev!r}")
        cursor = end
        prev = name
    if cursor != data_len:
        raise BadContainer(f"{data_len - cursor} trailing bytes after the last tensor")


def _head(path: Path, n: int = 4) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None


def looks_like_pickle(path: Path) -> bool:
    """Whether ``path`` starts as a torch.save file does (a zip archive or a pickle)."""
    return _head(path).startswith(PICKLE_MAGIC)


def is_safetensors(path: Path) -> bool:
    """Whether a weights file is read as safetensors: by its suffix, or, for a suffix that names
    neither, by not starting as a torch.save zip archive or pickle does."""
    if path.suffix == ".safetensors":
        return True
    return path.suffix not in PICKLE_SUFFIXES and not looks_like_pickle(path)


def check_safetensors(path: Path) -> None:
    """Refuse a file whose safetensors header is malformed (the tensor data is not read)."""
    header_or_refuse(path, MAX_HEADER_BYTES)


def header_or_refuse(
    path: Path, max_header_bytes: int, itemsize: Mapping[str, int] = ITEMSIZE
) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`parse_safetensors_header` of the file at ``path``, with each way it can fail as a
    one-line :class:`UserError` naming the file."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            return parse_safetensors_header(fh, size, max_header_bytes, itemsize)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a safetensors file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except BadContainer as exc:
        raise UserError(f"{path}: not a valid safetensors file: {exc}") from None


def check_pickle_container(path: Path) -> None:
    """Refuse a file that is neither a readable zip archive nor a pickle (its contents need torch)."""
    head = _head(path)
    if not head.startswith(PICKLE_MAGIC):
        raise UserError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    broken = f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?)"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise UserError(f"{broken}: not a zip archive: {' '.join(str(exc).split())}") from None
        if not any(name.endswith("data.pkl") for name in names):
            raise UserError(f"{broken}: a zip archive without the data.pkl that torch.save writes")
    elif len(head) < 2 or not 2 <= head[1] <= 5:
        raise UserError(f"{broken}: not a pickle (unknown protocol)")


def check_weights_file(path: Path) -> None:
    """Check the container of a weights file: safetensors by its suffix (or by not starting as a
    pickle does), else a torch.save zip archive or pickle, as :func:`swavctl.weights.model_io.load_model`
    tells them apart."""
    if is_safetensors(path):
        check_safetensors(path)
    else:
        check_pickle_container(path)


def check_model_file(path: Path) -> None:
    """Check what MODEL names before torch is imported: that it exists, and, for a file, that its
    container is sound (a run folder is left to the loader)."""
    path = latest.follow(Path(path).expanduser())
    if not path.exists():
        raise UserError(messages.model_not_found(path))
    if path.is_dir() or (path.suffix == ".json" and path.with_suffix(".pt").is_file()):
        return
    check_weights_file(path)
