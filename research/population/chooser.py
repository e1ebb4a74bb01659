"""The chunk size K of a population, measured before anything trains.

:func:`choose_k` times one compiled step at K=1 and at powers of two up to the population size
(stopping once a larger K is clearly slower per trial, or would not fit in memory) and picks the K with the
most trials per second over the whole population (the last chunk is padded, so a K that leaves a
mostly empty last chunk pays for it). K=1 means vmap does not pay (e.g. convolutions on a CPU,
which vmap lowers to grouped convolutions): the trials then run one after another.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One measured chunk size: seconds per step of a chunk, trial steps per second over the whole
    population (the last chunk padded to ``k``), and the bytes the compiled chunk needs."""

    k: int
    step_seconds: float
    trial_steps_per_s: float
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen chunk size and the figures it was chosen from (goes into the sweep/tune report).

    Attributes:
      k: trials per compiled program; 1 means run the trials one after another.
      candidates: every measured K, in order.
      reason: one sentence on why this K.
      memory_limit: the bytes a chunk may use.
    """

    k: int
    candidates: tuple[Candidate, ...]
    reason: str
    memory_limit: int

    @property
    def sequential(self) -> bool:
        return self.k == 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "reason": self.reason,
            "memory_limit": self.memory_limit,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def candidate_ks(n_trials: int, *, max_k: int | None = None, multiple_of: int = 1) -> list[int]:
    """Powers of two from 1 up to ``n_trials`` (and ``max_k``), multiples of ``multiple_of`` above 1.

    Example:
      >>> candidate_ks(20)
      [1, 2, 4, 8, 16]
    """
    if n_trials < 1:
        raise ValueError(f"n_trials={n_trials} must be >= 1")
    top = min(n_trials, max_k or n_trials)
    ks, k = [1], 2
    while k <= top:
        if k % multiple_of == 0:
            ks.append(k)
        k *= 2
    return ks


def choose_k(
    n_trials: int,
    measure: Callable[[int], tuple[float, int]],
    *,
    memory_limit: int,
    max_k: int | None = None,
    multiple_of: int = 1,
    stop_below: float = 0.8,
    confirm_rounds: int = 2,
) -> Choice:
    """Picks the chunk size with the most trials per second.

    Args:
      n_trials: trials in the population.
      measure: ``k -> (seconds per step of k trials, bytes the compiled chunk needs)``.
      memory_limit: bytes a chunk may use; a K whose measured (or, extrapolated from the smaller
        Ks, predicted) bytes exceed it is never chosen, and a predicted overflow is not compiled.
      max_k: the largest K to try.
      multiple_of: K above 1 must be a multiple of this (the device count when sharding).
      stop_below: stop trying larger K once one reaches less than this fraction of the best
        throughput so far (timings are noisy; a dip within it does not end the search).
      confirm_rounds: when a K > 1 wins, K=1 and it are timed again this many times, alternately,
        and each keeps its fastest time: on a loaded machine one lucky (or unlucky) timing of the
        search must not decide alone.

    Returns:
      The :class:`Choice`; ``k == 1`` when no K > 1 beats one trial at a time.

    Raises:
      MemoryError: even one trial does not fit in ``memory_limit``.
    """
    measured: list[Candidate] = []
    reason = ""
    for k in candidate_ks(n_trials, max_k=max_k, multiple_of=multiple_of):
        if len(measured) >= 2:
            a, b = measured[0], measured[-1]
            per_trial = (b.bytes - a.bytes) / max(b.k - a.k, 1)
            predicted = a.bytes + per_trial * (k - a.k)
            if predicted > memory_limit:
                reason = f"K={k} would need about {predicted:,.0f} bytes > the {memory_limit:,} available; not tried. "
                break
        seconds, nbytes = measure(k)
        if nbytes > memory_limit:
            if k == 1:
                raise MemoryError(
                    f"one trial's compiled step needs {nbytes:,} bytes > the {memory_limit:,} available; "
                    "use a smaller model or batch"
                )
            reason = f"K={k} needs {nbytes:,} bytes > the {memory_limit:,} available. "
            break
        chunks = math.ceil(n_trials / k)
        tps = n_trials / (chunks * seconds) if seconds > 0 else math.inf
        measured.append(Candidate(k=k, step_seconds=seconds, trial_steps_per_s=tps, bytes=nbytes))
        best_so_far = max(measured, key=lambda c: c.trial_steps_per_s)
        if len(measured) >= 2 and tps < stop_below * best_so_far.trial_steps_per_s:
            reason += f"K={k} is slower per trial than K={best_so_far.k}; larger K not tried. "
            break
    best = max(measured, key=lambda c: c.trial_steps_per_s)
    if best.k > 1 and confirm_rounds > 0:
        one, times = measured[0], {1: measured[0].step_seconds, best.k: best.step_seconds}
        for _ in range(confirm_rounds):
            for k in (1, best.k):
                times[k] = min(times[k], measure(k)[0])
        chunks = math.ceil(n_trials / best.k)
        confirmed = {
            1: dataclasses.replace(one, step_seconds=times[1], trial_steps_per_s=n_trials / (n_trials * times[1])),
            best.k: dataclasses.replace(
                best, step_seconds=times[best.k], trial_steps_per_s=n_trials / (chunks * times[best.k])
            ),
        }
        measured = [confirmed.get(c.k, c) for c in measured]
        best = max(confirmed.values(), key=lambda c: c.trial_steps_per_s)
        reason += f"confirmed against K=1 over {confirm_rounds} more alternating timings. "
    one = measured[0]
    if best.k == 1:
        reason += "vmap does not pay here (no K > 1 beats one trial at a time): trials train one after another."
    else:
        reason += (
            f"K={best.k}: {best.trial_steps_per_s / one.trial_steps_per_s:.2f}x the trial steps per second of K=1."
        )
    return Choice(k=best.k, candidates=tuple(measured), reason=reason.strip(), memory_limit=memory_limit)
