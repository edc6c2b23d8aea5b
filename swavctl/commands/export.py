"""``swavctl export``: safetensors exports, ``--info`` on one, and import of official checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from swavctl.commands.common import JsonOpt, err, fail
from swavctl.errors import UserError
from swavctl.errors.messages import DEFAULT_MODEL, check_output_file
from swavctl.files.latest import follow
from swavctl.weights.containers import (
    check_model_file,
    check_pickle_container,
    check_safetensors,
    is_safetensors,
)

#: The --dtype names of swavctl.weights.export.DTYPES (named here so that the command can check MODEL
#: before importing torch).
_DTYPE_NAMES = ("fp32", "bf16", "fp16")

_INFO_ORDER = (
    "format",
    "format_version",
    "arch",
    "torchvision_arch",
    "contents",
    "dtype",
    "feature_dim",
    "hidden_dim",
    "embedding_dim",
    "num_prototypes",
    "prototype_sets",
    "mean",
    "std",
    "crop_size",
    "crop_sizes",
    "step",
    "epoch",
    "source",
    "source_file",
    "source_sha256",
    "swavctl_version",
    "payload_sha256",
)


def _sets_text(value: str) -> str:
    """``prototype_sets`` as a line: ``3 sets: 0 = prototypes.0.weight (3000), ...`` (else as stored)."""
    try:
        sets = json.loads(value)
        parts = [f"{s['set']} = {s['key']} ({s['size']})" for s in sets]
    except (ValueError, TypeError, KeyError):
        return value
    return f"{len(parts)} sets: {', '.join(parts)}"


def _print_info(info: dict[str, Any]) -> None:
    meta: dict[str, str] = info["metadata"]
    err.print(
        f"{info['path']}: {info['tensors']} tensors, {info['parameters']:,} values, {info['bytes']:,} bytes",
        markup=False,
    )
    keys = [k for k in _INFO_ORDER if k in meta] + sorted(k for k in meta if k not in _INFO_ORDER)
    keys = [k for k in keys if k != "settings"] + (["settings"] if "settings" in meta else [])
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        value = _sets_text(meta[key]) if key == "prototype_sets" else meta[key]
        err.print(f"  {key:<{width}}  {value}", markup=False)
    if not meta:
        err.print("  (no metadata)", markup=False)
    if info.get("verified"):
        err.print("payload SHA-256 verified", markup=False)


def export_command(
    model: Annotated[
        Path | None, typer.Argument(help="Run folder, checkpoint or export (default: runs/latest).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", metavar="FILE", help="Output .safetensors file.")
    ] = None,
    with_head: Annotated[
        bool,
        typer.Option(
            "--with-head",
            help="Include the projection head (head.*) and the prototypes (prototypes.weight; "
            "prototypes.0.weight, prototypes.1.weight, ... for several sets).",
        ),
    ] = False,
    dtype: Annotated[
        str,
        typer.Option("--dtype", metavar="fp32|bf16|fp16", help="Floating-point dtype: fp32, bf16 or fp16."),
    ] = "fp32",
    info: Annotated[
        Path | None,
        typer.Option(
            "--info",
            metavar="FILE",
            help="Print the metadata of an export FILE (a run folder: its backbone.safetensors) and exit.",
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="With --info: also recompute the payload SHA-256.")
    ] = False,
    from_official: Annotated[
        Path | None,
        typer.Option(
            "--from-official",
            metavar="CKPT",
            help="Convert an official facebookresearch/swav checkpoint CKPT.",
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            metavar="ARCH",
            help="With --from-official: resnet50, resnet50w2/w4/w5, resnet18 or resnet34.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export weights to safetensors (backbone under torchvision's key names), show an export's
    metadata (--info FILE), or import an official SwAV checkpoint (--from-official CKPT --arch A)."""
    # Paths through runs/latest (a pointer file) read as the run folder it names.
    model, out = (None if model is None else follow(model)), (None if out is None else follow(out))
    info = None if info is None else follow(info)
    try:
        result = _run(model, out, with_head, dtype, info, verify, from_official, arch, as_json)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_json:
        print(json.dumps(result))


