"""The pruning rules a config constructs: :class:`SparsityRule` and :class:`ChannelRule`.

Standard library only, so a config file that builds rules loads, and is checked, without JAX.
``methods.pruning.masks`` and ``methods.pruning.structured`` use (and re-export) them.
"""

from __future__ import annotations

import dataclasses

from research.tree.rules import Rule


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityRule(Rule):
    """Prune the leaves whose path matches ``pattern``.

    Attributes:
      pattern: regular expression searched in the parameter path and in its module path
        (``"kernel$"``, ``"^head/"``, ``"^head$"``; the convention in :mod:`research.tree.rules`).
      sparsity: fraction of the leaf's entries set to zero, in [0, 1). ``None`` uses the
        sparsity passed to the function (or the schedule's). ``0.0`` leaves the leaf dense,
        which is how a rule excludes a layer (put it before broader rules).
    """

    sparsity: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.sparsity is not None:
            check_sparsity(self.sparsity, f"SparsityRule(pattern={self.pattern!r}).sparsity")


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Returns ``float(sparsity)`` or raises if it is outside [0, 1).

    Raises:
      ValueError: naming the value and the valid range.
    """
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(
            f"{name}={sparsity} is outside [0, 1); pass the fraction of weights to remove, "
            "e.g. 0.9 for 90% sparsity (1.0 would remove every weight)"
        )
    return s


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelRule(Rule):
    """Per-group removal ratio, matched against the group's producer module paths.

    Attributes:
      pattern: regular expression searched in producer module paths and their kernel paths
        (e.g. ``"^blocks/[0-2]/"``; the convention in :mod:`research.tree.rules`).
      ratio: fraction of the group's channels to remove, in [0, 1); ``None`` uses the call's
        ``ratio``; ``0.0`` keeps the group whole.
    """

    ratio: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.ratio is not None:
            check_channel_ratio(self.ratio, f"ChannelRule(pattern={self.pattern!r}).ratio")


def check_channel_ratio(ratio: float, name: str = "ratio") -> float:
    """Returns ``float(ratio)`` or raises if it is outside [0, 1) (the fraction of channels removed)."""
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name}={ratio} is outside [0, 1); pass the fraction of channels to remove")
    return float(ratio)
