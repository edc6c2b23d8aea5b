"""Starting a run from weights: ``swavctl pretrain --init PATH`` (the setting ``model.init``).

What ``PATH`` may be, told apart by its contents (never by its name alone):

* a swavctl run folder (its newest checkpoint that verifies, else its export), a checkpoint or an
  export (``backbone.safetensors``; ``model.safetensors`` also has the head), read as
  :func:`swavctl.weights.model_io.load_model` reads them, settings and all;
* an official facebookresearch/swav checkpoint (``swav_800ep_pretrain.pth.tar``: ``module.``
  prefixes, ``projection_head.*``, ``prototypes.weight``), converted as
  ``swavctl export --from-official`` converts it
  (:func:`swavctl.weights.official.convert_official_state_dict`);
* a torchvision-format state dict (``conv1.weight`` ... ``layer4.*``, perhaps ``fc.*``), as
  safetensors or as a pickle read with ``torch.load(weights_only=True)``. Its classifier ``fc.*``
  is dropped, and a line says so: SwAV has none.

Containers are checked as everywhere else (:mod:`swavctl.weights.containers`,
:mod:`swavctl.weights.safetensors_io`):
a malformed file, or a pickle that would build anything but tensors, is refused with one line.

A state dict records no architecture: it is the one of :data:`swavctl.weights.official.SUPPORTED_ARCHS`
whose keys and shapes it matches exactly (:func:`arch_of_init`). Without ``--arch`` a run takes the
architecture of its ``--init`` source; with it, the source's backbone must match that
architecture exactly, or the run is refused listing the missing and unexpected keys and the shape
mismatches.

The backbone always comes from the source. The projection head comes from it when the source has
one of the run's shapes (``model.hidden_dim``, ``model.embedding_dim``), and the prototypes when
the head came and they are the run's ``model.prototypes`` x ``model.embedding_dim``, set for set
(prototypes are points in the head's embedding space, meaningless after a new head). Whatever does not come
from the source is initialised from ``train.seed`` as in any run. One line says which parts came.

The source is read when a new run starts (:func:`load_init`), never when a run resumes: the
checkpoint holds the weights then. Its path and SHA-256 are settings (``model.init``,
``model.init_sha256``), so they are in ``resolved.toml`` and, with :func:`init_summary`, in
``summary.json``; re-running the same command finds the same settings, and resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from swavctl.config import Settings
from swavctl.errors import UserError, messages
from swavctl.files import latest
from swavctl.files.atomic import file_sha256
from swavctl.model.swav import SwAV
from swavctl.weights.containers import check_weights_file, is_safetensors
from swavctl.weights.export import EXPORT_FORMAT
from swavctl.weights.model_io import (
    LoadedModel,
    checkpoint_model,
    is_checkpoint,
    load_model,
    resolve_model_path,
)
from swavctl.weights.official import (
    SUPPORTED_ARCHS,
    convert_official_state_dict,
    flat_state_dict,
    key_differences,
)
from swavctl.weights.pickles import load_pickle_weights
from swavctl.weights.safetensors_io import read_safetensors, read_safetensors_metadata

__all__ = ["InitWeights", "arch_of_init", "init_summary", "load_init", "read_init", "resolve_init"]

_Tensors = dict[str, torch.Tensor]

#: Key prefixes of an official checkpoint's projection head and prototypes (after ``module.``).
_OFFICIAL_HEAD = ("projection_head.", "prototypes.")


@dataclass(frozen=True)
class InitWeights:
    """The weights of an ``--init`` source, in swavctl's layout."""

    path: Path  # the file read (a run folder's checkpoint or export), absolute, links resolved
    sha256: str  # of that file's bytes
    kind: str  # "swavctl checkpoint", "swavctl export", "official SwAV checkpoint", "state dict"
    arch: str  # the backbone's architecture (model.arch)
    backbone: dict[str, torch.Tensor]  # torchvision key names, no classifier
    head: dict[str, torch.Tensor]  # the projection head's state (keys as in SwAV.head); {} when none
    prototypes: dict[str, torch.Tensor]  # the prototypes' state (keys as in SwAV.prototypes); {} when none
    dropped: tuple[str, ...]  # the classifier's keys dropped from a state dict


def _not_found(path: Path, where: str) -> str:
    return messages.init_not_found(path, where)


def _arch_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every backbone key of ``arch`` and its shape (a UserError for an unknown name)."""
    from swavctl.model.backbones import backbone_shapes, check_backbone_name

    check_backbone_name(arch)
    return dict(backbone_shapes(arch))


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _matching_arch(backbone: Mapping[str, tuple[int, ...]]) -> str | None:
    """The architecture (of SUPPORTED_ARCHS) whose backbone keys and shapes are exactly these."""
    for arch in SUPPORTED_ARCHS:
        if _arch_shapes(arch) == backbone:
            return arch
    return None


def _refuse_mismatch(
    source: Path, backbone: Mapping[str, tuple[int, ...]], arch: str, arch_where: str, found: str | None
) -> None:
    """A :class:`UserError` listing how ``backbone`` differs from ``arch``'s, when it does."""
    differences = key_differences(_arch_shapes(arch), backbone)
    if not differences:
        return
    hint = f"; it is a {found} backbone: drop {arch_where} to use it as it is" if found else ""
    raise UserError(
        f"{source}: its backbone does not match {arch_where} {arch}: {'; '.join(differences)}{hint}"
    )


