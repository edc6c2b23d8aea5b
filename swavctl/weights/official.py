"""Import of official facebookresearch/swav checkpoints.

The official training script saves ``{"epoch", "state_dict", "optimizer", ...}`` where
``state_dict`` comes from a ``DistributedDataParallel`` model, so every key starts with
``module.``. The model is a torchvision-style ResNet (``conv1``, ``bn1``, ``layer1`` ...
``layer4``; no ``fc``) plus

* ``projection_head``: either ``Sequential(Linear(d, hidden), BatchNorm1d(hidden), ReLU,
  Linear(hidden, out))`` (keys ``projection_head.{0,1,3}.*``) or a single ``Linear(d, out)``
  (keys ``projection_head.weight/bias``), and
* ``prototypes``: ``Linear(out, K, bias=False)`` (key ``prototypes.weight``), or, in the
  DeepCluster-v2 and SeLa-v2 checkpoints, ``MultiPrototypes``: one ``Linear(out, K_h,
  bias=False)`` per set h (keys ``prototypes.prototypes0.weight``, ``prototypes.prototypes1.weight``,
  ...; ``src/resnet50.py`` ``MultiPrototypes``, 3 x 3000 in the released models).

The wide variants resnet50w2/w4/w5 use the ResNet-50 layout with every width multiplied by
``w`` (``conv1`` has ``64*w`` output channels, the feature dimension is ``2048*w``).

:func:`convert_official_state_dict` accounts for every key: anything missing, unexpected or of
the wrong shape is a :class:`~swavctl.errors.UserError` that lists the offending names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from swavctl.errors import UserError
from swavctl.model.swav import prototype_set_keys
from swavctl.weights.safetensors_io import assert_finite

__all__ = [
    "SUPPORTED_ARCHS",
    "backbone_feature_dim",
    "convert_official_state_dict",
    "expected_backbone_shapes",
    "flat_state_dict",
    "key_differences",
]

#: Backbone names accepted by :func:`convert_official_state_dict`.
SUPPORTED_ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50w2",
    "resnet50w4",
    "resnet50w5",
)

_WIDTHS = {"resnet50": 1, "resnet50w2": 2, "resnet50w4": 4, "resnet50w5": 5}

_MLP_HEAD = (
    "projection_head.0.weight",
    "projection_head.0.bias",
    "projection_head.1.weight",
    "projection_head.1.bias",
    "projection_head.1.running_mean",
    "projection_head.1.running_var",
    "projection_head.1.num_batches_tracked",
    "projection_head.3.weight",
    "projection_head.3.bias",
)
_LINEAR_HEAD = ("projection_head.weight", "projection_head.bias")
_PROTOTYPES = "prototypes.weight"
#: One set of the official ``MultiPrototypes`` (DeepCluster-v2, SeLa-v2): ``prototypes{h}``.
_MULTI_PROTOTYPES = re.compile(r"^prototypes\.prototypes(\d+)\.weight$")
_MAX_LISTED = 10


def _check_arch(arch: str) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")


def backbone_feature_dim(arch: str) -> int:
    """Dimension of the pooled backbone features for ``arch`` (512, 2048 or ``2048*w``)."""
    _check_arch(arch)
    if arch in ("resnet18", "resnet34"):
        return 512
    return 2048 * _WIDTHS[arch]


def expected_backbone_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Map every backbone key of ``arch`` (torchvision names, no ``fc``) to its expected shape.

    Built once per architecture on the meta device, so even resnet50w5 costs no real memory.
    """
    from swavctl.model.backbones import backbone_shapes

    _check_arch(arch)
    return dict(backbone_shapes(arch))


