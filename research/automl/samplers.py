"""Sampler interface, registry, and the model-free samplers (random, Sobol).

A sampler proposes ``n`` configurations given the trials so far. It is stateless with
respect to randomness: the generator for a call is seeded from ``(seed, number of trials)``,
so a study reopened after a crash continues reproducibly.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

import research.names as _names
from research.automl.sobol import sobol_points
from research.automl.space import Space
from research.automl.trial import Trial
from research.automl.trial import TrialState
from research.registry import Registry

__all__ = [
    "Observations",
    "QMCSampler",
    "RandomSampler",
    "SAMPLERS",
    "Sampler",
    "list_samplers",
    "make_sampler",
    "observations",
    "register_sampler",
]

# Created (with the built-in names declared) in the standard-library research.names, so configs are checked before JAX.
SAMPLERS: Registry[type[Sampler]] = _names.SAMPLERS


def register_sampler(name: str) -> Callable[[type], type]:
    """Class decorator registering a sampler under ``name``.

    Registering the same class again (a re-run notebook cell) is a no-op.

    Raises:
      DuplicateNameError: If another class is registered as ``name`` (a ``ValueError``).
    """

    def deco(cls: type) -> type:
        SAMPLERS.register(name, cls)
        cls.registered_name = name
        return cls

    return deco


def make_sampler(name: str, **kwargs: Any) -> Sampler:
    """Builds the sampler registered as ``name`` with ``kwargs``.

    Raises:
      UnknownNameError: Naming the closest and all registered samplers (a ``KeyError``).
    """
    return SAMPLERS.get(name)(**kwargs)


def list_samplers() -> list[str]:
    """Names of the registered samplers."""
    return SAMPLERS.names()


@dataclasses.dataclass(frozen=True)
class Observations:
    """Finished evaluations and pending points, encoded.

    Attributes:
      u: Unit-cube coordinates of evaluated points ``(n, D)``.
      active: Activity mask ``(n, D)``.
      losses: Losses to minimise ``(n, m)`` (maximised objectives are negated).
      numbers: Trial numbers ``(n,)`` (age, for TPE's weights).
      pending_u: Points asked but not told ``(k, D)``.
      pending_active: Their activity ``(k, D)``.
      budget: The budget the losses were measured at (``None`` without a scheduler).
    """

    u: np.ndarray
    active: np.ndarray
    losses: np.ndarray
    numbers: np.ndarray
    pending_u: np.ndarray
    pending_active: np.ndarray
    budget: float | None = None

    @property
    def n(self) -> int:
        return self.u.shape[0]


def observations(space: Space, trials: Sequence[Trial], directions: Sequence[str], min_points: int = 1) -> Observations:
    """Collects what a model-based sampler learns from.

    Failed and pruned-without-value trials never enter. With multi-fidelity trials (values
    per budget), the losses are those at the largest budget with at least ``min_points``
    finite results, as in BOHB (or the smallest budget when none has that many).

    Args:
      space: The search space.
      trials: All trials of the study.
      directions: ``"minimize"``/``"maximize"`` per objective.
      min_points: Points a budget needs to be used.

    Returns:
      The encoded :class:`Observations`.
    """
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    m = len(directions)
    d = space.dim
    multi_fidelity = any(t.intermediate for t in trials)
    rows: list[tuple[Trial, tuple[float, ...]]] = []
    budget = None
    if multi_fidelity:
        per_budget: dict[float, list[tuple[Trial, tuple[float, ...]]]] = {}
        for t in trials:
            if t.state == TrialState.FAILED:
                continue
            for b, v in t.intermediate.items():
                if v is not None and math.isfinite(v):
                    per_budget.setdefault(float(b), []).append((t, (v,)))
        if per_budget:
            ok = [b for b, r in per_budget.items() if len(r) >= min_points]
            budget = max(ok) if ok else min(per_budget)
            rows = per_budget[budget]
    else:
        rows = [
            (t, t.values)
            for t in trials
            if t.state == TrialState.COMPLETE and t.values is not None and all(math.isfinite(v) for v in t.values)
        ]
    u = np.zeros((len(rows), d))
    act = np.zeros((len(rows), d), bool)
    losses = np.zeros((len(rows), m))
    numbers = np.zeros(len(rows), np.int64)
    for i, (t, vals) in enumerate(rows):
        u[i], act[i] = space.encode(t.params)
        losses[i] = sign * np.asarray(vals, float)
        numbers[i] = t.number
    pend = [t for t in trials if t.state == TrialState.RUNNING and t.attrs.get("rung", 0) == 0]
    pu = np.zeros((len(pend), d))
    pa = np.zeros((len(pend), d), bool)
    for i, t in enumerate(pend):
        pu[i], pa[i] = space.encode(t.params)
    return Observations(u, act, losses, numbers, pu, pa, budget)


class Sampler(abc.ABC):
    """Proposes configurations.

    Subclasses implement :meth:`sample_unit`, returning unit-cube points; decoding and
    validation are shared.

    Args:
      seed: Seed of every random choice the sampler makes.
    """

    registered_name: str = ""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def rng(self, trials: Sequence[Trial]) -> np.random.Generator:
        """Generator for one call, seeded by ``(seed, number of trials)``."""
        return np.random.default_rng([self.seed, len(trials)])

    @abc.abstractmethod
    def sample_unit(self, space: Space, trials: Sequence[Trial], directions: Sequence[str], n: int) -> np.ndarray:
        """Returns ``(n, D)`` unit-cube points (inactive coordinates are ignored)."""

    def sample(
        self, space: Space, trials: Sequence[Trial], directions: Sequence[str], n: int = 1
    ) -> list[dict[str, Any]]:
        """Proposes ``n`` configurations (dicts of the active parameters)."""
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        u = np.asarray(self.sample_unit(space, trials, directions, n), float)
        if u.shape != (n, space.dim):
            raise RuntimeError(f"{type(self).__name__} returned shape {u.shape}, not {(n, space.dim)}")
        return [space.decode(row) for row in space.snap(u)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


@register_sampler("random")
class RandomSampler(Sampler):
    """Independent uniform (log-uniform for log parameters) sampling.

    Example:
      >>> from research.automl.space import Float, Space
      >>> RandomSampler(seed=0).sample(Space({"x": Float(0, 1)}), [], ["minimize"], 2)[0].keys()
      dict_keys(['x'])
    """

    def sample_unit(self, space, trials, directions, n):
        return self.rng(trials).random((n, space.dim))


@register_sampler("qmc")
class QMCSampler(Sampler):
    """Scrambled Sobol points: trial ``k`` gets point ``k`` of the sequence.

    Sobol points fill the cube more evenly than random ones; the sequence is balanced
    at powers of two, so budgets like 16, 32, 64 use it best.

    Args:
      seed: Seed of the scramble.
      scramble: Randomise the sequence (linear matrix scramble and digital shift).
    """

    def __init__(self, seed: int = 0, scramble: bool = True):
        super().__init__(seed)
        self.scramble = scramble

    def sample_unit(self, space, trials, directions, n):
        start = len(trials)
        return sobol_points(np.arange(start, start + n), space.dim, scramble=self.scramble, seed=self.seed)


# "sobol" is the name `slimjax tune --sampler` and NASStage.sampler gave the QMC sampler.
SAMPLERS.register("sobol", QMCSampler)


def nondominated_rank(losses: np.ndarray) -> np.ndarray:
    """Pareto rank of each row of ``losses`` ``(n, m)`` (0 = non-dominated; minimisation)."""
    n = losses.shape[0]
    le = np.all(losses[:, None, :] <= losses[None, :, :], axis=-1)
    lt = np.any(losses[:, None, :] < losses[None, :, :], axis=-1)
    dominates = le & lt  # dominates[i, j]: i dominates j
    rank = np.full(n, -1)
    remaining = np.ones(n, bool)
    r = 0
    while remaining.any():
        dominated = np.any(dominates[remaining][:, remaining], axis=0)
        front = np.flatnonzero(remaining)[~dominated]
        rank[front] = r
        remaining[front] = False
        r += 1
    return rank


def scalarize(losses: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ParEGO's augmented Chebyshev scalarisation with random weights.

    References:
      Knowles (2006), ParEGO: a hybrid algorithm with on-line landscape approximation for
      expensive multiobjective optimization problems. https://doi.org/10.1109/TEVC.2005.851274
    """
    if losses.shape[1] == 1:
        return losses[:, 0]
    lo, hi = losses.min(0), losses.max(0)
    z = (losses - lo) / np.where(hi > lo, hi - lo, 1.0)
    w = rng.dirichlet(np.ones(losses.shape[1]))
    return np.max(w * z, axis=1) + 0.05 * np.sum(w * z, axis=1)
