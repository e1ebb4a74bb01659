"""Search spaces: float, int, categorical and conditional parameters.

A :class:`Space` maps parameter names to :class:`Float`, :class:`Int` or
:class:`Categorical` domains. A parameter with ``when={"parent": value}`` is
*active* only when every named parent is active and takes one of the given
values; conditions nest to any depth.

Every parameter is encoded to one coordinate of the unit cube ``[0, 1]^D``:

* ``Float``: linear or logarithmic rescaling of ``[low, high]``.
* ``Int``: the integers ``low..high`` split ``[0, 1]`` into equal cells (or
  log-spaced cells when ``log=True``); a value sits at its cell's centre.
* ``Categorical``: choice ``i`` of ``n`` sits at ``(i + 0.5) / n``.

Decoding any point of the cube gives a valid configuration, so samplers work in
the cube and never propose an invalid value. The array functions
(:meth:`Space.snap`, :meth:`Space.active_mask`) take an ``xp`` module so that the
same code runs in numpy and inside jitted JAX code.

Example:
  >>> space = Space({
  ...     "lr": Float(1e-4, 1e-1, log=True),
  ...     "method": Categorical(["prune", "quantize"]),
  ...     "sparsity": Float(0.5, 0.95, when={"method": "prune"}),
  ...     "bits": Int(2, 8, when={"method": "quantize"}),
  ... })
  >>> params = {"lr": 1e-3, "method": "prune", "sparsity": 0.9}
  >>> u, active = space.encode(params)
  >>> space.decode(u)["method"]
  'prune'
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

__all__ = ["Categorical", "Float", "Int", "Param", "Space", "UnitLayout", "active_unit", "snap_unit"]

_JSON_SCALARS = (str, int, float, bool, type(None))


def _normalise_when(when: Mapping[str, Any] | None) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, Mapping):
        raise TypeError(
            f"when={when!r} must be a mapping from parent name to value(s), e.g. when={{'method': 'prune'}}"
        )
    out = []
    for parent, values in when.items():
        if isinstance(values, (list, tuple, set, frozenset)):
            vals = tuple(values)
        else:
            vals = (values,)
        if not vals:
            raise ValueError(f"when={{{parent!r}: {values!r}}} lists no value; name at least one")
        out.append((str(parent), vals))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Float:
    """A real-valued parameter in ``[low, high]``.

    Args:
      low: Lower bound (inclusive).
      high: Upper bound (inclusive); must exceed ``low``.
      log: Sample and model on a logarithmic scale; needs ``low > 0``.
      when: Activation condition ``{parent_name: value or list of values}``.

    Raises:
      ValueError: If ``low >= high`` or ``log`` with ``low <= 0``.
    """

    low: float
    high: float
    log: bool = False
    when: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"Float(low={self.low}, high={self.high}) needs finite bounds")
        if self.low >= self.high:
            raise ValueError(f"Float(low={self.low}, high={self.high}): low must be < high; swap or widen them")
        if self.log and self.low <= 0:
            raise ValueError(
                f"Float(low={self.low}, high={self.high}, log=True): a log scale needs low > 0; "
                "raise low or pass log=False"
            )
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        object.__setattr__(self, "when", _normalise_when(self.when))

    kind = "float"

    def _bounds(self) -> tuple[float, float]:
        if self.log:
            return math.log(self.low), math.log(self.high)
        return self.low, self.high

    def to_unit(self, value: Any) -> float:
        """Encodes ``value`` to ``[0, 1]``."""
        v = float(value)
        if not (self.low <= v <= self.high):
            raise ValueError(f"value {v} is outside Float[{self.low}, {self.high}]")
        a, b = self._bounds()
        x = math.log(v) if self.log else v
        return min(max((x - a) / (b - a), 0.0), 1.0)

    def from_unit(self, u: float) -> float:
        """Decodes ``u`` in ``[0, 1]`` to a value in ``[low, high]``."""
        a, b = self._bounds()
        x = a + min(max(float(u), 0.0), 1.0) * (b - a)
        v = math.exp(x) if self.log else x
        return min(max(v, self.low), self.high)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "float", "low": self.low, "high": self.high, "log": self.log}


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer parameter in ``low..high`` (both inclusive).

    Args:
      low: Smallest value.
      high: Largest value; must exceed ``low``.
      log: Log-spaced cells (small values get finer resolution); needs ``low >= 1``.
      when: Activation condition ``{parent_name: value or list of values}``.

    Raises:
      ValueError: If ``low >= high`` or ``log`` with ``low <= 0``.
    """

    low: int
    high: int
    log: bool = False
    when: Mapping[str, Any] | None = None

    def __post_init__(self):
        if int(self.low) != self.low or int(self.high) != self.high:
            raise ValueError(f"Int(low={self.low}, high={self.high}) needs integer bounds")
        if self.low >= self.high:
            raise ValueError(
                f"Int(low={self.low}, high={self.high}): low must be < high; "
                "a single value is a constant, not a parameter"
            )
        if self.log and self.low <= 0:
            raise ValueError(
                f"Int(low={self.low}, high={self.high}, log=True): a log scale needs low >= 1; "
                "raise low or pass log=False"
            )
        object.__setattr__(self, "low", int(self.low))
        object.__setattr__(self, "high", int(self.high))
        object.__setattr__(self, "when", _normalise_when(self.when))

    kind = "int"

    def _edges(self) -> tuple[float, float]:
        if self.log:
            return math.log(self.low - 0.5), math.log(self.high + 0.5)
        return self.low - 0.5, self.high + 0.5

    def to_unit(self, value: Any) -> float:
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"value {value!r} is not an integer for Int[{self.low}, {self.high}]")
        v = int(value)
        if not (self.low <= v <= self.high):
            raise ValueError(f"value {v} is outside Int[{self.low}, {self.high}]")
        a, b = self._edges()
        x = math.log(v) if self.log else v
        return (x - a) / (b - a)

    def from_unit(self, u: float) -> int:
        a, b = self._edges()
        x = a + min(max(float(u), 0.0), 1.0) * (b - a)
        v = math.exp(x) if self.log else x
        return int(min(max(round(v), self.low), self.high))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high, "log": self.log}


