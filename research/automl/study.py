"""Study: ask/tell optimisation over a :class:`~research.automl.space.Space`.

Example:
  >>> from research.automl.space import Float, Space
  >>> from research.automl.samplers import RandomSampler
  >>> study = Study(Space({"x": Float(-1.0, 1.0)}), sampler=RandomSampler(seed=0))
  >>> (trial,) = study.ask()
  >>> _ = study.tell(trial, trial.params["x"] ** 2)
  >>> study.best_trial.number
  0

Integration contract for training code: pass ``objective(params: dict) -> float`` (or a
sequence of floats for several objectives), or ``objective(params: dict, budget: float)
-> float`` when the study has a scheduler; raise or return NaN to mark a failed trial.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from research.automl.samplers import Sampler
from research.automl.samplers import nondominated_rank
from research.automl.schedulers import Scheduler
from research.automl.space import Space
from research.automl.storage import Storage
from research.automl.storage import make_storage
from research.automl.trial import Trial
from research.automl.trial import TrialState

__all__ = ["Study"]

_log = logging.getLogger(__name__)
_DIRECTIONS = ("minimize", "maximize")
_MAX_REPLANS = 1000


def _to_values(value: Any, m: int) -> tuple[float, ...] | None:
    """Converts an objective's return value to a tuple of ``m`` floats (None if not finite)."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.size != m:
        raise ValueError(
            f"the objective returned {arr.size} value(s) but the study has {m} objective(s); "
            "return one float per direction"
        )
    if not np.all(np.isfinite(arr)):
        return None
    return tuple(float(v) for v in arr)