def _nearest(backbone: Mapping[str, tuple[int, ...]]) -> str:
    """The supported architecture whose backbone differs least from ``backbone`` (keys and shapes)."""

    def distance(arch: str) -> int:
        want = _arch_shapes(arch)
        return len(want.keys() ^ backbone.keys()) + sum(
            1 for k, v in want.items() if k in backbone and backbone[k] != v
        )

    return min(SUPPORTED_ARCHS, key=distance)


def _from_model(
    loaded: LoadedModel,
) -> tuple[str, _Tensors, _Tensors, _Tensors]:
    """(arch, backbone, head, prototypes) of a swavctl checkpoint or export."""
    model = loaded.model
    head = dict(model.head.state_dict()) if loaded.has_head else {}
    prototypes = dict(model.prototypes.state_dict()) if loaded.has_head else {}
    return loaded.settings.model.arch, dict(model.backbone.state_dict()), head, prototypes


def _from_state_dict(
    obj: object, source: Path, arch: str | None, arch_where: str
) -> tuple[str, str, _Tensors, _Tensors, _Tensors, tuple[str, ...]]:
    """(kind, arch, backbone, head, prototypes, dropped) of an official checkpoint or a state dict."""
    state = flat_state_dict(obj, str(source))
    dropped = tuple(sorted(k for k in state if k.startswith("fc.")))
    for key in dropped:
        del state[key]
    official = any(k.startswith(_OFFICIAL_HEAD) for k in state)
    backbone = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(_OFFICIAL_HEAD)}
    found = _matching_arch(backbone)
    if arch is not None:
        _refuse_mismatch(source, backbone, arch, arch_where, found)
    elif found is None:
        nearest = _nearest(backbone)
        raise UserError(
            f"{source}: its backbone is none of {', '.join(SUPPORTED_ARCHS)}; compared with the nearest, "
            f"{nearest}: {'; '.join(key_differences(_arch_shapes(nearest), backbone))}"
        )
    use = arch or found
    assert use is not None
    if use not in SUPPORTED_ARCHS:
        raise UserError(
            f"{source}: a state dict without swavctl settings is read as one of "
            f"{', '.join(SUPPORTED_ARCHS)}; for {use}, pass the swavctl run folder or export it came from"
        )
    converted, head = convert_official_state_dict(state, arch=use, source=str(source))
    head_state = {k[len("head.") :]: v for k, v in head.items() if k.startswith("head.")}
    prototypes = {k[len("prototypes.") :]: v for k, v in head.items() if k.startswith("prototypes.")}
    kind = "official SwAV checkpoint" if official else "state dict"
    return kind, use, converted, head_state, prototypes, dropped


def read_init(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_where: str = "model.arch",
    where: str = "--init",
    warn: Callable[[str], None] | None = None,
) -> InitWeights:
    """Read an ``--init`` source (see the module doc) into swavctl's layout, on the CPU.

    With ``arch``, the backbone must match it exactly (else a :class:`UserError` listing the
    differences, naming ``arch_where``, the flag or setting that chose it); without, the
    architecture is the source's. ``warn`` hears of a run folder's checkpoints that do not verify.
    """
    given = latest.follow(Path(path).expanduser())  # runs/latest and paths through it
    if not given.exists():
        raise UserError(_not_found(given, where))
    source = resolve_model_path(given, warn).resolve()
    check_weights_file(source)  # a malformed container is refused before torch reads it
    sha256 = file_sha256(source)
    safetensors = is_safetensors(source)
    if safetensors and read_safetensors_metadata(source).get("format", "").startswith(EXPORT_FORMAT):
        kind, loaded = "swavctl export", load_model(source)
    else:
        obj = read_safetensors(source)[0] if safetensors else load_pickle_weights(source)
        if not is_checkpoint(obj):
            kind, found, backbone, head, prototypes, dropped = _from_state_dict(obj, source, arch, arch_where)
            return InitWeights(source, sha256, kind, found, backbone, head, prototypes, dropped)
        kind, loaded = "swavctl checkpoint", checkpoint_model(obj, source)
    found, backbone, head, prototypes = _from_model(loaded)
    if arch is not None:
        _refuse_mismatch(source, _shapes(backbone), arch, arch_where, found)
    return InitWeights(source, sha256, kind, found, backbone, head, prototypes, ())


def arch_of_init(path: str | Path) -> str:
    """The backbone architecture (a ``model.arch`` name) of the ``--init`` source at ``path``.

    A swavctl run, checkpoint or export says it in its settings; an official checkpoint or a
    torchvision state dict is the supported ResNet whose keys and shapes it matches exactly. A
    source that is none of these is a :class:`UserError`. The same file always gives the same
    answer, so a recipe built around it is the same when the same command runs again.
    """
    return read_init(path).arch


