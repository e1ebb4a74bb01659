"""Multi-objective search over a family's space on a trained supernet.

Objectives: validation accuracy of the sub-network inside the supernet (BatchNorm recalibrated),
FLOPs of the extracted member (``research.metrics.flops``, XLA cost analysis), its bytes
(float32 parameters) and, optionally, its measured latency (:class:`CostModel`'s
``latency_runtime``: the jitted member or its exported TFLite file). A ``max_flops`` constraint
restricts the search to members no costlier than a given model. A :class:`research.automl.Study` (TPE, GP or random) asks a batch of K
configurations at a time; the K sub-networks are evaluated as one vmapped program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from methods.nas.evaluate import evaluate_subnets
from methods.nas.evaluate import make_evaluator
from methods.nas.supernet import Supernet
from methods.nas.supernet import extract
from methods.nas.supernet import stack_masks
from research import metrics
from research.automl import Study
from research.automl import make_sampler
from research.automl.samplers import nondominated_rank


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated sub-network.

    Attributes:
      options: its canonical family options.
      accuracy: validation accuracy inside the supernet.
      flops: FLOPs of one forward pass of the extracted member on one example.
      bytes: float32 bytes of its parameters.
      params: its parameter count.
      latency: measured milliseconds per call of the extracted member in the search's latency
        runtime (``None`` when the search has no latency objective).
    """

    options: dict[str, Any]
    accuracy: float
    flops: float
    bytes: float
    params: int
    latency: float | None = None


class CostModel:
    """FLOPs, bytes and (optionally) measured latency of family members, once per architecture.

    Args:
      net: the supernet.
      latency_runtime: ``None`` (no latency), ``"jax"`` (the jitted member) or an export runtime of
        :func:`research.export.latency.runtimes` (``"tflite"``: the member is exported to a
        ``.tflite`` file and timed on the LiteRT interpreter, about ten seconds per member on a
        CPU because of the converter).
      latency_batch: inputs per timed call.
      latency_threads: runtime threads.
      latency_repeats: timed calls per member (the median is kept).
    """

    def __init__(
        self,
        net: Supernet,
        *,
        latency_runtime: str | None = None,
        latency_batch: int = 1,
        latency_threads: int = 1,
        latency_repeats: int = 30,
    ):
        if latency_runtime is not None:
            from research.export.latency import runtimes  # noqa: PLC0415 (TensorFlow only when timing)

            if latency_runtime not in runtimes():
                raise ValueError(f"latency_runtime={latency_runtime!r}; choose None or one of {runtimes()}")
        self.net = net
        self.latency_runtime = latency_runtime
        self.latency_batch, self.latency_threads, self.latency_repeats = latency_batch, latency_threads, latency_repeats
        self._cache: dict[tuple, tuple[float, float, int]] = {}
        self._latency: dict[tuple, float] = {}
        self._sample = jnp.zeros((1, *net.input_shape), jnp.float32)

    def __call__(self, options: Mapping[str, Any]) -> tuple[float, float, int]:
        """``(flops, bytes, params)`` of member ``options``."""
        key = self.net.family.key(options)
        if key not in self._cache:
            member = extract(self.net, options)
            n = metrics.count_params(member)
            self._cache[key] = (metrics.flops(member, self._sample), float(metrics.model_bytes(member)), n)
        return self._cache[key]

    def latency(self, options: Mapping[str, Any]) -> float | None:
        """Measured milliseconds per call of member ``options`` (``None`` without a latency runtime)."""
        if self.latency_runtime is None:
            return None
        key = self.net.family.key(options)
        if key not in self._latency:
            from research.export.latency import artifact_latency  # noqa: PLC0415

            self._latency[key] = artifact_latency(
                extract(self.net, options),
                self.latency_runtime,
                sample=np.zeros((1, *self.net.input_shape), np.float32),
                batch=self.latency_batch,
                threads=self.latency_threads,
                repeats=self.latency_repeats,
            )
        return self._latency[key]


