"""A recipe chosen from what the run sees: ``swavctl pretrain --data DIR`` without ``--preset``.

Pure functions of a small record, :class:`Seen` (how many images, their typical size, colour or
grey, which devices and how many), and of the settings the user fixed (flags, ``--set``, or an
architecture an ``--init`` source imposes): nothing here reads a file or a clock, so the same
data, devices and flags give the same recipe, and re-running a command resumes its run. The
rules (``docs/presets.md`` gives the measurements behind them):

**The paper's recipe** when the run looks like the paper's (GPUs, at least
:data:`PAPER_MIN_IMAGES` images of at least :data:`PAPER_MIN_SIDE` px): ResNet-50, 2x224 + 6x96
crops, 3000 prototypes, and the batch-bound values of the paper recipe nearer the run's global
batch ``B`` (images per step over all devices): the batch-256 recipe (``swav-rn50-400ep-bs256``)
for ``B <= 1024``, the batch-4096 recipe (``swav-rn50-800ep``) above (1024 is their geometric
mean). At those two batches the values are the presets' own; between, the learning rates are
scaled linearly from the nearer recipe: ``lr = 0.6 B / 256`` or ``lr = 4.8 B / 4096`` (final
and warmup-start rates alike).

**Otherwise** (small data, or a CPU):

- backbone: on a CPU ``convnet-tiny`` (a ResNet-18 with a small stem trained 8x slower per image
  here); on GPUs the small-stem ``resnet18-small`` for images under :data:`SMALL_SIDE` px,
  ``resnet18`` below :data:`RESNET50_MIN_IMAGES` images, else ``resnet50``;
- global crop ``0.56 x`` the images' median shorter side (the paper's 224 of ImageNet's ~400 px),
  in steps of 8 px, 16 to 224 (at most :data:`CPU_MAX_CROP` on a CPU, where the cost grows with
  its square); local crop ``96/224`` of it (at least 8 px); 2 + 6 crops on GPUs, 2 + 4 on a CPU;
- prototypes ``K = N / 16`` (N images), in steps of 10, 10 to 3000;
- per-device batch 64 (the paper's), at most a quarter of the images over the devices;
- learning rate 4.8 (LARC scales every step to ``lr x 0.001 x |w|``: a short run needs the
  large rate to move the weights at all), warmup a tenth of the run (at most 10 epochs);
- epochs: as many as fit :data:`BUDGET_S` on the device found (by :func:`estimate_seconds`, a
  fixed cost per device kind, never a timing), between :data:`MIN_EPOCHS` and 800;
- a k-NN monitor on the data's own ``val/`` when the folder has ``train/`` and ``val/``.

**Both**: a queue when the global batch is smaller than the prototypes, just long enough that
batch + queue reach the paper's 4096 embeddings per 3000 prototypes (3840 at batch 256, as the
paper), from epoch 15 or a tenth of the run; prototypes frozen for one epoch of steps (313 at
batch 4096 and 5005 at 256 on ImageNet, as the paper); for grey images no hue, saturation or
grayscale jitter (identities on grey pixels), for colour the paper's augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from swavctl.config import Settings
from swavctl.config.method_settings import inapplicable_keys
from swavctl.config.tree import deep_merge, drop_path

#: The recipe's name in ``settings.preset`` (informational; the run's folder is ``runs/<time>-auto``).
AUTO = "auto"

PAPER_MIN_IMAGES = 100_000
PAPER_MIN_SIDE = 192
SMALL_SIDE = 96
RESNET50_MIN_IMAGES = 50_000
CPU_MAX_CROP = 32
MIN_EPOCHS = 10
MAX_EPOCHS = 800

#: The paper's two recipes: global batch -> (preset, base_lr, epochs, warmup_epochs, start_warmup_lr).
PAPER_RECIPES = {
    256: ("swav-rn50-400ep-bs256", 0.6, 400, 0.0, 0.0),
    4096: ("swav-rn50-800ep", 4.8, 800, 10.0, 0.3),
}
#: Global batches up to this use the batch-256 recipe, larger ones the batch-4096 recipe.
PAPER_SPLIT_BATCH = 1024
#: Embeddings per prototype the paper's Sinkhorn sees in a step: 4096 (a batch, or 256 + a queue
#: of 3840) for 3000 prototypes.
EMBEDDINGS_PER_PROTOTYPE = 4096 / 3000

#: The softmax temperature of small-data recipes (the paper's 0.1 is kept for its own recipes). With
#: tens of prototypes 0.1 can stall near the uniform prediction (loss ln K): on the patch folder
#: (K = 30, 141 epochs in bf16) a run at 0.1 sat at 0.99 ln K for 200 steps and ended at fast
#: probe 0.858 / 20-NN 0.700, the same run at 0.2 at 0.975 / 0.958; the demo (K = 10) collapsed at
#: 0.1 and reached NMI 0.81 at 0.2 (presets/demo.toml).
SMALL_DATA_TEMPERATURE = 0.2

#: Below this many images the recipe warns: it was tuned on hundreds (the patch folder's 480, the
#: demo's 1,437), and 5 photographs collapsed to one prototype at loss ln K for 2,800 steps.
FEW_IMAGES = 100

#: Seconds a run should take on the device found (small data; the paper's recipe keeps its epochs).
BUDGET_S = {"cpu": 240.0, "cuda": 3600.0}


@dataclass(frozen=True)
class Seen:
    """What the run sees; everything the choice depends on (it stays the same when the same
    command runs again)."""

    images: int  # training images (after data.max_images)
    side: int  # median shorter side of a fixed sample of them, px
    colour: bool  # most of the sample are colour images
    device: Literal["cpu", "cuda"]
    device_name: str  # "CPU", or the GPU's name
    devices: int  # training processes: GPUs, or CPU processes
    cores: int  # CPU cores the run can use
    labelled: str | None = None  # the data folder when it has train/ and val/ (for the k-NN monitor)
    cpu_bf16: bool = False  # a CPU run on a CPU with AMX bf16 tiles (survey.cpu_has_amx)

    @property
    def paper_sized(self) -> bool:
        """Whether the paper's recipe applies: GPUs and ImageNet-sized data."""
        return self.device == "cuda" and self.images >= PAPER_MIN_IMAGES and self.side >= PAPER_MIN_SIDE


