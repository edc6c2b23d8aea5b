"""Does the recipe fit the run's global batch? The warning a run gives at its start when not.

A SwAV recipe's learning rate, queue and prototype freeze are tuned for one global batch
``B_tuned`` (images per step over all devices; ``[tuned_for]`` in a preset, 4096 for the built-in
defaults). A run whose global batch ``B = batch_size x world_size`` is off by more than a factor of
two, ``max(B, B_tuned) / min(B, B_tuned) > 2``, is warned once, with the shipped preset tuned
within 2x of ``B`` for the same backbone (when there is one) and the settings to change otherwise.
"""

from __future__ import annotations

from swavctl import config
from swavctl.errors import UserError
from swavctl.train.auto_recipe import AUTO

#: The settings that depend on the global batch (the paper's two recipes differ in these).
BATCH_BOUND_SETTINGS = ("optim.base_lr", "swav.queue_length", "swav.freeze_prototypes_steps")

#: How far a run's global batch may be from the tuned one, as a ratio either way.
TOLERANCE = 2.0


def _within(batch: int, tuned: int) -> bool:
    return max(batch, tuned) / min(batch, tuned) <= TOLERANCE


def presets_tuned_near(global_batch: int, arch: str, *, exclude: str | None = None) -> list[str]:
    """Shipped presets tuned within 2x of ``global_batch`` for backbone ``arch``; those bound to
    their own data (a ``data.path``, as ``demo``) are left out."""
    near = []
    for name in config.preset_names():
        tuned = config.preset_tuned_for(name)
        if name == exclude or tuned is None or not _within(global_batch, tuned.global_batch):
            continue
        try:
            tree = config.load_preset(name)
        except UserError:
            continue
        if tree.get("data", {}).get("path") or tree.get("model", {}).get("arch", "resnet50") != arch:
            continue
        near.append(name)
    return near


def batch_mismatch_note(preset: str | None, *, batch_size: int, world: int, arch: str) -> str | None:
    """The warning when the run's global batch is more than 2x from the recipe's (None when not,
    or when the preset records no ``[tuned_for]``, or the recipe was chosen for this run's batch:
    ``preset = "auto"``, :mod:`swavctl.train.auto_recipe`)."""
    if preset == AUTO:
        return None
    tuned = config.preset_tuned_for(preset)
    global_batch = batch_size * world
    if tuned is None or _within(global_batch, tuned.global_batch):
        return None
    recipe = "the built-in defaults were" if preset is None else f"preset {preset} was"
    devices = f"{tuned.devices} device{'s' if tuned.devices > 1 else ''}"
    here = f"{batch_size} per device x {world} device{'s' if world > 1 else ''}"
    settings = ", ".join(BATCH_BOUND_SETTINGS[:-1]) + f" and {BATCH_BOUND_SETTINGS[-1]}"
    advice = f"set {settings} for a batch of {global_batch}"
    near = presets_tuned_near(global_batch, arch, exclude=preset)
    if near:
        named = " or ".join(
            f"--preset {n} (tuned for {config.preset_tuned_for(n).global_batch})"  # type: ignore[union-attr]
            for n in near
        )
        advice = f"use {named}, or {advice}"
    return (
        f"global batch {global_batch} ({here}) is more than 2x from the {tuned.global_batch} "
        f"(on {devices}) {recipe} tuned for; {advice}"
    )
