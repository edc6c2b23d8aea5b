"""Tests for safetensors_io, files.atomic and pickles: validated safetensors reading, atomic
writing, safe pickle loading."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from swavctl.errors import UserError
from swavctl.files.atomic import file_sha256
from swavctl.weights.pickles import load_pickle_weights
from swavctl.weights.safetensors_io import (
    assert_finite,
    payload_sha256,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors_atomic,
)


def _raw_file(path: Path, header: Any, data: bytes = b"", *, declared: int | None = None) -> Path:
    """Write a safetensors-shaped file by hand: u64 LE header length + JSON header + data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def _f32(shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def _refused(path: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        read_safetensors(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(UserError, match=match):
        read_safetensors_metadata(path)


# ---- malformed files -------------------------------------------------------------------------


def test_valid_handmade_file_loads(tmp_path: Path) -> None:
    data = struct.pack("<2f", 1.5, -2.0) + struct.pack("<b", 7)
    header = {
        "__metadata__": {"k": "v"},
        "a": _f32([2], 0, 8),
        "b": {"dtype": "I8", "shape": [1], "data_offsets": [8, 9]},
        "empty": _f32([0, 3], 9, 9),
    }
    tensors, meta = read_safetensors(_raw_file(tmp_path / "ok.safetensors", header, data))
    assert meta == {"k": "v"}
    assert tensors["a"].tolist() == [1.5, -2.0]
    assert tensors["b"].tolist() == [7]
    assert tensors["empty"].shape == (0, 3)


def test_shorter_than_8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    _refused(path, "shorter than the 8-byte")


def test_huge_declared_header_is_refused_fast(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "huge.safetensors", {"a": _f32([1], 0, 4)}, b"\0" * 4, declared=2**60)
    start = time.perf_counter()
    _refused(path, "exceeds the limit")
    assert time.perf_counter() - start < 2.0


def test_max_header_bytes_is_configurable(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "h.safetensors", {"a": _f32([1], 0, 4)}, b"\0" * 4)
    with pytest.raises(UserError, match="exceeds the limit of 8 bytes"):
        read_safetensors(path, max_header_bytes=8)


def test_header_longer_than_file(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "long.safetensors", {"a": _f32([1], 0, 4)}, b"\0" * 4, declared=10_000)
    _refused(path, "exceeds the .* bytes after it")


def test_invalid_json(tmp_path: Path) -> None:
    _refused(_raw_file(tmp_path / "j.safetensors", b'{"a": [1, 2'), "not valid JSON")


def test_invalid_utf8(tmp_path: Path) -> None:
    _refused(_raw_file(tmp_path / "u.safetensors", b'{"\xff\xfe": 1}'), "not valid UTF-8")


def test_header_not_an_object(tmp_path: Path) -> None:
    _refused(_raw_file(tmp_path / "l.safetensors", [1, 2, 3]), "not an object")


def test_deeply_nested_json(tmp_path: Path) -> None:
    _refused(_raw_file(tmp_path / "n.safetensors", b"[" * 100_000 + b"]" * 100_000), "nested too deeply")


def test_duplicate_keys(tmp_path: Path) -> None:
    blob = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'
    _refused(_raw_file(tmp_path / "d.safetensors", blob, b"\0" * 4), "duplicate key")


def test_bad_metadata_type(tmp_path: Path) -> None:
    header = {"__metadata__": {"epochs": 3}, "a": _f32([1], 0, 4)}
    _refused(_raw_file(tmp_path / "m.safetensors", header, b"\0" * 4), "__metadata__ value for 'epochs'")
    header2: dict[str, Any] = {"__metadata__": ["x"], "a": _f32([1], 0, 4)}
    _refused(_raw_file(tmp_path / "m2.safetensors", header2, b"\0" * 4), "__metadata__ is not an object")


def test_unknown_dtype(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    _refused(_raw_file(tmp_path / "t.safetensors", header, b"\0" * 16), "unknown dtype 'F128'")


def test_negative_or_non_integer_shape(tmp_path: Path) -> None:
    _refused(_raw_file(tmp_path / "s1.safetensors", {"a": _f32([-1], 0, 0)}), "non-negative integers")
    _refused(_raw_file(tmp_path / "s2.safetensors", {"a": _f32([1.0], 0, 4)}, b"\0" * 4), "non-negative")
    _refused(_raw_file(tmp_path / "s3.safetensors", {"a": _f32([True], 0, 4)}, b"\0" * 4), "non-negative")


def test_begin_after_end(tmp_path: Path) -> None:
    _refused(_raw_file(tmp_path / "o.safetensors", {"a": _f32([0], 4, 0)}, b"\0" * 4), "is after end")


def test_offsets_past_end(tmp_path: Path) -> None:
    header = {"a": _f32([1], 0, 4), "b": _f32([1], 4, 8)}
    _refused(_raw_file(tmp_path / "p.safetensors", header, b"\0" * 6), "past the end of the 6-byte data")


def test_huge_offsets_past_end_fast(tmp_path: Path) -> None:
    header = {"a": _f32([2**40], 0, 2**42)}
    path = _raw_file(tmp_path / "p2.safetensors", header, b"\0" * 4)
    start = time.perf_counter()
    _refused(path, "past the end")
    assert time.perf_counter() - start < 2.0


def test_shape_disagrees_with_dtype(tmp_path: Path) -> None:
    header = {"a": _f32([3], 0, 8)}  # 3 floats need 12 bytes
    _refused(_raw_file(tmp_path / "sd.safetensors", header, b"\0" * 8), "shape disagrees with dtype")


def test_trailing_bytes(tmp_path: Path) -> None:
    header = {"a": _f32([1], 0, 4)}
    _refused(_raw_file(tmp_path / "tr.safetensors", header, b"\0" * 7), "3 trailing bytes")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}
    _refused(_raw_file(tmp_path / "ov.safetensors", header, b"\0" * 12), "overlaps")


def test_gap_between_tensors(tmp_path: Path) -> None:
    header = {"a": _f32([1], 0, 4), "b": _f32([1], 8, 12)}
    _refused(_raw_file(tmp_path / "gap.safetensors", header, b"\0" * 12), "gap of 4 unused bytes")


def test_missing_field(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [1]}}
    _refused(_raw_file(tmp_path / "mf.safetensors", header, b"\0" * 4), "missing field")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="directory"):
        read_safetensors(tmp_path)


# ---- writing -----------------------------------------------------------------------------------


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "bf": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "d": torch.randn(2, generator=g).double(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "u": torch.tensor([0, 255], dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }


def test_round_trip_exact(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    tensors = _sample()
    meta = {"format": "swavctl", "arch": "resnet50"}
    write_safetensors_atomic(path, tensors, meta)
    loaded, loaded_meta = read_safetensors(path)
    assert loaded_meta == meta
    assert read_safetensors_metadata(path) == meta
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key
    assert payload_sha256(loaded) == payload_sha256(tensors)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_write_shared_storage_and_views(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    tensors = {"a": base, "b": base, "c": base[2:5]}
    write_safetensors_atomic(tmp_path / "s.safetensors", tensors, {})
    loaded, _ = read_safetensors(tmp_path / "s.safetensors")
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)


def test_overwrite_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic(path, {"a": torch.ones(2)}, {"v": "1"})
    write_safetensors_atomic(path, {"b": torch.zeros(3)}, {"v": "2"})
    loaded, meta = read_safetensors(path)
    assert meta == {"v": "2"} and list(loaded) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_write_leaves_old_file_intact(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "keep.safetensors"
    write_safetensors_atomic(path, {"a": torch.ones(2)}, {"v": "old"})
    before = path.read_bytes()
    with pytest.raises(UserError, match="'b' contains NaN or Inf"):
        write_safetensors_atomic(path, {"a": torch.zeros(2), "b": torch.tensor([1.0, bad])}, {"v": "new"})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


def test_failure_mid_write_leaves_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keep.safetensors"
    write_safetensors_atomic(path, {"a": torch.ones(2)}, {})
    before = path.read_bytes()

    def boom(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UserError, match="No space left"):
        write_safetensors_atomic(path, {"a": torch.zeros(2)}, {})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


def test_write_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot write"):
        write_safetensors_atomic(tmp_path / "no" / "x.safetensors", {"a": torch.ones(1)}, {})


def test_assert_finite() -> None:
    assert_finite({"a": torch.ones(3), "i": torch.arange(3), "e": torch.zeros(0)}, source="x")
    bad = {"z": torch.tensor([float("nan")]), "b": torch.tensor([1.0, float("inf")]).to(torch.bfloat16)}
    with pytest.raises(UserError, match="^model.pt: tensor 'b' contains NaN or Inf"):
        assert_finite(bad, source="model.pt")


# ---- hashing -----------------------------------------------------------------------------------


def test_payload_sha256_order_independent_and_sensitive() -> None:
    tensors = _sample()
    digest = payload_sha256(tensors)
    assert len(digest) == 64
    assert payload_sha256(dict(reversed(list(tensors.items())))) == digest
    changed = dict(tensors)
    changed["bf"] = tensors["bf"].clone()
    changed["bf"][0, 0] += 1
    assert payload_sha256(changed) != digest
    # Same bytes but different dtype, shape or name all change the digest.
    assert payload_sha256({"a": torch.zeros(4)}) != payload_sha256({"a": torch.zeros(4, dtype=torch.int32)})
    assert payload_sha256({"a": torch.zeros(4)}) != payload_sha256({"a": torch.zeros(2, 2)})
    assert payload_sha256({"a": torch.zeros(4)}) != payload_sha256({"b": torch.zeros(4)})


def test_payload_sha256_documented_recipe() -> None:
    tensors = {
        "b": torch.tensor([1.0, 2.0]).to(torch.bfloat16),
        "a": torch.tensor([[1, 2]], dtype=torch.int32),
    }

    def blob(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    h = hashlib.sha256()
    h.update(blob(b"a") + blob(b"I32") + struct.pack("<QQQ", 2, 1, 2) + blob(struct.pack("<2i", 1, 2)))
    # bf16 1.0 = 0x3F80, 2.0 = 0x4000
    h.update(blob(b"b") + blob(b"BF16") + struct.pack("<QQ", 1, 2) + blob(struct.pack("<2H", 0x3F80, 0x4000)))
    assert payload_sha256(tensors) == h.hexdigest()


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * 2**20 + 17)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(UserError, match="no such file"):
        file_sha256(tmp_path / "missing")


# ---- pickle checkpoints ---------------------------------------------------------------------


class _Evil:
    """Unpickling this creates a file (stand-in for arbitrary code execution)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.target, "w"))


class _EvilSystem:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("evil_cls", [_Evil, _EvilSystem])
@pytest.mark.parametrize("saver", ["torch", "pickle2", "pickle"])
def test_hostile_pickle_refused(tmp_path: Path, saver: str, evil_cls: Any) -> None:
    target = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.ones(2)}, "x": evil_cls(str(target))}
    path = tmp_path / "evil.pt"
    if saver == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2 if saver == "pickle2" else pickle.DEFAULT_PROTOCOL)
    with pytest.raises(UserError, match="refused for safety: the file contains code or objects") as info:
        load_pickle_weights(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)
    assert not target.exists()


def test_plain_weights_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.pt"
    payload = {"state_dict": {"w": torch.arange(3.0)}, "epoch": 5, "name": "x", "lst": [1, 2.0]}
    torch.save(payload, path)
    loaded = load_pickle_weights(path)
    assert loaded["epoch"] == 5 and loaded["lst"] == [1, 2.0]
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))


def test_pickle_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_pickle_weights(tmp_path / "missing.pt")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_pickle_corrupt(tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(100)}, good)
    data = good.read_bytes()
    path = tmp_path / "bad.pt"
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"hello world garbage", "empty": b""}[kind]
    )
    with pytest.raises(UserError) as info:
        load_pickle_weights(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