def _listing(names: Iterable[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:_MAX_LISTED])
    rest = len(ordered) - _MAX_LISTED
    return f"{shown}, ... and {rest} more" if rest > 0 else shown


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: expected a state dict, got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _strip_module(state: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: state dict key {key!r} is not a string")
        name = key[len("module.") :] if key.startswith("module.") else key
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor")
        if name in out:
            raise UserError(f"{source}: key {name!r} appears both with and without the 'module.' prefix")
        out[name] = value
    return out


def _official_prototype_keys(state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The prototype keys an official checkpoint must have, given the ones it has.

    ``prototypes.weight`` (one set), unless it has keys of the ``MultiPrototypes`` layout: then
    ``prototypes.prototypes0.weight`` ... ``prototypes.prototypes{H-1}.weight``, H being the
    number of such keys found (a gap then shows as a missing key and the highest as unexpected).
    """
    count = sum(1 for k in state if _MULTI_PROTOTYPES.match(k))
    if count == 0:
        return (_PROTOTYPES,)
    return tuple(f"prototypes.prototypes{h}.weight" for h in range(count))


def flat_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a state dict as saved: bare, or under ``state_dict`` (or ``model``), with a
    leading ``module.`` stripped from every key; a :class:`UserError` for anything else."""
    return _strip_module(_unwrap(obj, source), source)


def key_differences(expected: Mapping[str, Iterable[int]], found: Mapping[str, Iterable[int]]) -> list[str]:
    """How the keys and shapes ``found`` differ from those ``expected``: up to three phrases
    (missing keys, unexpected keys, shape mismatches), each with its count and the first
    :data:`_MAX_LISTED` names; empty when they agree."""
    want = {k: tuple(v) for k, v in expected.items()}
    got = {k: tuple(v) for k, v in found.items()}
    parts = []
    missing, unexpected = want.keys() - got.keys(), got.keys() - want.keys()
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    wrong = [
        f"{k} {_shape_str(got[k])} (expected {_shape_str(v)})"
        for k, v in sorted(want.items())
        if k in got and got[k] != v
    ]
    if wrong:
        more = f"; ... and {len(wrong) - _MAX_LISTED} more" if len(wrong) > _MAX_LISTED else ""
        parts.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:_MAX_LISTED])}{more}")
    return parts