@dataclasses.dataclass(frozen=True)
class Categorical:
    """A parameter that takes one of ``choices`` (JSON scalars: str, int, float, bool, None).

    Args:
      choices: The distinct values, at least one.
      when: Activation condition ``{parent_name: value or list of values}``.

    Raises:
      ValueError: If ``choices`` is empty or holds duplicates or non-JSON values.
    """

    choices: Sequence[Any]
    when: Mapping[str, Any] | None = None

    def __post_init__(self):
        choices = tuple(self.choices) if not isinstance(self.choices, str) else (self.choices,)
        if not choices:
            raise ValueError("Categorical(choices=[]) is empty; pass at least one choice")
        for c in choices:
            if not isinstance(c, _JSON_SCALARS):
                raise ValueError(
                    f"Categorical choice {c!r} is a {type(c).__name__}; use str/int/float/bool/None "
                    "and map it to an object in the objective"
                )
        keys = [json.dumps(c) for c in choices]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Categorical(choices={list(choices)!r}) has duplicates; remove them")
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "when", _normalise_when(self.when))

    kind = "categorical"

    def index(self, value: Any) -> int:
        key = json.dumps(value)
        for i, c in enumerate(self.choices):
            if json.dumps(c) == key:
                return i
        raise ValueError(f"value {value!r} is not one of the choices {list(self.choices)!r}")

    def to_unit(self, value: Any) -> float:
        return (self.index(value) + 0.5) / len(self.choices)

    def from_unit(self, u: float) -> Any:
        n = len(self.choices)
        return self.choices[min(max(int(math.floor(float(u) * n)), 0), n - 1)]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