def resolve_init(
    settings: Settings,
    *,
    arch_where: str | None,
    where: str = "--init",
    warn: Callable[[str], None] | None = None,
) -> Settings:
    """``settings`` with ``model.init`` read: the file's path recorded absolute (a run folder as
    the checkpoint or export it holds), its SHA-256 in ``model.init_sha256`` and, when the
    architecture was not given (``arch_where`` None), ``model.arch`` from the file; when it was
    (``arch_where`` names the flag or setting), the file must match it.

    A file that is gone is no error when the settings record its SHA-256 already (a run's
    ``resolved.toml`` given to ``--preset``): that run resumes without it, and only a new run
    needs it, which then says so.
    """
    init = settings.model.init
    if not init:
        return settings
    path = Path(init).expanduser()
    if not path.exists() and settings.model.init_sha256:
        update = {"init": str(path.absolute())}
    else:
        arch = settings.model.arch if arch_where is not None else None
        weights = read_init(path, arch=arch, arch_where=arch_where or "model.arch", where=where, warn=warn)
        update = {"init": str(weights.path), "init_sha256": weights.sha256, "arch": weights.arch}
    return settings.model_copy(update={"model": settings.model.model_copy(update=update)})


def _head_text(head: Mapping[str, torch.Tensor]) -> str:
    """A projection head's widths: ``d -> D`` (one layer) or ``d -> hidden -> D``."""
    if "weight" in head:
        out_dim, in_dim = head["weight"].shape
        return f"{in_dim} -> {out_dim}"
    hidden, in_dim = head["0.weight"].shape
    return f"{in_dim} -> {hidden} -> {head['3.weight'].shape[0]}"


def _prototypes_text(state: Mapping[str, torch.Tensor]) -> str:
    """Prototype sets as ``K x D`` each (``3000 x 128``, or ``3000 x 128 + 3000 x 128`` for two sets)."""
    return " + ".join(f"{v.shape[0]} x {v.shape[1]}" for v in state.values())


def _fits(state: Mapping[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return bool(state) and _shapes(state) == _shapes(module.state_dict())


@torch.no_grad()
def load_init(model: SwAV, settings: Settings, say: Callable[[str], None]) -> None:
    """Put ``model.init``'s weights into the model of a new run (a resumed run never calls this).

    The backbone must match ``model.arch`` exactly; the head and the prototypes are taken when
    they fit (see the module doc). ``say`` gets one line naming what came from the source and
    what is new, after one naming a dropped classifier. A file whose SHA-256 is no longer the
    recorded ``model.init_sha256`` is refused: the run would not be the one its settings describe.
    """
    if not settings.model.init:
        return
    with torch.random.fork_rng(devices=[]):  # building a swavctl source's model draws numbers: not the run's
        weights = read_init(settings.model.init, arch=settings.model.arch, where="model.init")
    recorded = settings.model.init_sha256
    if recorded and recorded != weights.sha256:
        raise UserError(
            f"model.init {weights.path} has changed since the run was set up (SHA-256 {recorded} recorded, "
            f"{weights.sha256} now); run the command again to start from the file as it is"
        )
    model.backbone.load_state_dict(weights.backbone, strict=True)
    loaded = [f"the backbone ({weights.arch}, {len(weights.backbone)} tensors)"]
    new = ""
    if not weights.head:
        new = "a new projection head and new prototypes (the source has none)"
    elif not _fits(weights.head, model.head):
        new = (
            f"a new projection head and new prototypes (the source's head {_head_text(weights.head)} does "
            f"not fit this run's {_head_text(model.head.state_dict())})"
        )
    else:
        model.head.load_state_dict(weights.head, strict=True)
        loaded.append("the projection head")
        if _fits(weights.prototypes, model.prototypes):
            model.prototypes.load_state_dict(weights.prototypes, strict=True)
            loaded.append("the prototypes")
        elif not weights.prototypes:
            new = "new prototypes (the source has none)"
        else:
            new = (
                f"new prototypes (the source's {_prototypes_text(weights.prototypes)} do not fit this run's "
                f"{_prototypes_text(model.prototypes.state_dict())})"
            )
    if weights.dropped:
        say(f"init: dropped the classifier of {weights.path} ({', '.join(weights.dropped)}): SwAV has none")
    parts = ", ".join(loaded[:-1]) + " and " + loaded[-1] if len(loaded) > 1 else loaded[0]
    say(f"init: {weights.kind} {weights.path}: loaded {parts}" + (f"; {new}" if new else ""))


def init_summary(settings: Settings) -> dict[str, dict[str, str | None]]:
    """What ``summary.json`` records of the run's ``--init`` source (nothing without one)."""
    if not settings.model.init:
        return {}
    return {"init": {"path": settings.model.init, "sha256": settings.model.init_sha256}}
