"""Export weights to safetensors (torchvision key names, string metadata) and import official SwAV.

File layout (format ``swavctl-export``, version 1):

* the backbone under its own module names, which for the ResNets are torchvision's
  (``conv1.weight``, ``bn1.running_mean``, ``layer4.2.bn3.weight`` ...; no ``fc``), so::

      m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()
      m.load_state_dict(safetensors.torch.load_file("backbone.safetensors"))   # strict

  loads with nothing missing or unexpected (likewise resnet18/34). The wide ResNet-50s and the
  ``-small`` stems keep the same names with other shapes; ``docs/export.md`` gives their recipes;
* with ``with_head=True`` also the projection head under ``head.*`` (``head.0`` Linear(d, hidden),
  ``head.1`` BatchNorm1d, ``head.3`` Linear(hidden, D); or ``head.weight/bias`` for a one-layer
  head) and the prototypes under ``prototypes.weight`` (K x D, the matrix C of the paper whose
  rows are L2-normalised before every training step, arXiv 2006.09882 Sec. 3.1); a model with
  several prototype sets (``model.prototypes = [K_0, K_1, ...]``, DeepCluster-v2 and SeLa-v2) has
  ``prototypes.0.weight`` (K_0 x D), ``prototypes.1.weight``, ... instead, and the metadata names
  them (``prototype_sets``);
* string-to-string metadata (:data:`METADATA_KEYS`), among them the resolved settings as JSON and
  ``payload_sha256``, the SHA-256 of the tensors as stored (recipe in
  :func:`swavctl.weights.safetensors_io.payload_sha256`).

Files are written to a temporary name and renamed
(:func:`swavctl.weights.safetensors_io.write_safetensors_atomic`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from swavctl import __version__
from swavctl.config import Settings, recorded_json, validate
from swavctl.errors import UserError
from swavctl.files.atomic import file_sha256, make_parent
from swavctl.weights.pickles import load_pickle_weights
from swavctl.weights.safetensors_io import (
    assert_finite,
    payload_sha256,
    read_safetensors,
    read_safetensors_header,
    write_safetensors_atomic,
)

if TYPE_CHECKING:  # the model (and torchvision) is not needed to read an export's header
    from swavctl.model.swav import SwAV

__all__ = [
    "DTYPES",
    "EXPORT_FORMAT",
    "FORMAT_VERSION",
    "HEAD_PREFIX",
    "METADATA_KEYS",
    "PROTOTYPES_KEY",
    "export_info",
    "export_metadata",
    "export_tensors",
    "import_official",
    "official_settings",
    "prototype_metadata",
    "write_export",
    "write_export_tensors",
]

EXPORT_FORMAT = "swavctl-export"
FORMAT_VERSION = 1
#: ``--dtype`` name -> torch dtype of the floating-point tensors in the file.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_PREFIX = "head."
PROTOTYPES_KEY = "prototypes.weight"
#: torchvision factory names whose models load an export strictly once ``fc = Identity()``.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")

#: Every metadata key an export carries (all values are strings; "" means unknown).
METADATA_KEYS = (
    "format",  # "swavctl-export"
    "format_version",  # "1"
    "arch",  # backbone name as in model.arch: resnet50, resnet50w2, resnet18-small, convnet-tiny ...
    "torchvision_arch",  # torchvision.models factory that loads the backbone strictly, or ""
    "feature_dim",  # pooled backbone feature dimension d
    "hidden_dim",  # projection-head hidden width (0 = one linear layer)
    "embedding_dim",  # dimension D of the embedding z
    "num_prototypes",  # K ("" when unknown: imported backbone-only); several sets: JSON [K_0, K_1, ...]
    "prototype_sets",  # several sets only: JSON [{"set": h, "key": "prototypes.h.weight", "size": K_h}, ...]
    "contents",  # "backbone" or "backbone+head"
    "dtype",  # fp32, bf16 or fp16 (floating tensors; num_batches_tracked stays int64)
    "mean",  # JSON list: normalisation mean (RGB, images in [0, 1])
    "std",  # JSON list: normalisation std
    "crop_size",  # side in px of the high-resolution training crops
    "crop_sizes",  # JSON list: all training crop sizes
    "swavctl_version",
    "settings",  # the resolved settings tree as JSON
    "step",  # optimizer steps done ("" when unknown)
    "epoch",  # epoch of the checkpoint ("" when unknown)
    "source",  # "swavctl" (trained here) or "official" (imported)
    "source_file",  # the checkpoint the weights came from (file name)
    "source_sha256",  # SHA-256 of that file's bytes ("" for an in-memory model)
    # JSON: versions, devices, command line, git commit, host, times (swavctl.reporting.provenance)
    "provenance",
    "payload_sha256",  # SHA-256 of the tensors as stored (swavctl.weights.safetensors_io.payload_sha256)
)

# SwAV paper defaults for an imported official model (arXiv 2006.09882, ImageNet recipe):
# the settings defaults are that recipe already (2x224 + 6x96 crops, mean/std with 0.228).


def export_tensors(model: SwAV, *, with_head: bool) -> dict[str, torch.Tensor]:
    """The tensors of an export: backbone (torchvision names) and optionally head and prototypes
    (``prototypes.weight``, or ``prototypes.h.weight`` per set for several sets: the model's keys)."""
    tensors = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    if with_head:
        tensors.update({HEAD_PREFIX + k: v.detach().cpu() for k, v in model.head.state_dict().items()})
        prototypes = model.prototypes.state_dict()
        tensors.update({"prototypes." + k: v.detach().cpu() for k, v in prototypes.items()})
    return tensors


def prototype_metadata(prototypes: int | Sequence[int]) -> dict[str, str]:
    """``num_prototypes`` (and, for several sets, ``prototype_sets``) of ``model.prototypes``.

    One set: ``{"num_prototypes": "K"}``, as every export has had. Several:
    ``num_prototypes`` is the JSON list of sizes and ``prototype_sets`` names each set by its
    index, its tensor key in an export with the head, and its size.
    """
    from swavctl.model.swav import prototype_set_keys, prototype_set_sizes

    sizes = prototype_set_sizes(prototypes)
    if len(sizes) == 1:
        return {"num_prototypes": str(sizes[0])}
    keys = prototype_set_keys(len(sizes))
    sets = [{"set": h, "key": key, "size": k} for h, (key, k) in enumerate(zip(keys, sizes, strict=True))]
    return {"num_prototypes": json.dumps(sizes), "prototype_sets": json.dumps(sets)}


def _cast(tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to ``dtype``; refuse values the target cannot represent."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    target = DTYPES[dtype]
    out: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        value = tensors[key]
        if not value.is_floating_point():
            out[key] = value  # num_batches_tracked keeps its integer type
            continue
        cast = value.to(target)
        if cast.numel() and not bool(torch.isfinite(cast).all()):
            peak = float(value.detach().abs().max())
            raise UserError(
                f"tensor {key!r} does not fit in {dtype} (largest magnitude {peak:.6g}); "
                "export with --dtype bf16 or fp32"
            )
        out[key] = cast
    return out


def _torchvision_arch(arch: str) -> str:
    return arch if arch in TORCHVISION_ARCHS else ""


def export_metadata(
    tensors: Mapping[str, torch.Tensor],
    *,
    settings: Settings,
    feature_dim: int,
    step: int | None,
    epoch: int | None,
    with_head: bool,
    dtype: str = "fp32",
    num_prototypes: int | list[int] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """String-to-string metadata of an export whose (already cast) tensors are ``tensors``.

    ``num_prototypes`` (K, or the list of set sizes) defaults to ``settings.model.prototypes``;
    pass ``0`` for "unknown".
    ``payload_sha256`` is computed over ``tensors`` exactly as they will be stored.
    """
    aug = settings.data.augment
    k = settings.model.prototypes if num_prototypes is None else num_prototypes
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "arch": settings.model.arch,
        "torchvision_arch": _torchvision_arch(settings.model.arch),
        "feature_dim": str(feature_dim),
        "hidden_dim": str(settings.model.hidden_dim),
        "embedding_dim": str(settings.model.embedding_dim),
        **(prototype_metadata(k) if k else {"num_prototypes": ""}),
        "contents": "backbone+head" if with_head else "backbone",
        "dtype": dtype,
        "mean": json.dumps(list(aug.mean)),
        "std": json.dumps(list(aug.std)),
        "crop_size": str(settings.data.crop_sizes[0]),
        "crop_sizes": json.dumps(list(settings.data.crop_sizes)),
        "swavctl_version": __version__,
        "settings": recorded_json(settings),
        "step": "" if step is None else str(step),
        "epoch": "" if epoch is None else str(epoch),
        "source": "swavctl",
        "source_file": "",
        "source_sha256": "",
    }
    meta.update(extra or {})
    if "provenance" not in meta:  # what made this file: the process writing it (a run passes its own)
        from swavctl.reporting.provenance import record

        meta["provenance"] = json.dumps(record())
    meta["payload_sha256"] = payload_sha256(tensors)
    return meta


def write_export_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    *,
    settings: Settings,
    feature_dim: int,
    step: int | None,
    epoch: int | None,
    with_head: bool,
    dtype: str = "fp32",
    num_prototypes: int | list[int] | None = None,
    extra: Mapping[str, str] | None = None,
    source: str = "model",
) -> dict[str, str]:
    """Cast ``tensors`` to ``dtype``, add metadata and write them to ``path`` atomically.

    NaN/Inf values are refused (naming ``source``) before anything is written, as are values
    that overflow the target dtype. Returns the metadata written.
    """
    assert_finite(tensors, source=source)
    cast = _cast(tensors, dtype)
    meta = export_metadata(
        cast,
        settings=settings,
        feature_dim=feature_dim,
        step=step,
        epoch=epoch,
        with_head=with_head,
        dtype=dtype,
        num_prototypes=num_prototypes,
        extra=extra,
    )
    write_safetensors_atomic(path, cast, meta)
    return meta


def write_export(
    model: SwAV,
    path: Path,
    *,
    settings: Settings,
    step: int | None,
    epoch: int | None,
    with_head: bool,
    dtype: str = "fp32",
    extra: Mapping[str, Any] | None = None,
    source: str = "model",
) -> dict[str, str]:
    """Write ``model``'s export to ``path`` atomically; returns the metadata written."""
    return write_export_tensors(
        export_tensors(model, with_head=with_head),
        Path(path),
        settings=settings,
        feature_dim=model.feature_dim,
        step=step,
        epoch=epoch,
        with_head=with_head,
        dtype=dtype,
        extra={k: str(v) for k, v in (extra or {}).items()},
        source=source,
    )


# --------------------------------------------------------------------------------------------
# --info
# --------------------------------------------------------------------------------------------


def export_info(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """What ``swavctl export --info`` shows: metadata and a summary of the tensors.

    Reads only the (validated) header unless ``verify``, which loads the tensors and recomputes
    ``payload_sha256``; a mismatch is a :class:`UserError`.
    """
    path = Path(path)
    entries, meta = read_safetensors_header(path)
    params = sum(math.prod(e["shape"]) for e in entries.values())
    info: dict[str, Any] = {
        "path": str(path),
        "bytes": path.stat().st_size,
        "tensors": len(entries),
        "parameters": params,
        "metadata": meta,
    }
    if verify:
        stated = meta.get("payload_sha256")
        if not stated:
            raise UserError(f"{path}: no payload_sha256 in its metadata to verify against")
        tensors, _ = read_safetensors(path)
        actual = payload_sha256(tensors)
        if actual != stated:
            raise UserError(
                f"{path}: payload SHA-256 {actual} does not match the metadata's {stated} "
                "(altered or corrupt)"
            )
        info["verified"] = True
    return info


# --------------------------------------------------------------------------------------------
# Import of official checkpoints
# --------------------------------------------------------------------------------------------


def official_settings(arch: str, head: Mapping[str, torch.Tensor]) -> Settings:
    """Settings describing an imported official model (the paper's ImageNet recipe otherwise).

    ``model.arch`` is ``arch``; ``hidden_dim``, ``embedding_dim`` and ``prototypes`` are read from
    the converted head's shapes (``head.0.weight`` is hidden x d, ``head.3.weight`` D x hidden,
    ``prototypes.weight`` K x D; a one-layer head has hidden 0; several sets
    ``prototypes.h.weight`` K_h x D give the list [K_0, K_1, ...]). Without a head they keep the
    paper's defaults (2048, 128, 3000). Crops (2x224 + 6x96) and normalisation (mean
    0.485/0.456/0.406, std 0.228/0.224/0.225) are the settings defaults, i.e. the paper's.
    """
    model: dict[str, Any] = {"arch": arch}
    if head:
        if "head.weight" in head:
            model["hidden_dim"] = 0
            model["embedding_dim"] = int(head["head.weight"].shape[0])
        else:
            model["hidden_dim"] = int(head["head.0.weight"].shape[0])
            model["embedding_dim"] = int(head["head.3.weight"].shape[0])
        if PROTOTYPES_KEY in head:
            model["prototypes"] = int(head[PROTOTYPES_KEY].shape[0])
        else:
            sets = sum(1 for key in head if key.startswith("prototypes."))
            model["prototypes"] = [int(head[f"prototypes.{h}.weight"].shape[0]) for h in range(sets)]
    return validate({"model": model}, source=f"official {arch} head")


def _read_official(path: Path) -> Any:
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path)
        return tensors
    return load_pickle_weights(path)


def _official_epoch(obj: Any) -> int | None:
    if isinstance(obj, Mapping):
        epoch = obj.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0:
            return epoch
    return None


def import_official(
    checkpoint: Path, *, arch: str, out: Path, with_head: bool = False, dtype: str = "fp32"
) -> dict[str, Any]:
    """Convert an official facebookresearch/swav checkpoint into a swavctl export at ``out``.

    The checkpoint is read with ``torch.load(weights_only=True)`` (a pickle that would build
    anything but tensors and plain containers is refused) or as safetensors; every key is
    accounted for by :func:`swavctl.weights.official.convert_official_state_dict`. The export carries
    :func:`official_settings`, so :func:`swavctl.weights.model_io.load_model` (and every command built on
    it) loads it like a file exported from a swavctl run. Returns a JSON-able summary.
    """
    from swavctl.weights.official import backbone_feature_dim, convert_official_state_dict

    checkpoint = Path(checkpoint)
    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if out.suffix != ".safetensors":
        raise UserError(f"--out should end in .safetensors, got {out}")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out} is the checkpoint being imported; choose another file")
    obj = _read_official(checkpoint)
    if isinstance(obj, Mapping) and "settings" in obj and "model" in obj:
        raise UserError(
            f"{checkpoint} is a swavctl checkpoint, not an official one; "
            f"export it with 'swavctl export {checkpoint}'"
        )
    backbone, head = convert_official_state_dict(obj, arch=arch, source=str(checkpoint))
    if with_head and not head:
        raise UserError(f"{checkpoint} holds no projection head or prototypes; drop --with-head")
    settings = official_settings(arch, head)
    tensors = {**backbone, **(head if with_head else {})}
    make_parent(out)
    meta = write_export_tensors(
        tensors,
        out,
        settings=settings,
        feature_dim=backbone_feature_dim(arch),
        step=None,
        epoch=_official_epoch(obj),
        with_head=with_head,
        dtype=dtype,
        num_prototypes=settings.model.prototypes if head else 0,
        extra={
            "source": "official",
            "source_file": checkpoint.name,
            "source_sha256": file_sha256(checkpoint),
        },
        source=str(checkpoint),
    )
    return {
        "path": str(out),
        "source": str(checkpoint),
        "arch": arch,
        "contents": meta["contents"],
        "dtype": dtype,
        "tensors": len(tensors),
        "checkpoint_has_head": bool(head),
        "payload_sha256": meta["payload_sha256"],
    }
