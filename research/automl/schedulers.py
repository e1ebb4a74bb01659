"""Multi-fidelity schedulers: successive halving, Hyperband and ASHA.

A scheduler decides which configuration runs at which budget (steps, epochs, data
fraction...). It is a pure function of the trials stored so far: every decision is
recomputed from the trials' ``bracket``/``rung`` attributes and their values per budget,
so a study reopened after a crash continues exactly where it stopped.

The objective of a study with a scheduler is ``objective(params, budget) -> float``;
a promoted trial is evaluated again at a larger budget (resume it from a checkpoint
keyed by ``trial.id`` to save work).

References:
  Jamieson and Talwalkar (2016), Non-stochastic best arm identification and
  hyperparameter optimization (successive halving). https://arxiv.org/abs/1502.07943
  Li et al. (2018), Hyperband: a novel bandit-based approach to hyperparameter
  optimization. https://arxiv.org/abs/1603.06560
  Li et al. (2020), A system for massively parallel hyperparameter tuning (ASHA).
  https://arxiv.org/abs/1810.05934
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from research.automl.trial import Trial
from research.automl.trial import TrialState

__all__ = ["ASHA", "Hyperband", "Job", "Scheduler", "SuccessiveHalving"]


@dataclasses.dataclass(frozen=True)
class Job:
    """One evaluation to run: a new configuration (``trial_id=None``) or a promotion.

    Attributes:
      trial_id: The trial to promote, or ``None`` for a new configuration.
      budget: The budget to evaluate at.
      attrs: Attributes written with the job (``bracket``, ``rung``).
      from_rung: For a promotion, the rung the trial must still be ``PAUSED`` at; the
        promotion is claimed atomically in the store (``Storage.transition``), so when
        several workers plan the same promotion only one evaluates it.
      cap: For a new configuration, ``(attr, value, n)``: create it only while fewer than
        ``n`` trials have ``attrs[attr] == value`` (a Hyperband bracket's size).
    """

    trial_id: int | None
    budget: float
    attrs: dict[str, Any]
    from_rung: int | None = None
    cap: tuple[str, Any, int] | None = None


def _value_at(t: Trial, budget: float) -> float | None:
    for b, v in t.intermediate.items():
        if math.isclose(float(b), budget, rel_tol=1e-9, abs_tol=1e-12):
            return v if v is not None and math.isfinite(v) else math.inf
    if t.state == TrialState.FAILED and t.budget is not None and math.isclose(t.budget, budget):
        return math.inf
    return None


def _rank_key(t: Trial, budget: float):
    v = _value_at(t, budget)
    return (math.inf if v is None else v, t.number)


class Scheduler(abc.ABC):
    """Decides the next evaluations from the trials so far.

    Args:
      min_budget: Smallest budget a configuration is evaluated at.
      max_budget: Full budget; a trial told at it is ``COMPLETE``.
      eta: Keep the best ``1/eta`` at each rung.

    Raises:
      ValueError: On ``min_budget <= 0``, ``max_budget < min_budget`` or ``eta < 2``.
    """

    def __init__(self, min_budget: float, max_budget: float, eta: float = 3):
        if min_budget <= 0:
            raise ValueError(f"min_budget={min_budget} must be > 0")
        if max_budget < min_budget:
            raise ValueError(f"max_budget={max_budget} must be >= min_budget={min_budget}")
        if eta < 2:
            raise ValueError(f"eta={eta} must be >= 2 (it is the halving factor)")
        self.min_budget = float(min_budget)
        self.max_budget = float(max_budget)
        self.eta = eta
        self.s_max = int(math.floor(math.log(max_budget / min_budget) / math.log(eta) + 1e-9))

    def budget(self, s: int, i: int) -> float:
        """Budget of rung ``i`` in a bracket with ``s + 1`` rungs (the last is ``max_budget``)."""
        return self.max_budget * self.eta ** (i - s)

    @abc.abstractmethod
    def plan(self, trials: Sequence[Trial], n: int) -> tuple[list[Job], list[int]]:
        """Returns up to ``n`` jobs and the ids of trials to mark ``PRUNED``."""

    def state_after(self, budget: float) -> TrialState:
        """State of a trial told (with a finite value) at ``budget``."""
        if budget >= self.max_budget * (1 - 1e-9):
            return TrialState.COMPLETE
        return TrialState.PAUSED

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_budget={self.min_budget}, max_budget={self.max_budget}, eta={self.eta})"


class Hyperband(Scheduler):
    """Hyperband: brackets of synchronous successive halving with different aggressiveness.

    Bracket ``s`` starts ``ceil((s_max + 1) / (s + 1) * eta**s)`` configurations at budget
    ``max_budget * eta**-s`` and keeps the best ``1/eta`` at every rung. Brackets cycle
    ``s_max, s_max - 1, ..., 0`` and several run at once when workers would otherwise wait.
    With a :class:`~research.automl.tpe.BOHBSampler` this is BOHB.

    Example:
      >>> hb = Hyperband(min_budget=1, max_budget=9, eta=3)
      >>> [j.budget for j in hb.plan([], 3)[0]]
      [1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        min_budget: float,
        max_budget: float,
        eta: float = 3,
        brackets: Sequence[int] | None = None,
    ):
        super().__init__(min_budget, max_budget, eta)
        self.brackets = list(range(self.s_max, -1, -1)) if brackets is None else [int(s) for s in brackets]
        for s in self.brackets:
            if not 0 <= s <= self.s_max:
                raise ValueError(f"bracket s={s} is outside 0..{self.s_max}")

    def n_configs(self, s: int, i: int = 0) -> int:
        """Configurations in rung ``i`` of bracket ``s``."""
        n0 = int(math.ceil((self.s_max + 1) / (s + 1) * self.eta**s))
        return max(int(math.floor(n0 * self.eta ** (-i))), 1)

    def plan(self, trials, n):
        by_bracket: dict[int, list[Trial]] = {}
        for t in trials:
            if "bracket" in t.attrs:
                by_bracket.setdefault(int(t.attrs["bracket"]), []).append(t)
        jobs: list[Job] = []
        prunes: list[int] = []
        k = 0
        while len(jobs) < n:
            s = self.brackets[k % len(self.brackets)]
            members = by_bracket.get(k, [])
            # Promotions, top rung first.
            for i in range(s - 1, -1, -1):
                if len(jobs) >= n:
                    break
                r_i = self.budget(s, i)
                rung = [t for t in members if int(t.attrs.get("rung", 0)) >= i]
                if len(rung) < self.n_configs(s, i):
                    continue
                if any(_value_at(t, r_i) is None for t in rung):
                    continue  # rung still running
                ranked = sorted(rung, key=lambda t: _rank_key(t, r_i))
                keep = ranked[: self.n_configs(s, i + 1)]
                keep_ids = {t.id for t in keep}
                for t in rung:
                    if int(t.attrs.get("rung", 0)) != i or t.state != TrialState.PAUSED:
                        continue
                    if t.id in keep_ids and _value_at(t, r_i) != math.inf:
                        if len(jobs) < n:
                            jobs.append(Job(t.id, self.budget(s, i + 1), {"bracket": k, "rung": i + 1}, from_rung=i))
                    else:
                        prunes.append(t.id)
            # New configurations in rung 0.
            missing = self.n_configs(s, 0) - len(members)
            while missing > 0 and len(jobs) < n:
                jobs.append(
                    Job(None, self.budget(s, 0), {"bracket": k, "rung": 0}, cap=("bracket", k, self.n_configs(s, 0)))
                )
                missing -= 1
            k += 1
        return jobs, prunes


class SuccessiveHalving(Hyperband):
    """Successive halving: Hyperband's most aggressive bracket, repeated.

    Each round starts ``eta**s_max``-ish configurations at ``min_budget`` and keeps the best
    ``1/eta`` at each rung up to ``max_budget``.
    """

    def __init__(self, min_budget: float, max_budget: float, eta: float = 3):
        super().__init__(min_budget, max_budget, eta)
        self.brackets = [self.s_max]


class ASHA(Scheduler):
    """Asynchronous successive halving: promote as soon as a configuration is in the top ``1/eta``.

    Workers never wait for a rung to fill: a job is a promotion when some configuration at
    rung ``i`` is in the best ``1/eta`` of rung ``i``'s results and was not promoted yet
    (top rungs first), else a new configuration at ``min_budget``. Configurations left
    behind stay ``PAUSED`` (they may still be promoted later).
    """

    def __init__(self, min_budget: float, max_budget: float, eta: float = 3):
        super().__init__(min_budget, max_budget, eta)

    def plan(self, trials, n):
        s = self.s_max
        jobs: list[Job] = []
        taken: set[int] = set()
        while len(jobs) < n:
            job = None
            for i in range(s - 1, -1, -1):
                r_i = self.budget(s, i)
                done = [t for t in trials if _value_at(t, r_i) is not None]
                done.sort(key=lambda t: _rank_key(t, r_i))
                for t in done[: len(done) // int(self.eta)]:
                    if (
                        t.state == TrialState.PAUSED
                        and int(t.attrs.get("rung", 0)) == i
                        and t.id not in taken
                        and _value_at(t, r_i) != math.inf
                    ):
                        job = Job(t.id, self.budget(s, i + 1), {"bracket": 0, "rung": i + 1}, from_rung=i)
                        taken.add(t.id)
                        break
                if job is not None:
                    break
            jobs.append(job or Job(None, self.budget(s, 0), {"bracket": 0, "rung": 0}))
        return jobs, []