def search(
    net: Supernet,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    calib_x: np.ndarray | None = None,
    trials: int = 64,
    batch: int = 16,
    sampler: str = "tpe",
    seed: int = 0,
    max_flops: float | None = None,
    cost: CostModel | None = None,
) -> list[Candidate]:
    """Searches the family of ``net`` for sub-networks trading accuracy against FLOPs and bytes
    (and measured latency when ``cost`` has a latency runtime).

    The largest and smallest members are always evaluated first (they bound the front), unless
    ``max_flops`` excludes them.

    Args:
      net: the trained supernet.
      x_val, y_val: validation data (never test data).
      calib_x: ``(num_batches, batch, ...)`` training inputs for per-sub-network BN recalibration.
      trials: sub-networks to evaluate (at least 2).
      batch: sub-networks asked and evaluated together (the vmapped K).
      sampler: a ``research.automl`` sampler name (``tpe``, ``gp``, ``random``, ``sobol``, ``evolution``, ...).
      seed: the sampler's seed.
      max_flops: a constraint: members with more FLOPs are not evaluated (the sampler is told
        accuracy 0 for them, so it learns to avoid them) and not returned. ``None``: no limit.
      cost: the :class:`CostModel` to use (default: FLOPs and bytes, no latency); one with
        ``latency_runtime`` adds the measured latency as a fourth objective (minimised).

    Returns:
      Every evaluated candidate within ``max_flops``, in evaluation order (duplicates of an
      architecture evaluated once). Fewer than ``trials`` when the family has fewer members within
      ``max_flops``, or when ``20 * trials`` asked configurations did not yield ``trials``.

    Raises:
      ValueError: ``trials < 2``, ``batch < 1`` or ``max_flops <= 0``.
    """
    if trials < 2 or batch < 1:
        raise ValueError(f"trials={trials} must be >= 2 and batch={batch} >= 1")
    if max_flops is not None and max_flops <= 0:
        raise ValueError(f"max_flops={max_flops} must be positive (or None for no limit)")
    fam = net.family
    cost = cost or CostModel(net)
    timed = cost.latency_runtime is not None
    study = Study(
        fam.get_space(prefix=""),
        sampler=make_sampler(sampler, seed=seed),
        direction=["maximize", "minimize", "minimize"] + (["minimize"] if timed else []),
    )
    evaluator = make_evaluator(net, calibrate=calib_x is not None)
    feasible = lambda o: max_flops is None or cost(o)[0] <= max_flops  # noqa: E731
    seen: dict[tuple, Candidate | None] = {}  # None: over max_flops
    out: list[Candidate] = []
    first = [o for o in (fam.largest(), fam.smallest()) if feasible(o)]
    asked_total = 0
    while len(out) < trials and asked_total < 20 * trials:
        asked = study.ask(min(batch, trials - len(out)))
        asked_total += len(asked)
        options = [fam.from_params(t.params, prefix="") for t in asked]
        if first:
            options[: len(first)] = first[: len(options)]
            first = first[len(options) :]
        new = []
        for o in options:
            if fam.key(o) not in seen and not any(fam.key(o) == fam.key(n) for n in new):
                if feasible(o):
                    new.append(o)
                else:
                    seen[fam.key(o)] = None
        if new:
            acc, _ = evaluate_subnets(net, stack_masks(net, new), x_val, y_val, calib_x=calib_x, evaluator=evaluator)
            for o, a in zip(new, acc, strict=True):
                flops, nbytes, n = cost(o)
                c = Candidate(fam.canonical(o), float(a), flops, nbytes, n, cost.latency(o))
                seen[fam.key(o)] = c
                out.append(c)
        for t, o in zip(asked, options, strict=True):
            c = seen[fam.key(o)]
            flops, nbytes, _ = cost(o)
            values = [0.0 if c is None else c.accuracy, flops, nbytes]
            if timed:  # an infeasible member is not timed: it gets the slowest latency seen so far
                values.append(max((x.latency for x in out), default=1.0) if c is None else c.latency)
            study.tell(t, values)
        if not new and len(seen) >= fam.size():
            break
    return out


def pareto_front(candidates: list[Candidate], objectives: tuple[str, ...] = ("accuracy", "flops")) -> list[int]:
    """Indices of the non-dominated candidates (accuracy maximised, the others minimised), by FLOPs."""
    losses = np.array(
        [[-getattr(c, k) if k == "accuracy" else getattr(c, k) for k in objectives] for c in candidates], float
    )
    rank = nondominated_rank(losses)
    front = [i for i in range(len(candidates)) if rank[i] == 0]
    return sorted(front, key=lambda i: candidates[i].flops)