# ---------------------------------------------------------------------------------------------
# Cost model: multiply-accumulates of one forward pass, and what each device kind does per second


#: Forward multiply-accumulates of each backbone on a 224 px image (torchvision's layouts; the
#: wide ResNet-50s grow as their width squared). ``convnet-tiny`` is counted per pixel.
MACS_224 = {
    "resnet18": 1.82e9,
    "resnet34": 3.67e9,
    "resnet50": 4.11e9,
    "resnet50w2": 16.4e9,
    "resnet50w4": 65.8e9,
    "resnet50w5": 102.8e9,
}
#: convnet-tiny (width 32): 9 (3*32 + 32*64) s^2 + 9 (64*64 + 64*128) (s/2)^2 + 9 (128*128) (s/4)^2.
TINY_MACS_PER_PIXEL = 9 * (3 * 32 + 32 * 64) + 9 * (64 * 64 + 64 * 128) / 4 + 9 * 128 * 128 / 16

#: Seconds of start-up (imports, listing, building, the final export) and per optimizer step
#: (Python, Sinkhorn, the optimizer) besides the multiply-accumulates: what a run of tiny steps
#: pays (the rates above are of large ones).
STARTUP_S = {"cpu": 15.0, "cuda": 60.0}
STEP_OVERHEAD_S = {"cpu": 0.02, "cuda": 0.005}
#: Core-seconds per crop pixel of reading, decoding and multi-cropping an image in the training
#: process (a CPU run has no loader workers; the batched crops and photometric ops use every core):
#: the same profile as the CPU rate below, 39 ms of data wait and 27 ms of augmentation per step of
#: 64 images of 3072 crop pixels (2x32^2 + 4x16^2) on 2 cores.
CPU_DATA_CORE_S_PER_PIXEL = 2 * 0.066 / (64 * 3072)