class Study:
    """An optimisation run: a space, a sampler, directions, a store, optionally a scheduler.

    Args:
      space: The search space.
      sampler: Proposes configurations (default: :class:`~research.automl.tpe.TPESampler`).
      direction: ``"minimize"``, ``"maximize"``, or a list of them for several objectives.
      storage: ``None`` (in memory), ``"sqlite:///path.db"`` or a
        :class:`~research.automl.storage.Storage`.
      name: Study name inside the storage (reopening uses it); random if ``None``.
      scheduler: Multi-fidelity scheduler (single objective only); the objective then
        takes ``(params, budget)``.
      load_if_exists: Reopen a stored study of the same name (it must have the same space
        and directions).

    Raises:
      ValueError: On a bad direction, a scheduler with several objectives, or a stored study
        that does not match.
    """

    def __init__(
        self,
        space: Space,
        sampler: Sampler | None = None,
        direction: str | Sequence[str] = "minimize",
        storage: str | Storage | None = None,
        name: str | None = None,
        scheduler: Scheduler | None = None,
        load_if_exists: bool = True,
    ):
        if not isinstance(space, Space):
            raise TypeError(f"space is a {type(space).__name__}; wrap the dict in Space({{...}})")
        directions = [direction] if isinstance(direction, str) else list(direction)
        if not directions:
            raise ValueError("direction=[] names no objective; pass 'minimize' or 'maximize'")
        for d in directions:
            if d not in _DIRECTIONS:
                raise ValueError(f"direction {d!r} is not one of {_DIRECTIONS}")
        if scheduler is not None and len(directions) > 1:
            raise ValueError(f"a scheduler needs one objective; this study has {len(directions)} directions")
        if sampler is None:
            from research.automl.tpe import TPESampler  # pylint: disable=import-outside-toplevel

            sampler = TPESampler()
        self.space = space
        self.sampler = sampler
        self.scheduler = scheduler
        self.directions = tuple(directions)
        self.name = name or f"study-{uuid.uuid4().hex[:8]}"
        self._storage = make_storage(storage)
        self._id = self._storage.create_study(self.name, self.directions, space.to_dict(), load_if_exists)

    # ------------------------------------------------------------------ state
    @property
    def trials(self) -> list[Trial]:
        """All trials, ordered by number."""
        return self._storage.get_trials(self._id)

    def trials_in(self, *states: TrialState) -> list[Trial]:
        """The trials in any of ``states``."""
        return [t for t in self.trials if t.state in states]

    @property
    def pending_trials(self) -> list[Trial]:
        """Trials asked but not told (``RUNNING``), e.g. those a crashed worker held."""
        return self.trials_in(TrialState.RUNNING)

    @property
    def best_trial(self) -> Trial:
        """The complete trial with the best value (single objective).

        Raises:
          ValueError: With several objectives (use :meth:`pareto_front`) or no complete trial.
        """
        if len(self.directions) != 1:
            raise ValueError(
                f"best_trial needs one objective; this study has {len(self.directions)}; use study.pareto_front()"
            )
        done = self.trials_in(TrialState.COMPLETE)
        if not done:
            raise ValueError(f"study {self.name!r} has no complete trial yet; tell one first")
        sign = 1.0 if self.directions[0] == "minimize" else -1.0
        return min(done, key=lambda t: (sign * t.values[0], t.number))

    @property
    def best_value(self) -> float:
        """Value of :attr:`best_trial`."""
        return self.best_trial.values[0]

    @property
    def best_params(self) -> dict[str, Any]:
        """Parameters of :attr:`best_trial`."""
        return dict(self.best_trial.params)

    def pareto_front(self) -> list[Trial]:
        """Complete trials that no other complete trial dominates, ordered by number."""
        done = self.trials_in(TrialState.COMPLETE)
        if not done:
            return []
        sign = np.array([1.0 if d == "minimize" else -1.0 for d in self.directions])
        losses = np.array([t.values for t in done]) * sign
        rank = nondominated_rank(losses)
        return [t for t, r in zip(done, rank, strict=True) if r == 0]

    # ------------------------------------------------------------------ ask / tell
    def ask(self, n: int = 1) -> list[Trial]:
        """Proposes ``n`` trials (``RUNNING`` until told).

        With a scheduler, a returned trial may be an earlier configuration promoted to a
        larger ``trial.budget`` (same ``id`` and ``params``).
        """
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        trials = self.trials
        if self.scheduler is None:
            params = self.sampler.sample(self.space, trials, self.directions, n)
            return [self._storage.create_trial(self._id, p) for p in params]
        return self._ask_scheduled(trials, n)

    def _ask_scheduled(self, trials: list[Trial], n: int) -> list[Trial]:
        """Plans ``n`` jobs and claims each one in the store; re-plans the jobs another worker won.

        Several processes may share one SQLite study. Each promotion is claimed with an atomic
        ``PAUSED -> RUNNING`` transition that also checks the rung, and each new configuration
        of a capped bracket is created only while the bracket has room, so two workers never
        evaluate the same promotion or overfill a bracket; the loser plans again from the
        store's new state.
        """
        out: list[Trial] = []
        for _ in range(_MAX_REPLANS):
            jobs, prunes = self.scheduler.plan(trials, n - len(out))
            planned_from = {t.id: t for t in trials}
            for tid in prunes:  # only if still paused at the rung the plan saw
                seen = planned_from[tid].attrs
                expect = {"rung": seen["rung"]} if "rung" in seen else None
                self._storage.transition(tid, TrialState.PAUSED, TrialState.PRUNED, expect_attrs=expect)
            n_new = sum(j.trial_id is None for j in jobs)
            new_params = self.sampler.sample(self.space, trials, self.directions, n_new) if n_new else []
            for job in jobs:
                if job.trial_id is None:
                    t = self._storage.create_trial(
                        self._id, new_params.pop(0), budget=job.budget, attrs=job.attrs, cap=job.cap
                    )
                    if t is not None:
                        out.append(t)
                elif self._storage.transition(
                    job.trial_id,
                    TrialState.PAUSED,
                    TrialState.RUNNING,
                    expect_attrs=_rung_guard(planned_from.get(job.trial_id), job.from_rung),
                    budget=job.budget,
                    attrs=job.attrs,
                ):
                    out.append(self._storage.get_trial(job.trial_id))
            if len(out) == n:
                return out
            trials = self.trials  # another worker claimed some of the planned jobs
        raise RuntimeError(
            f"study {self.name!r}: could not claim {n - len(out)} job(s) after {_MAX_REPLANS} plans; "
            "other workers kept taking them (is the scheduler's plan stable?)"
        )

    def tell(
        self,
        trial: Trial | int,
        value: float | Sequence[float] | None = None,
        *,
        exception: BaseException | None = None,
    ) -> Trial:
        """Records the result of a trial.

        Args:
          trial: The trial (or its id) returned by :meth:`ask`.
          value: The objective value(s). ``None``, NaN or inf marks the trial ``FAILED``.
          exception: The error the objective raised; marks the trial ``FAILED``.

        Returns:
          The updated trial.

        Raises:
          ValueError: If the trial is not ``RUNNING`` or the number of values is wrong.
        """
        tid = trial if isinstance(trial, int) else trial.id
        current = self._storage.get_trial(tid)
        if current.state != TrialState.RUNNING:
            raise ValueError(
                f"trial {current.number} is {current.state.value}, not RUNNING; each asked trial is told once"
            )
        values = None if exception is not None else _to_values(value, len(self.directions))
        if values is None:
            reason = repr(exception) if exception is not None else f"objective returned {value!r}"
            inter = (current.budget, math.nan) if current.budget is not None else None
            self._storage.update_trial(tid, state=TrialState.FAILED, attrs={"error": reason}, intermediate=inter)
        elif self.scheduler is None:
            self._storage.update_trial(tid, state=TrialState.COMPLETE, values=values)
        else:
            state = self.scheduler.state_after(current.budget)
            self._storage.update_trial(
                tid,
                state=state,
                values=values if state == TrialState.COMPLETE else None,
                intermediate=(current.budget, values[0]),
            )
        return self._storage.get_trial(tid)

    # ------------------------------------------------------------------ loop
    def optimize(
        self,
        objective: Callable[..., Any],
        n_trials: int,
        batch_size: int = 1,
        *,
        catch: tuple[type[BaseException], ...] = (Exception,),
        callbacks: Iterable[Callable[[Study, Trial], None]] = (),
        show_progress_bar: bool | None = None,
        executor: Executor | None = None,
    ) -> None:
        """Runs ``n_trials`` evaluations, ``batch_size`` proposed at a time.

        Args:
          objective: ``objective(params)``, or ``objective(params, budget)`` with a scheduler
            (``n_trials`` then counts evaluations, promotions included).
          n_trials: Number of evaluations to run.
          batch_size: Configurations asked per round (diverse batches; see the samplers).
          catch: Exceptions that mark a trial failed instead of stopping the study.
          callbacks: ``callback(study, trial)`` after each tell.
          show_progress_bar: tqdm bar; ``None`` shows it on a terminal only.
          executor: Evaluates a batch concurrently (e.g. a ``ThreadPoolExecutor``).
        """
        if n_trials < 0 or batch_size < 1:
            raise ValueError(f"n_trials={n_trials} must be >= 0 and batch_size={batch_size} >= 1")
        bar = _progress(n_trials, show_progress_bar)
        done = 0
        try:
            while done < n_trials:
                batch = self.ask(min(batch_size, n_trials - done))

                def run(t: Trial):
                    try:
                        if self.scheduler is None:
                            return objective(dict(t.params)), None
                        return objective(dict(t.params), t.budget), None
                    except catch as e:  # noqa: PERF203
                        _log.warning("trial %d failed: %r", t.number, e)
                        return None, e

                results = list(executor.map(run, batch)) if executor else [run(t) for t in batch]
                for t, (value, err) in zip(batch, results, strict=True):
                    told = self.tell(t, value, exception=err)
                    for cb in callbacks:
                        cb(self, told)
                    done += 1
                    if bar is not None:
                        bar.update(1)
                        if len(self.directions) == 1:
                            try:
                                bar.set_postfix(best=f"{self.best_value:.6g}", refresh=False)
                            except ValueError:
                                pass
        finally:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        return (
            f"Study(name={self.name!r}, directions={list(self.directions)}, "
            f"sampler={self.sampler!r}, scheduler={self.scheduler!r})"
        )


def _rung_guard(seen: Trial | None, rung: int | None) -> dict[str, int] | None:
    """The attributes a promotion's claim must still find: the rung the plan promoted from."""
    if rung is None or seen is None or "rung" not in seen.attrs:
        return None
    return {"rung": rung}


def _progress(total: int, show: bool | None):
    if show is False:
        return None
    try:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    except ImportError:
        if show:
            _log.warning("show_progress_bar=True but tqdm is not installed; pip install tqdm")
        return None
    return tqdm(total=total, desc="trials", disable=None if show is None else False)
