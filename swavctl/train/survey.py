"""What a run sees before its recipe is chosen: the images (how many, how big, colour or grey)
and the devices (which kind, how many), as a :class:`~swavctl.train.auto_recipe.Seen` record.

Only what stays the same when the same command runs again is read: the file list, a fixed
sample of image headers (evenly spaced over the sorted list: the same files every time), the
device kind and count. Never a timing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from swavctl import config
from swavctl.config import Settings
from swavctl.data.demo import DEMO_NAME, resolve_data_path
from swavctl.errors import UserError
from swavctl.train.auto_recipe import Choice, Seen, choose

#: Images whose headers give the typical size (``Image.open(...).size`` reads no pixels).
SIZE_SAMPLE = 64
#: Of those, images decoded (small) to tell colour from grey.
COLOUR_SAMPLE = 16
#: A pixel is coloured when its channels differ by more than this (of 255): JPEG's chroma noise on
#: a grey image stays below it. An image is colour when over 1% of its pixels are coloured.
CHROMA_LEVELS = 12
COLOURED_SHARE = 0.01


def evenly_spaced(paths: Sequence[Path], count: int) -> list[Path]:
    """``count`` paths spread evenly over ``paths`` (all of them when fewer), first one included."""
    n = len(paths)
    return [paths[i * n // count] for i in range(count)] if n > count else list(paths)


def shorter_side(path: Path) -> int | None:
    """The image's shorter side from its header, without decoding (None when unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return min(image.size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def is_colour(path: Path) -> bool | None:
    """Whether the image holds colour (over 1% of pixels with channels apart by more than 12
    levels), from a copy of at most 64 px (JPEGs are decoded at reduced scale); None when
    unreadable."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
                return False
            image.draft("RGB", (64, 64))
            small = image.convert("RGB")
            small.thumbnail((64, 64))
            pixels = np.asarray(small, dtype=np.int16)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    return bool((chroma > CHROMA_LEVELS).mean() > COLOURED_SHARE)


def survey_images(paths: Sequence[Path]) -> tuple[int, bool]:
    """(median shorter side, colour) of a fixed sample of ``paths``; colour when most are."""
    sides = sorted(s for s in map(shorter_side, evenly_spaced(paths, SIZE_SAMPLE)) if s is not None)
    if not sides:
        raise UserError(f"none of the {min(len(paths), SIZE_SAMPLE)} images sampled could be read")
    colours = [c for c in map(is_colour, evenly_spaced(paths, COLOUR_SAMPLE)) if c is not None]
    return sides[len(sides) // 2], sum(colours) * 2 > len(colours)


def _labelled(data: str) -> str | None:
    """``data`` when it has ``train/`` and ``val/`` class folders (a held-out part for the k-NN
    monitor), else None."""
    from swavctl.eval.splits import discover

    root = resolve_data_path(data)
    if data != DEMO_NAME and not ((root / "train").is_dir() and (root / "val").is_dir()):
        return None
    try:
        discover(root)
    except UserError:
        return None
    return data if data == DEMO_NAME else str(root.expanduser().absolute())


def _devices(settings: Settings) -> tuple[str, str, int]:
    """(kind, name, processes) the run will use, as ``swavctl.distributed.launch`` will start it."""
    from swavctl.distributed import dist
    from swavctl.distributed.launch import cuda_by_default

    env = dist.detect_env()
    gpus = settings.dist.gpus
    on_gpu = cuda_by_default(gpus)
    if env is not None:
        processes = env.world_size
    elif on_gpu:
        processes = gpus if gpus else 1
    else:
        processes = settings.dist.procs
    if not on_gpu:
        return "cpu", "CPU", processes
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
    return "cuda", name, processes


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has AMX bf16 tiles (the ``amx_bf16`` and ``amx_tile`` flags of Linux's
    ``/proc/cpuinfo``), where oneDNN's bf16 convolutions and matrix products run on them: there a
    bf16 training step of convnet-tiny took 0.36x the fp32 time (``bench/cpu_bf16.py``). False
    where the file is missing (other systems): fp32 then, which is right everywhere.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return "amx_bf16" in flags and "amx_tile" in flags


def seen_for(settings: Settings) -> Seen:
    """What the run of ``settings`` sees (its data folder and devices)."""
    from swavctl.distributed.cores import usable_cores
    from swavctl.files.image_folder import list_images, resolve_image_root

    if not settings.data.path:
        raise UserError("no data: pass --data DIR (or --data demo, or --preset demo)")
    folder, _ = resolve_image_root(resolve_data_path(settings.data.path))
    paths = list_images(folder)
    if settings.data.max_images:
        paths = paths[: settings.data.max_images]
    side, colour = survey_images(paths)
    kind, name, processes = _devices(settings)
    return Seen(
        images=len(paths),
        side=side,
        colour=colour,
        device="cuda" if kind == "cuda" else "cpu",
        device_name=name,
        devices=processes,
        cores=usable_cores(),
        labelled=_labelled(settings.data.path),
        cpu_bf16=kind != "cuda" and cpu_has_amx(),
    )


def auto_recipe(
    *, flags: Mapping[str, Any], overrides: Sequence[str], flag_names: Mapping[str, str] | None = None
) -> Choice:
    """The settings ``swavctl pretrain --data DIR`` runs without ``--preset``: a recipe chosen
    from what the run sees, with the flags and ``--set`` values on top (they win)."""

    def resolve(base: dict[str, Any]) -> Settings:
        return config.resolve(base=base, flags=flags, overrides=overrides, flag_names=flag_names)

    return choose(seen_for(resolve({})), resolve, config.explicit_keys(flags, overrides))