def forward_macs(arch: str, side: int) -> float:
    """Multiply-accumulates of one forward pass of ``arch`` on a ``side`` px crop.

    A ``-small`` stem (stride 1, no max-pool) keeps 4x the resolution after the stem: 16x the
    work of the plain network on the same crop.
    """
    if arch == "convnet-tiny":
        return TINY_MACS_PER_PIXEL * side * side
    base, small = (arch[: -len("-small")], True) if arch.endswith("-small") else (arch, False)
    macs = MACS_224.get(base, MACS_224["resnet50"]) * (side / 224) ** 2
    return macs * (16 if small else 1)


def _sample_macs(arch: str, counts: list[int], sizes: list[int]) -> float:
    """Training multiply-accumulates of one image's crops (forward + backward = 3 forwards)."""
    return 3 * sum(count * forward_macs(arch, size) for count, size in zip(counts, sizes, strict=True))


#: Training multiply-accumulates per second of one device (or, for CPUs, one core), from measured
#: runs. CPU: the profile of ``swavctl pretrain --data PATCHES --gpus 0 --max-steps 30 --set
#: train.profile_steps=5`` on the 480 colour patches of 64 px (bench/own_data_quality.py's folder)
#: on the 2-core Intel CI-class machine: forward, backward, loss and optimizer 395 ms per step of
#: 64 images with 2x32 + 4x16 crops of convnet-tiny (the demo's 1194 samples/s on 2 idle AMD cores
#: had put it at 77 G/s per core, and the recipe's runs at 1.6x the time the line said). GPUs:
#: ResNet-50 with 2x224 + 6x96 crops: 750 samples/s end to end on an H200 (docs/benchmarks.md; an
#: H100 has the same compute), the official code's ~100 per V100; an A100 and GPUs not named here
#: are assumed at 300.
_RN50_PAPER = _sample_macs("resnet50", [2, 6], [224, 96])
RATES = {
    "cpu-core": 64 * _sample_macs("convnet-tiny", [2, 4], [32, 16]) / (0.395 * 2),
    "H100": 750 * _RN50_PAPER,
    "H200": 750 * _RN50_PAPER,
    "A100": 300 * _RN50_PAPER,
    "V100": 100 * _RN50_PAPER,
    "gpu": 300 * _RN50_PAPER,
}


#: A CPU with AMX runs the bf16 step this many times faster than the fp32 one (convnet-tiny,
#: 2x32 + 4x16 crops, batch 64, forward and backward: 0.119 s against 0.334 s, medians of 4
#: alternating rounds, ``python bench/cpu_bf16.py`` on the 2-core Intel machine).
CPU_BF16_SPEEDUP = 2.8


def device_rate(seen: Seen, precision: str = "auto") -> float:
    """Training multiply-accumulates per second of all the run's devices (see :data:`RATES`), at
    ``precision`` (bf16 on a CPU with AMX: :data:`CPU_BF16_SPEEDUP` times the fp32 rate)."""
    if seen.device == "cpu":
        speedup = CPU_BF16_SPEEDUP if precision == "bf16" and seen.cpu_bf16 else 1.0
        return RATES["cpu-core"] * max(1, seen.cores) * speedup
    known = next((k for k in ("H100", "H200", "A100", "V100") if k in seen.device_name), "gpu")
    return RATES[known] * seen.devices