class UnitLayout(NamedTuple):
    """What :meth:`Space.snap` and :meth:`Space.active_mask` need of each parameter, as arrays.

    Jitted code that takes these arrays as arguments (instead of closing over the space's
    bounds, which makes them constants of the program) is shared by every space of the same
    :meth:`Space.structure` (see :func:`snap_unit`, :func:`active_unit`).

    Fields, each ``(D,)``: ``kind`` (0 float, 1 int, 2 categorical), ``n_choices``
    (categoricals; 1 elsewhere), ``edge`` and ``width`` (ints: the lower cell edge and the
    width of ``[low - 0.5, high + 0.5]``, in log space for log ints; 0 and 1 elsewhere),
    ``low`` and ``high`` (ints; 0 and 1 elsewhere) and ``log`` (log-spaced ints).
    """

    kind: Any
    n_choices: Any
    edge: Any
    width: Any
    low: Any
    high: Any
    log: Any

    def astype(self, xp, dtype) -> UnitLayout:
        """The same layout as ``xp`` arrays: ``kind`` int32, ``log`` bool, the rest ``dtype``."""
        return UnitLayout(
            kind=xp.asarray(self.kind, xp.int32),
            n_choices=xp.asarray(self.n_choices, dtype),
            edge=xp.asarray(self.edge, dtype),
            width=xp.asarray(self.width, dtype),
            low=xp.asarray(self.low, dtype),
            high=xp.asarray(self.high, dtype),
            log=xp.asarray(self.log, bool),
        )


def snap_unit(u, layout: UnitLayout, xp=np):
    """:meth:`Space.snap` computed from a :class:`UnitLayout` (same values, same operations).

    Args:
      u: Array ``(..., D)`` in the unit cube.
      layout: The space's :meth:`Space.layout` (numpy or, inside jitted code, JAX arrays).
      xp: ``numpy`` or ``jax.numpy``.
    """
    u = xp.clip(u, 0.0, 1.0)
    n = layout.n_choices
    cat = (xp.clip(xp.floor(u * n), 0, n - 1) + 0.5) / n
    x = layout.edge + u * layout.width
    v = xp.where(layout.log, xp.exp(xp.where(layout.log, x, 0.0)), x)
    v = xp.clip(xp.round(v), layout.low, layout.high)
    x = xp.where(layout.log, xp.log(xp.where(layout.log, v, 1.0)), v)
    iu = (x - layout.edge) / layout.width
    return xp.where(layout.kind == 2, cat, xp.where(layout.kind == 1, iu, u))


def _cell_unit(c, layout: UnitLayout, j: int, xp):
    n = layout.n_choices[j]
    cat = xp.clip(xp.floor(c * n), 0, n - 1)
    x = layout.edge[j] + c * layout.width[j]
    v = xp.where(layout.log[j], xp.exp(xp.where(layout.log[j], x, 0.0)), x)
    num = xp.clip(xp.round(v), layout.low[j], layout.high[j]) - layout.low[j]
    return xp.where(layout.kind[j] == 2, cat, num).astype(xp.int32)


def active_unit(u, layout: UnitLayout, structure: tuple, xp=np):
    """:meth:`Space.active_mask` computed from a :class:`UnitLayout` and :meth:`Space.structure`.

    Args:
      u: Array ``(..., D)`` in the unit cube (need not be snapped).
      layout: The space's :meth:`Space.layout`.
      structure: The space's :meth:`Space.structure` (static: it is a Python tuple).
      xp: ``numpy`` or ``jax.numpy``.

    Returns:
      Boolean array ``(..., D)``.
    """
    _, conditions = structure
    cols: list[Any] = []
    for conds in conditions:
        a = xp.ones(u.shape[:-1], bool)
        for parent, allowed in conds:
            cell = _cell_unit(u[..., parent], layout, parent, xp)
            ok = xp.any(cell[..., None] == xp.asarray(allowed, xp.int32), axis=-1)
            a = a & cols[parent] & ok
        cols.append(a)
    return xp.stack(cols, axis=-1)


Param = Float | Int | Categorical
_FROM_DICT = {"float": Float, "int": Int, "categorical": Categorical}


def _param_from_dict(d: Mapping[str, Any]) -> Param:
    d = dict(d)
    cls = _FROM_DICT[d.pop("type")]
    when = d.pop("when", None)
    when = {p: v for p, v in when} if when else None
    return cls(**d, when=when)


