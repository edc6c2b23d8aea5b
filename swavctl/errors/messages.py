"""The situations every command meets, worded once, each with its fix.

Every command reports these through the functions here, so that ``pretrain``, ``eval-linear``,
``inspect-clusters`` and ``export`` say the same thing the same way (one line, exit status 2):

- not enough GPUs (:func:`not_enough_gpus`), always pointing at ``--gpus 0``;
- a model that is not there (:func:`model_not_found`);
- an output that cannot be written (:func:`output_not_writable`; :func:`check_output_folder` and
  :func:`check_output_file` check an output before the work, and before torch is imported);
- an output folder that is a file (:func:`output_is_file`);
- SwAV training settings with several prototype sets, which only the other methods train
  (:func:`check_trainable_prototypes`).

This module imports nothing heavy (no torch), so a command can check its input before it loads
the libraries it works with.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from swavctl.errors import UserError

DEFAULT_MODEL = Path("runs/latest")


def not_enough_gpus(asked: int, visible: int) -> str:
    """``--gpus N`` with fewer than N CUDA devices visible (0 when CUDA is not available)."""
    seen = "no CUDA device is visible" if visible == 0 else f"only {visible} CUDA device(s) are visible"
    return f"--gpus {asked} asked for, but {seen}; use --gpus 0 to run on the CPU"


def init_not_found(path: Path | str, where: str = "--init") -> str:
    """The weights ``pretrain --init`` names do not exist."""
    return (
        f"{where} {path}: no such file or folder; pass a swavctl run folder, checkpoint or export, an "
        "official SwAV checkpoint (.pth.tar) or a torchvision state dict (.safetensors, .pth)"
    )


def model_not_found(path: Path | str) -> str:
    """MODEL (a run folder, checkpoint or export) does not exist."""
    message = (
        f"model not found: {path}; pass MODEL as a run folder, a checkpoint (.pt) or an export (.safetensors)"
    )
    if Path(path) == DEFAULT_MODEL:
        message += ", or pretrain one first (swavctl pretrain --preset demo)"
    return message


def output_is_file(path: Path | str, flag: str = "--out") -> str:
    """An output folder that names an existing file."""
    return f"{flag} {path} is a file, not a folder; pass a folder there (new or existing)"


def output_is_folder(path: Path | str, flag: str = "--out") -> str:
    """An output file that names an existing folder."""
    return f"{flag} {path} is a folder, not a file; pass a file name there"


def output_not_writable(path: Path | str, reason: object, flag: str = "--out") -> str:
    """An output that cannot be created or written (no permission, a file in the way, ...)."""
    return f"cannot write {flag} {path}: {reason}; pass a writable location with {flag}"


def _reason(exc: OSError) -> str:
    return str(exc.strerror or exc)


def check_output_folder(folder: Path | str, flag: str = "--out") -> None:
    """Refuse an output folder that is a file or that cannot be made, without touching the disk.

    The nearest existing ancestor must be a folder this user may write in (a file there means
    ``Not a directory``). The command's own writing still reports what this cannot foresee (a
    read-only or full file system).
    """
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise UserError(output_is_file(folder, flag))
    ancestor = folder if folder.exists() else next((p for p in folder.absolute().parents if p.exists()), None)
    if ancestor is None:
        return
    if not ancestor.is_dir():
        raise UserError(output_not_writable(folder, os.strerror(errno.ENOTDIR), flag))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(output_not_writable(folder, os.strerror(errno.EACCES), flag))


def check_output_file(path: Path, flag: str = "--out") -> None:
    """Refuse an output file that is a folder or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(output_is_folder(path, flag))
    parent = path.parent
    if parent.is_file():
        raise UserError(output_not_writable(path, f"{parent} is a file", flag))
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(output_not_writable(path, _reason(exc), flag)) from None


def check_trainable_prototypes(method: str, prototypes: int | Sequence[int]) -> None:
    """Refuse to train SwAV with several prototype sets (``model.prototypes`` a list).

    SwAV's objective trains one set; several sets are for DeepCluster-v2 and SeLa-v2. Such models
    still load, export and inspect (a settings tree may hold a list). Without this check, SwAV
    would fail deep in the step instead. :func:`swavctl.config.resolve` refuses it earlier, naming
    the source; this covers settings built otherwise.
    """
    if method != "swav" or isinstance(prototypes, int):
        return
    sizes = list(prototypes)
    raise UserError(
        f"model.prototypes = {sizes} asks for {len(sizes)} prototype sets, which are for --method "
        "deepcluster-v2 and sela-v2; SwAV trains one set: give one number K "
        "(e.g. --set model.prototypes=3000)"
    )