def _run(
    model: Path | None,
    out: Path | None,
    with_head: bool,
    dtype: str,
    info: Path | None,
    verify: bool,
    from_official: Path | None,
    arch: str | None,
    as_json: bool,
) -> dict[str, Any]:
    if info is not None:
        given = {
            "MODEL": model is not None,
            "--out": out is not None,
            "--with-head": with_head,
            "--from-official": from_official is not None,
            "--arch": arch is not None,
        }
        others = [name for name, was_given in given.items() if was_given]
        if others:
            raise UserError(f"--info only reads a file; it cannot be combined with {', '.join(others)}")
        return _info(info, verify=verify, as_json=as_json)
    if verify:
        raise UserError("--verify goes with --info FILE")
    if from_official is not None:
        if model is not None:
            raise UserError("give either MODEL or --from-official CKPT, not both")
        return _from_official(from_official, arch, out, with_head=with_head, dtype=dtype, as_json=as_json)
    if arch is not None:
        raise UserError("--arch goes with --from-official; an export takes the architecture from its run")
    return _export(model, out, with_head=with_head, dtype=dtype, as_json=as_json)


def _info(path: Path, *, verify: bool, as_json: bool) -> dict[str, Any]:
    """``--info FILE``: an export's metadata (a run folder: its final export)."""
    if path.is_dir():
        exported = [
            path / name for name in ("backbone.safetensors", "model.safetensors") if (path / name).is_file()
        ]
        if not exported:
            raise UserError(
                f"{path}: --info reads an export file, and this folder has none;"
                f" write one with 'swavctl export {path}'"
            )
        path = exported[0]
    if path.is_file() and not is_safetensors(path):
        raise UserError(
            f"{path}: --info reads a safetensors export, and this is a PyTorch checkpoint;"
            f" export it first with 'swavctl export {path} --out NEW.safetensors'"
            " (an official SwAV checkpoint:"
            f" 'swavctl export --from-official {path} --arch ARCH --out NEW.safetensors')"
        )
    check_safetensors(path)  # before torch is imported
    from swavctl.weights.export import export_info

    result = export_info(path, verify=verify)
    if not as_json:
        _print_info(result)
    return result


def _from_official(
    checkpoint: Path, arch: str | None, out: Path | None, *, with_head: bool, dtype: str, as_json: bool
) -> dict[str, Any]:
    """``--from-official CKPT --arch A --out FILE``: an official checkpoint converted to an export."""
    if arch is None:
        raise UserError("--from-official needs --arch (resnet50, resnet50w2, resnet50w4, resnet50w5, ...)")
    if out is None:
        raise UserError("--from-official needs --out FILE.safetensors")
    check_output_file(out)
    if checkpoint.is_file():  # its container, before torch is imported
        if checkpoint.suffix == ".safetensors":
            check_safetensors(checkpoint)
        else:
            check_pickle_container(checkpoint)
    from swavctl.weights.export import import_official

    result = import_official(checkpoint, arch=arch, out=out, with_head=with_head, dtype=dtype)
    if not as_json:
        err.print(
            f"imported {result['source']} ({arch}) -> {result['path']} "
            f"({result['tensors']} tensors, {result['contents']}, {dtype})",
            markup=False,
        )
    return result


def _export(
    model: Path | None, out: Path | None, *, with_head: bool, dtype: str, as_json: bool
) -> dict[str, Any]:
    """MODEL (default runs/latest) exported to safetensors."""
    if out is None or out.suffix == ".safetensors":
        if out is not None:
            check_output_file(out)
        if dtype in _DTYPE_NAMES:  # else export_run names the bad --dtype first
            check_model_file(model or follow(DEFAULT_MODEL))  # before torch is imported

    from swavctl.weights.model_io import export_run

    result = export_run(
        model or follow(DEFAULT_MODEL),
        out=out,
        with_head=with_head,
        dtype=dtype,
        warn=lambda message: err.print(f"warning: {message}", markup=False),
    )
    if not as_json:
        err.print(
            f"wrote {result['path']} ({result['tensors']} tensors, {result['contents']}, {dtype})",
            markup=False,
        )
    return result