class Space:
    """An ordered, validated search space.

    Parameters are re-ordered so that every parent precedes its children (otherwise the
    order given is kept). Conditions may name ``Categorical`` or ``Int`` parents.

    Args:
      params: Mapping from name to :class:`Float` / :class:`Int` / :class:`Categorical`.

    Raises:
      ValueError: On an empty space, a condition on an unknown parent, on a ``Float``
        parent, a condition value the parent cannot take, or a cycle of conditions.
    """

    def __init__(self, params: Mapping[str, Param]):
        if not params:
            raise ValueError("Space({}) is empty; give at least one parameter")
        for name, p in params.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"parameter name {name!r} must be a non-empty string")
            if not isinstance(p, (Float, Int, Categorical)):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}; use Float/Int/Categorical")
            for parent, values in p.when:
                if parent not in params:
                    raise ValueError(
                        f"parameter {name!r} has a condition on unknown parent {parent!r}; "
                        f"known parameters: {sorted(params)}"
                    )
                if parent == name:
                    raise ValueError(f"parameter {name!r} cannot be conditioned on itself")
                par = params[parent]
                if isinstance(par, Float):
                    raise ValueError(
                        f"parameter {name!r} is conditioned on Float parent {parent!r}; "
                        "conditions need a Categorical or Int parent"
                    )
                for v in values:
                    if isinstance(par, Categorical):
                        try:
                            par.index(v)
                        except ValueError:
                            raise ValueError(
                                f"condition {parent!r}={v!r} of parameter {name!r}: {v!r} is not "
                                f"one of {list(par.choices)!r}"
                            ) from None
                    elif isinstance(v, bool) or int(v) != v or not par.low <= v <= par.high:
                        raise ValueError(
                            f"condition {parent!r}={v!r} of parameter {name!r}: {v!r} is not an "
                            f"integer in [{par.low}, {par.high}]"
                        )
        self._params: dict[str, Param] = {}
        remaining = dict(params)
        while remaining:
            ready = [n for n, p in remaining.items() if all(parent in self._params for parent, _ in p.when)]
            if not ready:
                raise ValueError(
                    f"conditions form a cycle among {sorted(remaining)}; a parameter cannot "
                    "depend (directly or not) on itself"
                )
            for n in ready:
                self._params[n] = remaining.pop(n)
        self.names: tuple[str, ...] = tuple(self._params)
        self.dim = len(self.names)
        # encode() memo: samplers re-encode every stored trial at every ask.
        self._encoded: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        idx = {n: i for i, n in enumerate(self.names)}
        kinds = {"float": 0, "int": 1, "categorical": 2}
        self.kinds = np.array([kinds[self._params[n].kind] for n in self.names], np.int32)
        self.is_categorical = self.kinds == 2
        self.n_choices = np.array(
            [len(p.choices) if isinstance(p, Categorical) else 0 for p in self._params.values()],
            np.int32,
        )
        # conditions[j] = list of (parent index, allowed unit-cell indices of the parent)
        self._conditions: list[list[tuple[int, np.ndarray]]] = []
        for n in self.names:
            conds = []
            for parent, values in self._params[n].when:
                par = self._params[parent]
                if isinstance(par, Categorical):
                    cells = np.array(sorted({par.index(v) for v in values}), np.int32)
                else:
                    cells = np.array(sorted({int(v) - par.low for v in values}), np.int32)
                conds.append((idx[parent], cells))
            self._conditions.append(conds)
        self.is_parent = np.zeros(self.dim, bool)
        for conds in self._conditions:
            for p, _ in conds:
                self.is_parent[p] = True
        self.is_conditional = np.array([bool(c) for c in self._conditions])
        # Parameters that share the same activation condition form a group.
        sig_to_group: dict[Any, int] = {}
        groups = []
        for j in range(self.dim):
            sig = self._signature(j)
            groups.append(sig_to_group.setdefault(sig, len(sig_to_group)))
        self.groups = np.array(groups, np.int32)

    def _signature(self, j: int) -> tuple:
        conds = self._conditions[j]
        return tuple(sorted((p, tuple(c.tolist()), self._signature(p)) for p, c in conds))

    # ----------------------------------------------------------------- mapping API
    def __getitem__(self, name: str) -> Param:
        return self._params[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return self.dim

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def items(self):
        return self._params.items()

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {p!r}" for n, p in self._params.items())
        return f"Space({{{inner}}})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Space) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (used to check a reopened study)."""
        out = {}
        for n, p in self._params.items():
            d = p.to_dict()
            if p.when:
                d["when"] = [[parent, list(values)] for parent, values in p.when]
            out[n] = d
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Space:
        """Inverse of :meth:`to_dict`."""
        return cls({n: _param_from_dict(p) for n, p in d.items()})

    # ----------------------------------------------------------------- array functions
    def cells(self) -> np.ndarray:
        """Number of unit-cube cells per dimension (0 for floats)."""
        return np.array(
            [
                len(p.choices) if isinstance(p, Categorical) else (p.high - p.low + 1 if isinstance(p, Int) else 0)
                for p in self._params.values()
            ],
            np.int32,
        )

    def structure(self) -> tuple:
        """What a program over this space's unit cube depends on besides values: a hashable
        ``(kinds, conditions)``, with ``kinds`` the tuple of parameter kinds (0 float, 1 int,
        2 categorical) and ``conditions[j]`` the tuple of ``(parent index, allowed parent
        cells)`` of parameter ``j``. Names and bounds are not part of it (see :meth:`layout`):
        two spaces with the same structure share their samplers' compiled programs.
        """
        conditions = tuple(tuple((p, tuple(int(c) for c in cells)) for p, cells in conds) for conds in self._conditions)
        return tuple(int(k) for k in self.kinds), conditions

    def layout(self) -> UnitLayout:
        """The bounds and cell counts of the parameters as float64 arrays (:class:`UnitLayout`)."""
        d = self.dim
        edge, width = np.zeros(d), np.ones(d)
        low, high, nch = np.zeros(d), np.ones(d), np.ones(d)
        log = np.zeros(d, bool)
        for j, p in enumerate(self._params.values()):
            if isinstance(p, Categorical):
                nch[j] = len(p.choices)
            elif isinstance(p, Int):
                a, b = p._edges()
                edge[j], width[j] = a, b - a
                low[j], high[j], log[j] = p.low, p.high, p.log
        return UnitLayout(self.kinds.copy(), nch, edge, width, low, high, log)

    def snap(self, u, xp=np):
        """Moves each coordinate to the encoding of the value it decodes to.

        Args:
          u: Array ``(..., D)`` in the unit cube.
          xp: ``numpy`` or ``jax.numpy``.

        Returns:
          Array of the same shape: floats unchanged (clipped), ints and categoricals at
          their cell's encoding.
        """
        u = xp.clip(u, 0.0, 1.0)
        cols = []
        for j, p in enumerate(self._params.values()):
            c = u[..., j]
            if isinstance(p, Categorical):
                n = len(p.choices)
                c = (xp.clip(xp.floor(c * n), 0, n - 1) + 0.5) / n
            elif isinstance(p, Int):
                a, b = p._edges()
                x = a + c * (b - a)
                v = xp.exp(x) if p.log else x
                v = xp.clip(xp.round(v), p.low, p.high)
                x = xp.log(v) if p.log else v
                c = (x - a) / (b - a)
            cols.append(c)
        return xp.stack(cols, axis=-1)

    def cell_index(self, u, j: int, xp=np):
        """Integer cell of coordinate ``j`` (choice index, or ``value - low`` for ints)."""
        p = self._params[self.names[j]]
        c = u[..., j]
        if isinstance(p, Categorical):
            n = len(p.choices)
            return xp.clip(xp.floor(c * n), 0, n - 1).astype(xp.int32)
        a, b = p._edges()
        x = a + c * (b - a)
        v = xp.exp(x) if p.log else x
        return (xp.clip(xp.round(v), p.low, p.high) - p.low).astype(xp.int32)

    def active_mask(self, u, xp=np):
        """Which parameters are active at each point.

        Args:
          u: Array ``(..., D)`` in the unit cube (need not be snapped).
          xp: ``numpy`` or ``jax.numpy``.

        Returns:
          Boolean array ``(..., D)``.
        """
        cols: list[Any] = []
        for j in range(self.dim):
            a = xp.ones(u.shape[:-1], bool)
            for parent, allowed in self._conditions[j]:
                cell = self.cell_index(u, parent, xp)
                ok = xp.any(cell[..., None] == xp.asarray(allowed), axis=-1)
                a = a & cols[parent] & ok
            cols.append(a)
        return xp.stack(cols, axis=-1)

    def parent_active(self, active, j: int, xp=np):
        """Whether every parent of ``j`` is active (ignoring the parents' values)."""
        a = xp.ones(active.shape[:-1], bool)
        for parent, _ in self._conditions[j]:
            a = a & active[..., parent]
        return a

    # ----------------------------------------------------------------- dict <-> cube
    def encode(self, params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Encodes a configuration.

        Args:
          params: The active parameters (inactive ones must be absent).

        Returns:
          ``(u, active)``: unit-cube coordinates ``(D,)`` (0.5 where inactive) and the
          boolean activity mask ``(D,)``.

        Raises:
          ValueError: If ``params`` is not a valid configuration of this space.
        """
        try:
            key = tuple(sorted((k, type(v).__name__, v) for k, v in params.items()))
            hit = self._encoded.get(key)
        except TypeError:  # an unhashable or unorderable value: encode without the memo
            key, hit = None, None
        if hit is not None:
            return hit[0].copy(), hit[1].copy()
        self.validate(params)
        u = np.full(self.dim, 0.5)
        for j, n in enumerate(self.names):
            if n in params:
                u[j] = self._params[n].to_unit(params[n])
        active = self.active_mask(u)
        if key is not None:
            if len(self._encoded) >= 100_000:
                self._encoded.clear()
            self._encoded[key] = (u.copy(), active.copy())
        return u, active

    def decode(self, u: np.ndarray) -> dict[str, Any]:
        """Decodes unit-cube coordinates ``(D,)`` to a dict of the active parameters."""
        u = np.asarray(u, float)
        if u.shape != (self.dim,):
            raise ValueError(f"u has shape {u.shape}; expected ({self.dim},)")
        active = self.active_mask(u)
        return {n: self._params[n].from_unit(u[j]) for j, n in enumerate(self.names) if active[j]}

    def is_active(self, name: str, params: Mapping[str, Any]) -> bool:
        """Whether ``name`` is active given the (partial) values of its ancestors."""
        p = self._params[name]
        for parent, values in p.when:
            if parent not in params or not self.is_active(parent, params):
                return False
            par = self._params[parent]
            got = params[parent]
            if isinstance(par, Categorical):
                if json.dumps(got) not in {json.dumps(v) for v in values}:
                    return False
            elif got not in values:
                return False
        return True

    def validate(self, params: Mapping[str, Any]) -> None:
        """Checks that ``params`` holds exactly the active parameters with valid values.

        Raises:
          ValueError: Naming the first missing, unknown, inactive or out-of-range parameter.
        """
        unknown = set(params) - set(self.names)
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; the space has {list(self.names)}")
        for n in self.names:
            active = self.is_active(n, params)
            if active and n not in params:
                raise ValueError(f"parameter {n!r} is active but missing from {dict(params)!r}")
            if not active and n in params:
                raise ValueError(
                    f"parameter {n!r} is inactive (its condition {dict(self._params[n].when)!r} "
                    f"does not hold) but was given; drop it"
                )
            if active:
                self._params[n].to_unit(params[n])  # raises on a bad value

    def sample(self, rng: np.random.Generator, n: int = 1) -> list[dict[str, Any]]:
        """Draws ``n`` configurations uniformly (log-uniformly for log parameters)."""
        u = rng.random((n, self.dim))
        return [self.decode(row) for row in u]