def estimate_seconds(seen: Seen, settings: Settings, epochs: int | None = None) -> float:
    """Seconds the run should take (``epochs``, default the settings'), from the cost model."""
    epochs = settings.train.epochs if epochs is None else epochs
    data = settings.data
    per_image = _sample_macs(settings.model.arch, data.crop_counts, data.crop_sizes)
    global_batch = settings.train.batch_size * seen.devices
    steps = max(1, seen.images // global_batch) * epochs
    data_s = 0.0
    if seen.device == "cpu":
        pixels = sum(n * size * size for n, size in zip(data.crop_counts, data.crop_sizes, strict=True))
        data_s = pixels * CPU_DATA_CORE_S_PER_PIXEL / max(1, seen.cores)
    rate = device_rate(seen, settings.train.precision)
    seconds = STARTUP_S[seen.device] + steps * (
        global_batch * (per_image / rate + data_s) + STEP_OVERHEAD_S[seen.device]
    )
    if settings.monitor.knn_data:  # a forward pass over train + val (a quarter more) per reading
        readings = epochs // settings.monitor.knn_every_epochs + 1
        eval_pass = 1.25 * seen.images * forward_macs(settings.model.arch, data.crop_sizes[0])
        seconds += readings * eval_pass / device_rate(seen)  # evaluation runs in fp32
    return seconds


# ---------------------------------------------------------------------------------------------
# The rules


#: The four crop lists, one entry per crop group (``data.<key>``).
CROP_KEYS = ("crop_counts", "crop_sizes", "min_scales", "max_scales")


def _is_fixed(key: str, fixed: frozenset[str]) -> bool:
    """Whether the user set ``key`` (or a table holding it) explicitly."""
    parts = key.split(".")
    return any(".".join(parts[:n]) in fixed for n in range(1, len(parts) + 1))


def _step8(value: float, low: int, high: int) -> int:
    """``value`` rounded to a multiple of 8, within ``[low, high]``."""
    return int(min(high, max(low, 8 * round(value / 8))))


def global_crop(seen: Seen) -> int:
    """The high-resolution crop side: 0.56 x the median shorter side (224 of ImageNet's ~400 px),
    in steps of 8 px, 16 to 224 (at most :data:`CPU_MAX_CROP` on a CPU)."""
    high = CPU_MAX_CROP if seen.device == "cpu" else 224
    return _step8(0.56 * seen.side, 16, high)


def local_crop(global_side: int) -> int:
    """The low-resolution crop side: 96/224 of the global one (the paper's ratio), at least 8 px."""
    return _step8(global_side * 96 / 224, 8, 96)


def prototypes_for(images: int) -> int:
    """K = N / 16, in steps of 10, 10 to 3000 (the paper's 3000 for ImageNet's 1.28M)."""
    return int(min(3000, max(10, 10 * round(images / 160))))


def batch_for(seen: Seen) -> int:
    """Images per device: the paper's 64, at most a quarter of the images over the devices (a power
    of two, at least 1)."""
    quarter = max(1, seen.images // (4 * seen.devices))
    return min(64, 2 ** int(math.log2(quarter)))


def arch_for(seen: Seen) -> str:
    """The backbone (see the module docstring)."""
    if seen.device == "cpu":
        return "convnet-tiny"
    if seen.side < SMALL_SIDE:
        return "resnet18-small"
    return "resnet50" if seen.images >= RESNET50_MIN_IMAGES else "resnet18"


#: Backbone feature widths, for the projection head's size.
FEATURE_DIMS = {"convnet-tiny": 128, "resnet18": 512, "resnet34": 512, "resnet50": 2048}


def head_for(arch: str) -> tuple[int, int]:
    """(hidden_dim, embedding_dim): the paper's 2048 and 128 for ResNet-50; twice the features
    (at least 256) and half of them (at most 128) for smaller backbones (convnet-tiny: 256, 64,
    the demo's)."""
    base = arch.removesuffix("-small")
    features = FEATURE_DIMS.get(base, 2048)
    return min(2048, max(256, 2 * features)), min(128, features // 2)


def structure(
    seen: Seen, fixed: frozenset[str], arch: str | None = None, fixed_crop_groups: int = 0
) -> dict[str, Any]:
    """The choices that size the model and the crops (a settings tree, before the user's values).

    ``arch`` is an architecture already fixed (``--arch``, ``--set model.arch``, an ``--init``
    source): the rest is chosen around it. ``fixed_crop_groups`` is the largest number of entries
    of a crop list the user set (0: none): the recipe's crop lists (two groups) are chosen when it
    is at most 2, and the user's lists win over them; a user's three or more groups take none of
    them.
    """
    paper = seen.paper_sized
    arch = arch or ("resnet50" if paper else arch_for(seen))
    hidden, embedding = head_for(arch)
    tree: dict[str, Any] = {
        "preset": AUTO,
        "model": {"arch": arch, "hidden_dim": hidden, "embedding_dim": embedding},
        "train": {"batch_size": 64 if paper else batch_for(seen)},
    }
    tree["model"]["prototypes"] = 3000 if paper else prototypes_for(seen.images)
    data: dict[str, Any] = {}
    if fixed_crop_groups <= 2:  # the four lists go together: two groups, global and local
        side = 224 if paper else global_crop(seen)
        data = {
            "crop_counts": [2, 6] if seen.device == "cuda" else [2, 4],
            "crop_sizes": [side, 96 if paper else local_crop(side)],
            "min_scales": [0.14, 0.05],
            "max_scales": [1.0, 0.14],
        }
    if seen.device == "cpu":  # batched augmentation in the training process (the demo's measurement)
        data.update({"augment_on": "device", "workers": 0})
        if seen.cpu_bf16:  # oneDNN's bf16 kernels on AMX: the step in 0.36x the fp32 time
            tree["train"]["precision"] = "bf16"
    else:
        data["workers"] = max(1, min(10, seen.cores // seen.devices))
    if not seen.colour:  # hue, saturation and grayscale are identities on grey pixels: skip their cost
        data["augment"] = {"hue": 0.0, "saturation": 0.0, "grayscale_prob": 0.0}
    tree["data"] = data
    if paper and seen.devices > 8:
        tree["dist"] = {"sync_batchnorm_group": 8}  # the batch-4096 run's groups of 8 GPUs
    return tree


def queue_for(global_batch: int, prototypes: int) -> int:
    """The global queue: none when the batch holds at least as many embeddings as there are
    prototypes; else the smallest multiple of the batch with batch + queue reaching
    :data:`EMBEDDINGS_PER_PROTOTYPE` x K (3840 for the paper's batch 256 and K = 3000)."""
    if global_batch >= prototypes:
        return 0
    need = math.ceil(EMBEDDINGS_PER_PROTOTYPE * prototypes) - global_batch
    return global_batch * math.ceil(need / global_batch)


def paper_reference(global_batch: int) -> int:
    """The paper recipe a global batch takes its batch-bound values from: 256 or 4096."""
    return 256 if global_batch <= PAPER_SPLIT_BATCH else 4096


def epochs_for(seen: Seen, settings: Settings) -> int:
    """As many epochs as fit :data:`BUDGET_S` by :func:`estimate_seconds`, MIN_EPOCHS to MAX_EPOCHS."""
    one = estimate_seconds(seen, settings, epochs=1) - STARTUP_S[seen.device]
    fit = int((BUDGET_S[seen.device] - STARTUP_S[seen.device]) // max(one, 1e-9))
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, fit)))


def schedule(seen: Seen, settings: Settings, fixed: frozenset[str]) -> dict[str, Any]:
    """The choices that follow from the model, crops and batch in ``settings`` (the structure with
    the user's values applied): length, learning rates, queue, prototype freeze, monitor."""
    global_batch = settings.train.batch_size * seen.devices
    tree: dict[str, Any] = {"optim": {}, "swav": {}, "train": {}}
    if seen.paper_sized:
        ref = paper_reference(global_batch)
        _, lr, epochs, warmup, start = PAPER_RECIPES[ref]
        scale = global_batch / ref
        tree["optim"] = {"base_lr": lr * scale, "final_lr": lr * scale / 1000, "warmup_epochs": warmup}
        tree["optim"]["start_warmup_lr"] = start * scale
    else:
        epochs = settings.train.epochs if _is_fixed("train.epochs", fixed) else epochs_for(seen, settings)
        tree["optim"] = {"base_lr": 4.8, "final_lr": 0.0048, "start_warmup_lr": 0.3}
        if not _is_fixed("swav.temperature", fixed):
            tree["temperature"] = SMALL_DATA_TEMPERATURE
        tree["optim"]["warmup_epochs"] = min(10, epochs // 10)
        if seen.labelled and not _is_fixed("monitor.knn_data", fixed):
            tree["monitor"] = {"knn_data": seen.labelled, "knn_every_epochs": max(1, epochs // 5)}
    if _is_fixed("train.epochs", fixed):
        epochs = settings.train.epochs
    tree["train"]["epochs"] = epochs
    sets = settings.model.prototypes
    queue = queue_for(global_batch, sets if isinstance(sets, int) else max(sets))
    tree["swav"] = {
        **({"temperature": tree.pop("temperature")} if "temperature" in tree else {}),
        "queue_length": queue,
        "queue_start_epoch": min(15, max(1, epochs // 10)),
        "freeze_prototypes_steps": math.ceil(seen.images / global_batch),  # one epoch
    }
    return tree


# ---------------------------------------------------------------------------------------------
# The choice and the line that tells it


@dataclass(frozen=True)
class Choice:
    """The chosen settings (the user's values applied) and the one line that says why."""

    settings: Settings
    tree: dict[str, Any]  # what the chooser set (before the user's values)
    line: str
    warnings: tuple[str, ...] = ()


def choose(seen: Seen, resolve: Callable[[dict[str, Any]], Settings], fixed: frozenset[str]) -> Choice:
    """The recipe for ``seen``: ``resolve(tree)`` applies the user's flags and ``--set`` values on
    top of a chosen tree (they win); ``fixed`` names the dotted keys they set.

    Two steps: the structure (model, crops, batch) first, then what follows from it as the user
    left it (length, learning rates, queue, freeze), so that a fixed ``--arch`` or
    ``--batch-size`` is planned around rather than overwritten.
    """
    given = resolve({})
    groups = max(
        (len(getattr(given.data, key)) for key in CROP_KEYS if _is_fixed(f"data.{key}", fixed)), default=0
    )
    arch = given.model.arch if _is_fixed("model.arch", fixed) else None
    first = structure(seen, fixed, arch=arch, fixed_crop_groups=groups)
    tree = deep_merge(first, schedule(seen, resolve(first), fixed))
    for key in inapplicable_keys(given.method):  # SwAV's queue and freeze under the other methods
        drop_path(tree, key.split("."))
    settings = resolve(tree)
    return Choice(settings, tree, describe(seen, settings), tuple(filter(None, [few_images(seen, settings)])))


def few_images(seen: Seen, settings: Settings) -> str | None:
    """The warning for a folder of fewer than :data:`FEW_IMAGES` images, or None."""
    if seen.images >= FEW_IMAGES:
        return None
    return (
        f"warning: only {seen.images} images; the recipe is made for {FEW_IMAGES} or more, and with"
        f" this few each batch's codes have little to split among {settings.model.prototypes}"
        " prototypes, so the model is likely to collapse to one. Add images, or start from"
        " pretrained weights with --init PATH"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _devices_text(seen: Seen) -> str:
    if seen.device == "cpu":
        procs = f" ({seen.devices} processes)" if seen.devices > 1 else ""
        return f"{seen.cores} CPU core{'s' if seen.cores != 1 else ''}{procs}"
    return f"{seen.devices} GPU{'s' if seen.devices != 1 else ''} ({seen.device_name})"


def _basis(seen: Seen, global_batch: int) -> str:
    """Which recipe the values came from, and the scaling rule when the batch is between."""
    if not seen.paper_sized:
        return ""
    ref = paper_reference(global_batch)
    preset, lr = PAPER_RECIPES[ref][0], PAPER_RECIPES[ref][1]
    if global_batch == ref:
        return f", global batch {global_batch}: the paper's batch-{ref} recipe ({preset})"
    return (
        f", global batch {global_batch}: the paper's batch-{ref} recipe ({preset}), the nearer one, "
        f"with its learning rates scaled linearly ({lr:g} x {global_batch}/{ref})"
    )


def describe(seen: Seen, settings: Settings) -> str:
    """The one line that says which recipe the run got and why (from the final settings)."""
    data, swav = settings.data, settings.swav
    global_batch = settings.train.batch_size * seen.devices
    crops = "+".join(f"{c}x{s}" for c, s in zip(data.crop_counts, data.crop_sizes, strict=True))
    bf16 = seen.device == "cpu" and settings.train.precision == "bf16"
    parts = [
        settings.model.arch + (" in bf16" if bf16 else ""),
        f"crops {crops}",
        f"{settings.model.prototypes} prototypes",
        f"batch {settings.train.batch_size}" + (f" x {seen.devices}" if seen.devices > 1 else ""),
    ]
    if swav.queue_length:
        parts.append(f"queue {swav.queue_length} from epoch {swav.queue_start_epoch}")
    parts.append(f"lr {settings.optim.base_lr:g}")
    colour = "colour" if seen.colour else "grey"
    about = _duration(estimate_seconds(seen, settings))
    return (
        f"recipe: {seen.images:,} {colour} images of ~{seen.side} px on {_devices_text(seen)}"
        f"{_basis(seen, global_batch)}: {', '.join(parts)}, {settings.train.epochs} epochs (about {about})"
    )
