"""The training methods (``method``) and which settings apply to each.

SwAV, DeepCluster-v2 and SeLa-v2 (arXiv 2006.09882: Sec. 3, Sec. 5.1 and App. D) share the data,
model, optimizer and training settings, and these of the ``[swav]`` section: ``temperature`` (the
softmax temperature of every method's predictions) and ``assignment_crops`` (the crops whose codes
are targets: SwAV's swapped crops, the other methods' memory-bank crops, the official
``crops_for_assign``). The rest of ``[swav]`` is SwAV's online Sinkhorn and queue; ``[deepcluster]``
and ``[sela]`` hold the other methods' own settings.

A setting that does not apply to the chosen method is refused with the reason
(:func:`inapplicable_reason`): by :func:`swavctl.config.resolve` with the source that gave it, and
by the settings tree itself for a value other than its default (a file read back).
This module imports nothing of swavctl, so :mod:`swavctl.config` can use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

SWAV = "swav"
DEEPCLUSTER_V2 = "deepcluster-v2"
SELA_V2 = "sela-v2"

#: Every method ``method`` accepts, the default first.
METHODS = (SWAV, DEEPCLUSTER_V2, SELA_V2)

_ONLINE_SINKHORN = {
    DEEPCLUSTER_V2: "DeepCluster-v2's codes come from spherical k-means over the memory bank, not from "
    "Sinkhorn-Knopp (its own settings are in [deepcluster])",
    SELA_V2: "SeLa-v2's codes come from the offline Sinkhorn-Knopp over the whole memory bank, whose "
    "settings are sela.epsilon, sela.tolerance, sela.check_every and sela.max_iterations",
}
_QUEUE = {
    method: f"{name}'s memory is the bank of the previous epoch's embeddings (one row per image), not a queue"
    for method, name in ((DEEPCLUSTER_V2, "DeepCluster-v2"), (SELA_V2, "SeLa-v2"))
}

#: dotted key (or section, ending in '.') -> {method it does not apply to: why}
_NOT_FOR: dict[str, dict[str, str]] = {
    "swav.epsilon": _ONLINE_SINKHORN,
    "swav.sinkhorn_iterations": _ONLINE_SINKHORN,
    "swav.queue_length": _QUEUE,
    "swav.queue_start_epoch": _QUEUE,
    "swav.freeze_prototypes_steps": {
        DEEPCLUSTER_V2: "DeepCluster-v2's prototypes are the k-means centroids, copied in at every "
        "epoch start, and never take a gradient",
    },
    "deepcluster.": {
        SWAV: "[deepcluster] holds DeepCluster-v2's settings (pass --method deepcluster-v2)",
        SELA_V2: "[deepcluster] holds DeepCluster-v2's k-means settings; SeLa-v2's are in [sela]",
    },
    "sela.": {
        SWAV: "[sela] holds SeLa-v2's settings (pass --method sela-v2)",
        DEEPCLUSTER_V2: "[sela] holds SeLa-v2's offline Sinkhorn settings; DeepCluster-v2's are in "
        "[deepcluster]",
    },
}

#: Why a list of prototype sets does not apply to SwAV.
SWAV_ONE_SET = (
    "SwAV trains one prototype set: give one number K (e.g. --set model.prototypes=3000); several "
    "sets ([3000, 3000, 3000]) are for --method deepcluster-v2 and sela-v2"
)


def inapplicable_reason(method: str, key: str) -> str | None:
    """Why the setting ``key`` (dotted) does not apply to ``method``, or None when it does."""
    for pattern, reasons in _NOT_FOR.items():
        if (key == pattern or (pattern.endswith(".") and key.startswith(pattern))) and method in reasons:
            return reasons[method]
    return None


def inapplicable_keys(method: str) -> list[str]:
    """The dotted keys and sections (ending in '.') that do not apply to ``method``."""
    return [pattern for pattern, reasons in _NOT_FOR.items() if method in reasons]


def unknown_method_message(name: object) -> str:
    """The refusal of a ``method`` that is none of :data:`METHODS`, with the nearest valid name."""
    close = difflib.get_close_matches(str(name).lower(), METHODS, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown method {name!r}{hint} (methods: {', '.join(METHODS)})"


#: A preset's table of per-method values: ``[by_method.deepcluster-v2.swav]`` and so on, applied
#: on top of the preset's own values when the run's method is that one (the user's flags and
#: ``--set`` still win). ``demo`` uses it for what DeepCluster-v2 needs on the digits.
BY_METHOD = "by_method"


def split_by_method(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pop ``tree``'s :data:`BY_METHOD` table: {method: settings tree}.

    Raises ``ValueError`` (the message to show) for a table that is not one, or a method name that
    is none of :data:`METHODS`.
    """
    raw = tree.pop(BY_METHOD, None)
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"'{BY_METHOD}' must hold one table per method ([{BY_METHOD}.deepcluster-v2])")
    for name in raw:
        if name not in METHODS:
            raise ValueError(f"[{BY_METHOD}.{name}]: {unknown_method_message(name)}")
    return raw


def chosen_method(
    tree: Mapping[str, Any], flags: Mapping[str, Any], parsed: Sequence[tuple[list[str], Any]]
) -> Any:
    """The run's method: the last ``--set method=``, else the ``method`` flag, else ``tree``'s
    (a preset's), else SwAV."""
    for path, value in reversed(parsed):
        if path == ["method"]:
            return value
    if flags.get("method") is not None:
        return flags["method"]
    return tree.get("method", SWAV)
