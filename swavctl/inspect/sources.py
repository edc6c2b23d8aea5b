"""What to inspect, and where to write: the model, the image folder and the output folder.

Defaults (``swavctl inspect-clusters`` with no arguments):

* model: ``runs/latest`` (its newest verified checkpoint, else its export with head);
* data: the folder recorded in the model's settings (``data.path``; ``demo`` is the built-in
  digits). Of a root with splits, ``val/`` is read when present (held-out images, as for the
  demo's NMI bar), else ``train/``, else the folder itself; ``--split`` picks one explicitly;
* prototype set: 0 (``--prototype-set``; a model with several has one per DeepCluster-v2 head);
* out: ``<run folder>/clusters`` (``clusters-set{N}`` for ``--prototype-set N`` > 0, so the
  reports of a model's sets lie side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from swavctl.data.demo import resolve_data_path
from swavctl.errors import UserError
from swavctl.errors.messages import output_is_file, output_not_writable
from swavctl.files.atomic import probe_writable, remove_stale_temporaries
from swavctl.files.image_folder import check_data_folder, class_of, list_images, no_images
from swavctl.weights.model_io import LoadedModel, no_recorded_data, run_folder

DEFAULT_MODEL = Path("runs") / "latest"
SPLITS = ("auto", "val", "train", "none")


@dataclass
class ImageSet:
    """The images to inspect, in sorted order, with their ImageFolder labels when every one has one."""

    folder: Path
    paths: list[Path]
    label_names: list[str] | None  # sorted class folder names
    labels: list[int] | None  # index into label_names, per path
    note: str | None = None  # why labels were dropped, when only some images lie outside class folders


def resolve_images(data: str | None, *, split: str, loaded: LoadedModel, max_images: int | None) -> ImageSet:
    """The image folder from ``--data`` (or the model's recorded data), its split, and its files."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    recorded = data is None
    if recorded:
        data = loaded.settings.data.path
        if not data:
            raise UserError(no_recorded_data(loaded.source))
    assert data is not None
    root = resolve_data_path(data).expanduser()
    hint = " (recorded in the model's settings; pass --data DIR)" if recorded else ""
    check_data_folder(root, hint)
    if split == "auto":
        folder = next((root / s for s in ("val", "train") if (root / s).is_dir()), root)
    elif split == "none":
        folder = root
    else:
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"--split {split}: no {split}/ folder under {root}")
    folder = folder.resolve()
    paths = list_images(folder)
    if max_images is not None:
        paths = paths[:max_images]
    if not paths:
        raise no_images(folder, hint)
    classes = [class_of(p, folder) for p in paths]
    loose = [p for p, c in zip(paths, classes, strict=True) if c is None]
    if loose:
        note = None
        if len(loose) < len(paths):
            note = (
                f"{len(loose)} image(s) lie directly in {folder}, outside class folders "
                f"(e.g. {loose[0].name}): the images are reported without labels (no NMI, ARI, "
                "purity or label table); move them into a class folder to get them"
            )
        return ImageSet(folder, paths, None, None, note)
    names = sorted({c for c in classes if c is not None})
    index = {name: i for i, name in enumerate(names)}
    return ImageSet(folder, paths, names, [index[c] for c in classes if c is not None])


def default_out(loaded: LoadedModel, prototype_set: int = 0) -> Path:
    """``<run folder>/clusters``: beside the checkpoints folder, or beside the export file;
    ``clusters-set{N}`` for prototype set N > 0."""
    return run_folder(loaded) / ("clusters" if prototype_set == 0 else f"clusters-set{prototype_set}")


def prototype_layer(loaded: LoadedModel, index: int) -> nn.Linear:
    """Prototype set ``index`` (``--prototype-set``) of the loaded model; a :class:`UserError`
    naming the valid range when it has no such set (a one-set model has only set 0)."""
    sets = loaded.model.prototype_sets
    if not 0 <= index < len(sets):
        if len(sets) == 1:
            valid = "it has one prototype set, so --prototype-set takes only 0"
        else:
            valid = f"it has {len(sets)} prototype sets: pass --prototype-set 0 to {len(sets) - 1}"
        raise UserError(f"--prototype-set {index} is out of range for {loaded.source}: {valid}")
    return sets[index]


#: Where the embeddings are kept while an inspection runs (``.NAME.tmp-PID``, removed after).
EMBEDDINGS_FILE = "embeddings.f32"
#: Written last, removed first: an output folder with it holds one complete inspection.
COMMIT_FILES = ("summary.json", "index.html")


def prepare_out(out: Path) -> Path:
    """Create ``out`` and check that files can be written in it; a :class:`UserError` if not.

    The files that mark a complete inspection (:data:`COMMIT_FILES`) are removed, so an
    inspection that does not finish leaves no summary or report describing other files; so are
    the embeddings of inspections that were killed.
    """
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(output_is_file(out))
    try:
        probe_writable(out)
        for name in COMMIT_FILES:
            (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(output_not_writable(out, exc.strerror or exc)) from None
    remove_stale_temporaries(out / EMBEDDINGS_FILE)
    return out
