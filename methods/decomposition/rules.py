"""The decomposition rule a config constructs: :class:`DecompositionRule`, and :class:`ModelBudget`.

Standard library only, so a config file that builds rules loads, and is checked, without JAX.
``methods.decomposition.surgery`` uses (and re-exports) them.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Literal

from research.tree.rules import Rule

_CRITERIA = ("rank", "energy", "param_ratio", "flop_ratio", "vbmf")


def _not_int(x: Any) -> bool:
    return isinstance(x, bool) or not isinstance(x, int)


def _check_rank(rank: Any, name: str) -> None:
    """A rank is None, an int >= 1 or a pair of them (tucker2's input and output ranks)."""
    if rank is None:
        return
    items = rank if isinstance(rank, (tuple, list)) else (rank,)
    if isinstance(rank, (tuple, list)) and len(rank) != 2:
        raise ValueError(f"{name}={rank!r} must be an int or a pair (r_in, r_out)")
    if any(_not_int(r) or r < 1 for r in items):
        raise ValueError(f"{name}={rank!r} must be an int >= 1 or a pair of them (None: chosen by another criterion)")


def _check_ratio(value: Any, name: str) -> None:
    """A fraction in (0, 1] (or None)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1] (None: not this criterion)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecompositionRule(Rule):
    """How to factorize the layers whose module path (or kernel path, ``conv1/kernel``) matches ``pattern``.

    The path convention is the one of every rule (:mod:`research.tree.rules`).

    Give at most one rank criterion; with none, the layer's rank comes from the whole-model
    ``budget`` passed to :func:`factorize`.

    Attributes:
      method: ``"svd"`` (``nnx.Linear`` -> :class:`LowRankLinear`), ``"tucker2"`` or ``"cp"``
        (``nnx.Conv`` -> :class:`Tucker2Conv` / :class:`CPConv`), or ``"auto"`` (svd for linear,
        tucker2 for conv).
      rank: fixed rank (int; ``(r_in, r_out)`` or an int for both with tucker2).
      energy: fraction of squared singular values to keep (svd, tucker2).
      param_ratio: largest rank with at most this fraction of the dense layer's parameters.
      flop_ratio: largest rank with at most this fraction of the dense layer's FLOPs.
      vbmf: EVBMF rank (svd, tucker2; Kim et al. 2016).
      keep_if_slower: factorize even when the factorized layer measures slower than the dense one.
      skip: leave matched layers dense (e.g. ``pattern="head"`` before a catch-all rule).
      n_iter_max: iterations of tensorly's ALS/HOOI (cp: 200, tucker2: 100 when None).
    """

    method: Literal["auto", "svd", "tucker2", "cp"] = "auto"
    rank: int | tuple[int, int] | None = None
    energy: float | None = None
    param_ratio: float | None = None
    flop_ratio: float | None = None
    vbmf: bool = False
    keep_if_slower: bool = False
    skip: bool = False
    n_iter_max: int | None = None

    def __post_init__(self):
        super().__post_init__()
        name = f"DecompositionRule(pattern={self.pattern!r})"
        if self.method not in ("auto", "svd", "tucker2", "cp"):
            raise ValueError(f"{name}.method={self.method!r} is not one of 'auto', 'svd', 'tucker2', 'cp'")
        _check_rank(self.rank, f"{name}.rank")
        for field in ("energy", "param_ratio", "flop_ratio"):
            _check_ratio(getattr(self, field), f"{name}.{field}")
        if self.n_iter_max is not None and (_not_int(self.n_iter_max) or self.n_iter_max < 1):
            raise ValueError(f"{name}.n_iter_max={self.n_iter_max!r} must be an int >= 1 (None: tensorly's default)")
        for field in ("vbmf", "keep_if_slower", "skip"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{name}.{field}={getattr(self, field)!r} must be True or False")
        given = self.criteria()
        if len(given) > 1:
            raise ValueError(f"rule {self.pattern!r} sets several rank criteria {sorted(given)}; keep one")

    def criteria(self) -> dict[str, Any]:
        """The rank criterion this rule sets (empty when the model budget decides)."""
        out = {k: getattr(self, k) for k in _CRITERIA if getattr(self, k) not in (None, False)}
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelBudget:
    """A budget shared by all layers whose rule sets no rank criterion.

    One common knob ``t`` in (0, 1] (kept energy for svd/tucker2, fraction of the
    parameter-equivalent rank for cp) is bisected so that those layers together use at most
    ``ratio`` of their dense parameters (or FLOPs).

    Attributes:
      param_ratio: parameter fraction of the budgeted layers, or
      flop_ratio: FLOP fraction of the budgeted layers.
    """

    param_ratio: float | None = None
    flop_ratio: float | None = None

    def __post_init__(self):
        if (self.param_ratio is None) == (self.flop_ratio is None):
            raise ValueError("ModelBudget needs exactly one of param_ratio, flop_ratio")
        field = "param_ratio" if self.param_ratio is not None else "flop_ratio"
        _check_ratio(getattr(self, field), f"ModelBudget.{field}")
