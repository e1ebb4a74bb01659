"""Multi-objective search over a family's space on a trained supernet.

Objectives: validation accuracy of the sub-network inside the supernet (BatchNorm recalibrated),
FLOPs of the extracted member (``research.metrics.flops``, XLA cost analysis) and its bytes
(float32 parameters). A :class:`research.automl.Study` (TPE, GP or random) asks a batch of K
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
    """

    options: dict[str, Any]
    accuracy: float
    flops: float
    bytes: float
    params: int


class CostModel:
    """FLOPs and bytes of family members, measured once per architecture on the extracted model."""

    def __init__(self, net: Supernet):
        self.net = net
        self._cache: dict[tuple, tuple[float, float, int]] = {}
        self._sample = jnp.zeros((1, *net.input_shape), jnp.float32)

    def __call__(self, options: Mapping[str, Any]) -> tuple[float, float, int]:
        """``(flops, bytes, params)`` of member ``options``."""
        key = self.net.family.key(options)
        if key not in self._cache:
            member = extract(self.net, options)
            n = metrics.count_params(member)
            self._cache[key] = (metrics.flops(member, self._sample), float(metrics.model_bytes(member)), n)
        return self._cache[key]


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
) -> list[Candidate]:
    """Searches the family of ``net`` for sub-networks trading accuracy against FLOPs and bytes.

    The largest and smallest members are always evaluated first (they bound the front).

    Args:
      net: the trained supernet.
      x_val, y_val: validation data (never test data).
      calib_x: ``(num_batches, batch, ...)`` training inputs for per-sub-network BN recalibration.
      trials: sub-networks to evaluate (at least 2).
      batch: sub-networks asked and evaluated together (the vmapped K).
      sampler: a ``research.automl`` sampler name (``tpe``, ``gp``, ``random``, ``sobol``, ``evolution``, ...).
      seed: the sampler's seed.

    Returns:
      Every evaluated candidate, in evaluation order (duplicates of an architecture evaluated once).

    Raises:
      ValueError: ``trials < 2`` or ``batch < 1``.
    """
    if trials < 2 or batch < 1:
        raise ValueError(f"trials={trials} must be >= 2 and batch={batch} >= 1")
    fam = net.family
    study = Study(
        fam.get_space(prefix=""),
        sampler=make_sampler(sampler, seed=seed),
        direction=["maximize", "minimize", "minimize"],
    )
    evaluator = make_evaluator(net, calibrate=calib_x is not None)
    cost = CostModel(net)
    seen: dict[tuple, Candidate] = {}
    out: list[Candidate] = []
    first = [fam.largest(), fam.smallest()]
    while len(out) < trials:
        asked = study.ask(min(batch, trials - len(out)))
        options = [fam.from_params(t.params, prefix="") for t in asked]
        if first:
            options[: len(first)] = first[: len(options)]
            first = first[len(options) :]
        new = [o for o in options if fam.key(o) not in seen]
        if new:
            acc, _ = evaluate_subnets(net, stack_masks(net, new), x_val, y_val, calib_x=calib_x, evaluator=evaluator)
            for o, a in zip(new, acc, strict=True):
                flops, nbytes, n = cost(o)
                c = Candidate(fam.canonical(o), float(a), flops, nbytes, n)
                seen[fam.key(o)] = c
                out.append(c)
        for t, o in zip(asked, options, strict=True):
            c = seen[fam.key(o)]
            study.tell(t, [c.accuracy, c.flops, c.bytes])
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