def _width_hint(state: Mapping[str, torch.Tensor], arch: str) -> str:
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        return ""
    for candidate in SUPPORTED_ARCHS:
        if candidate == arch or candidate in ("resnet18", "resnet34"):
            continue
        if conv1.shape[0] == 64 * _WIDTHS[candidate] and conv1.shape[0] != 64:
            return f" (conv1 has {conv1.shape[0]} channels: is this a {candidate} checkpoint?)"
    return ""


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def convert_official_state_dict(
    obj: Mapping[str, Any], *, arch: str, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Convert an official SwAV checkpoint into ``(backbone_state, head_state)``.

    ``obj`` is a bare state dict or a dict holding one under ``state_dict`` (or ``model``); a
    leading ``module.`` is stripped from every key. Backbone keys keep their torchvision names
    and load with ``strict=True`` into a torchvision ResNet whose ``fc`` is ``nn.Identity()``
    (for the wide variants, the equally named but wider layout). Head keys are renamed
    ``projection_head.X`` -> ``head.X``; ``prototypes.weight`` keeps its name, and the sets of a
    ``MultiPrototypes`` checkpoint (DeepCluster-v2, SeLa-v2) ``prototypes.prototypes{h}.weight``
    become ``prototypes.{h}.weight``, the layout of a swavctl model with several sets (one such
    set becomes ``prototypes.weight``: one set has one layout). A backbone-only checkpoint (no
    projection head and no prototypes) gives an empty ``head_state``.

    Raises :class:`UserError` (messages start with ``source``) for an unknown ``arch``, missing
    or unexpected keys (``fc.*`` included), wrong shapes or dtypes and NaN/Inf values.
    """
    _check_arch(arch)
    state = flat_state_dict(obj, source)
    multi = sorted(k for k in state if k.startswith("prototypes.prototypes"))
    prototype_keys = _official_prototype_keys(state) if multi else (_PROTOTYPES,)
    shapes = expected_backbone_shapes(arch)
    head_expected = _head_layout(state)
    _check_keys(state, shapes, head_expected, prototype_keys, arch=arch, source=source)
    want = _expected_shapes(state, shapes, head_expected, prototype_keys, arch)
    _check_shapes_and_values(state, want, arch=arch, source=source)

    backbone = {k: state[k] for k in shapes}
    head: dict[str, torch.Tensor] = {}
    for k in head_expected:
        head["head." + k[len("projection_head.") :]] = state[k]
    if head_expected:
        for key, name in zip(prototype_keys, prototype_set_keys(len(prototype_keys)), strict=True):
            head[name] = state[key]
    return backbone, head


def _head_layout(state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The projection head's keys the checkpoint should hold: a linear head, the MLP, or none."""
    head_present = [k for k in state if k.startswith("projection_head.")]
    if head_present and all(k in _LINEAR_HEAD for k in head_present):
        return _LINEAR_HEAD
    if head_present or _PROTOTYPES in state or any(k.startswith("prototypes.") for k in state):
        return _MLP_HEAD
    return ()


def _check_keys(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    head_expected: tuple[str, ...],
    prototype_keys: tuple[str, ...],
    *,
    arch: str,
    source: str,
) -> None:
    """Refuse missing and unexpected keys (``fc.*`` included), naming them."""
    expected = set(shapes) | set(head_expected)
    if head_expected:
        expected.update(prototype_keys)
    missing = expected - state.keys()
    unexpected = state.keys() - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        raise UserError(
            f"{source}: not an official SwAV {arch} checkpoint: {'; '.join(parts)}{_width_hint(state, arch)}"
        )


def _expected_shapes(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    head_expected: tuple[str, ...],
    prototype_keys: tuple[str, ...],
    arch: str,
) -> dict[str, tuple[int, ...]]:
    """Every key's expected shape; the head sizes (hidden, out, K) are read from the checkpoint."""
    want: dict[str, tuple[int, ...]] = dict(shapes)
    if not head_expected:
        return want
    d = backbone_feature_dim(arch)
    if head_expected == _LINEAR_HEAD:
        out_dim = state["projection_head.weight"].shape[0]
        want["projection_head.weight"] = (out_dim, d)
        want["projection_head.bias"] = (out_dim,)
    else:
        hidden = state["projection_head.0.weight"].shape[0]
        out_dim = state["projection_head.3.weight"].shape[0]
        want["projection_head.0.weight"] = (hidden, d)
        want["projection_head.0.bias"] = (hidden,)
        for field in ("weight", "bias", "running_mean", "running_var"):
            want[f"projection_head.1.{field}"] = (hidden,)
        want["projection_head.1.num_batches_tracked"] = ()
        want["projection_head.3.weight"] = (out_dim, hidden)
        want["projection_head.3.bias"] = (out_dim,)
    for key in prototype_keys:  # each set's K_h is the file's own
        protos = state[key]
        want[key] = (protos.shape[0] if protos.dim() == 2 else 0, out_dim)
    return want


def _check_shapes_and_values(
    state: Mapping[str, torch.Tensor], want: Mapping[str, tuple[int, ...]], *, arch: str, source: str
) -> None:
    """Refuse wrong shapes, wrong dtypes and NaN/Inf values."""
    wrong = [
        f"{k} {_shape_str(state[k].shape)} (expected {_shape_str(v)})"
        for k, v in sorted(want.items())
        if tuple(state[k].shape) != v
    ]
    if wrong:
        shown = "; ".join(wrong[:_MAX_LISTED])
        more = f"; ... and {len(wrong) - _MAX_LISTED} more" if len(wrong) > _MAX_LISTED else ""
        raise UserError(f"{source}: shapes do not match {arch}: {shown}{more}{_width_hint(state, arch)}")

    # Parameters and buffers must be floating point; num_batches_tracked must be an integer.
    bad_dtype = sorted(
        k for k, t in state.items() if t.is_floating_point() == k.endswith("num_batches_tracked")
    )
    if bad_dtype:
        raise UserError(
            f"{source}: unexpected dtype for {_listing(bad_dtype)} "
            "(parameters must be floating point, num_batches_tracked an integer)"
        )
    assert_finite(state, source=source)
