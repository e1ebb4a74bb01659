"""The chunk size K of a population, measured before anything trains.

:func:`choose_k` times one compiled step at K=1 and at powers of two up to the population size
(stopping once a larger K is clearly slower per trial, or would not fit in memory) and picks the K with the
most trials per second over the whole population (the last chunk is padded, so a K that leaves a
mostly empty last chunk pays for it). K=1 means vmap does not pay (e.g. convolutions on a CPU,
which vmap lowers to grouped convolutions): the trials then run one after another.

The population's programs are not the only way to train the trials: the sequential executor
trains each one with its own jitted step, called once per step from Python. Given ``sequential``
(seconds per step of that step, timed the way the sequential executor calls it), :func:`choose_k`
times it against the best population program, alternately, and picks the sequential path
(``runner == "sequential"``) unless the population is faster per trial step: on a CPU a
convolution inside the population's scanned program can be slower than the plain step even at
K=1, and then the population must not train slower than the sequential executor would.

Measuring costs time the sweep does not train in: compiling each population program and timing
it. A :class:`Budget` decides, *before* each program is compiled and timed, whether that cost is
worth paying: it predicts the cost from what was already measured (the sequential step's first
compile is a lower bound for any population program's compile; an earlier K's compile and step
time are lower bounds for a larger K's), and refuses when the measuring so far plus the predicted
cost would exceed a fraction of the estimated sequential training, or when even a perfect outcome
for that K (the lower bound on its step time) could not repay the cost over the whole training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

SEQUENTIAL_K = 0
"""The ``k`` a :data:`research.population.trainer.Timer` is called with for the sequential
executor's own step (one trial, one jitted call per step): not a chunk size."""


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
      runner: ``"population"`` (the population's compiled programs, K at a time) or
        ``"sequential"`` (each trial trained exactly as the sequential executor trains it: its
        plain jitted step was measured faster than every population program).
      sequential_seconds: the measured seconds per step of the sequential executor's step
        (``None`` when it was not measured).
      measuring_seconds: wall seconds the choice took (compiling and timing; ``None`` when not
        recorded). A choice reused from earlier in the process reports the seconds it took then.
      stored: for figures an earlier process measured (read back from a
        :class:`research.population.choices.ChoiceStore`), the file and when they were measured;
        ``None`` when this process measured them.
    """

    k: int
    candidates: tuple[Candidate, ...]
    reason: str
    memory_limit: int
    runner: str = "population"
    sequential_seconds: float | None = None
    measuring_seconds: float | None = None
    stored: str | None = None

    @property
    def sequential(self) -> bool:
        """Whether the trials train one after another (K=1 or the sequential executor's path)."""
        return self.k == 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "runner": self.runner,
            "reason": self.reason,
            "memory_limit": self.memory_limit,
            "candidates": [c.to_dict() for c in self.candidates],
            "sequential_step_seconds": self.sequential_seconds,
            "measuring_seconds": self.measuring_seconds,
            "stored": self.stored,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Choice:
        """The choice :meth:`to_dict` wrote."""
        return cls(
            k=int(d["k"]),
            candidates=tuple(Candidate(**c) for c in d["candidates"]),
            reason=str(d["reason"]),
            memory_limit=int(d["memory_limit"]),
            runner=str(d["runner"]),
            sequential_seconds=d.get("sequential_step_seconds"),
            measuring_seconds=d.get("measuring_seconds"),
            stored=d.get("stored"),
        )


@dataclasses.dataclass
class Budget:
    """What measuring population programs may cost, decided before each program is compiled and timed.

    Measuring trains nothing: compiling a population program, timing it, timing the sequential step
    again. From the end of the sequential step's first timing (its compile is one the sequential
    path pays anyway), a measurement is allowed only when

    1. the time spent measuring so far plus the measurement's predicted cost stays within
       ``fraction`` of the estimated sequential training (trials x steps x the sequential step's
       seconds), and
    2. for a population program, its predicted cost is below the most it could save. That is the
       whole training at the best per-trial-step time so far, less the same training at the
       lower bound of K's time. The bound is the step time of the largest smaller K measured: a
       chunk of more trials does not step faster.

    Predictions, from what was measured:

    - K's compile is at least the largest compile measured for a smaller K of the same program,
      and at least the sequential step's first compile (``sequential_compile``);
    - timing K runs ``timed_steps`` steps, each no faster than the largest smaller K measured, or
      than the sequential step's for the first.

    They are lower bounds or measured figures. Measuring therefore exceeds ``fraction`` by at most
    what one measurement costs beyond its prediction, plus the rounds that confirm a compiled
    program against the sequential step (:meth:`allows_confirming`: each at most ``fraction`` of
    what the program's timing promises to save). When vmap does not pay (no program times faster
    than the sequential step, so no saving is promised), the population loses at most the first
    to the sequential executor.

    Attributes:
      trials: trials in the population.
      steps: training steps per trial.
      fraction: the most measuring may spend, as a fraction of the estimated sequential training.
      clock: seconds now (``time.perf_counter``; tests give a fake one).
      compile_seconds: ``k -> seconds`` K's program took to compile when it was measured (0 when it
        came from a cache).
      timed_steps: steps one ``measure(k)`` runs (its warm-up and timed calls).
      sequential_timed_steps: steps one timing of the sequential step runs.
      sequential_compile: ``() -> seconds`` of the sequential step's first compile (0 when unknown,
        e.g. compiled before the chooser ran); read after its first timing.
    """

    trials: int
    steps: int
    fraction: float
    clock: Callable[[], float]
    compile_seconds: Callable[[int], float]
    timed_steps: int
    sequential_timed_steps: int
    sequential_compile: Callable[[], float] = lambda: 0.0
    _sequential: float = dataclasses.field(default=math.nan, init=False)
    _start: float = dataclasses.field(default=math.nan, init=False)

    def __post_init__(self):
        if not 0 <= self.fraction:
            raise ValueError(f"fraction={self.fraction} must be >= 0 (e.g. 0.1: measuring costs at most 10%)")

    def begin(self, sequential_seconds: float) -> None:
        """Starts the clock, after the sequential step's first timing (seconds per step)."""
        self._sequential, self._start = sequential_seconds, self.clock()

    def spent(self) -> float:
        """Seconds spent measuring since :meth:`begin`."""
        return self.clock() - self._start

    def limit(self) -> float:
        """The most measuring may spend: ``fraction`` of the estimated sequential training."""
        return self.fraction * self.trials * self.steps * self._sequential

    def predict(self, k: int, measured: list[Candidate]) -> float:
        """Seconds that compiling and timing K will cost at least."""
        smaller = [c for c in measured if c.k < k]
        compiled = max([self.sequential_compile(), *(self.compile_seconds(c.k) for c in smaller)])
        step = max(smaller, key=lambda c: c.k).step_seconds if smaller else self._sequential
        return compiled + self.timed_steps * step

    def gain(self, k: int, measured: list[Candidate]) -> float:
        """The most K could save over the whole training (``inf`` when no smaller K bounds it)."""
        smaller = [c for c in measured if c.k < k]
        if not smaller:
            return math.inf
        best = min([self._sequential, *(1.0 / c.trial_steps_per_s for c in measured)])
        floor = math.ceil(self.trials / k) * max(smaller, key=lambda c: c.k).step_seconds / self.trials
        return self.trials * self.steps * max(0.0, best - floor)

    def refuse(self, k: int, measured: list[Candidate]) -> str | None:
        """Why K is not compiled and timed (``None``: it may be)."""
        cost, spent, limit = self.predict(k, measured), self.spent(), self.limit()
        if spent + cost > limit:
            return (
                f"measuring it would cost at least {cost:.3g} s; with {spent:.3g} s spent that exceeds the budget of "
                f"{limit:.3g} s ({self.fraction:g} of the sequential training's estimated "
                f"{self.trials * self.steps * self._sequential:.3g} s)"
            )
        gain = self.gain(k, measured)
        if cost >= gain:
            return f"measuring it would cost at least {cost:.3g} s, and it could save at most {gain:.3g} s"
        return None

    def allows(self, seconds: float) -> bool:
        """Whether a further ``seconds`` of measuring (a confirmation round) stays within the budget."""
        return self.spent() + seconds <= self.limit()

    def saving(self, trial_step_seconds: float) -> float:
        """Seconds the whole training saves at ``trial_step_seconds`` per trial step against the
        sequential step (0 when it is not faster)."""
        return self.trials * self.steps * max(0.0, self._sequential - trial_step_seconds)

    def allows_confirming(self, seconds: float, trial_step_seconds: float) -> bool:
        """Whether a round of ``seconds`` timing a compiled program (at ``trial_step_seconds`` per
        trial step so far) against the sequential step may run: within the budget, or at most
        ``fraction`` of what the program would save if its timing holds. Its compile, the
        expensive part, is paid by then: a cold process whose compile overran the budget would
        otherwise drop a program that one timing showed 1.7x faster, unconfirmed, after paying for it."""
        return self.allows(seconds) or seconds <= self.fraction * self.saving(trial_step_seconds)


def _over_memory(k: int, nbytes: int, memory_limit: int) -> str:
    """Why a compiled chunk of K is not used (``""``: it fits).

    Raises:
      MemoryError: K=1 does not fit.
    """
    if nbytes <= memory_limit:
        return ""
    if k == 1:
        raise MemoryError(
            f"one trial's compiled step needs {nbytes:,} bytes > the {memory_limit:,} available; "
            "use a smaller model or batch"
        )
    return f"K={k} needs {nbytes:,} bytes > the {memory_limit:,} available. "


def _candidate(n_trials: int, k: int, seconds: float, nbytes: int) -> Candidate:
    """K's measured step as a candidate: ``n_trials`` trained in ``ceil(n_trials / k)`` chunks of K."""
    tps = n_trials / (math.ceil(n_trials / k) * seconds) if seconds > 0 else math.inf
    return Candidate(k=k, step_seconds=seconds, trial_steps_per_s=tps, bytes=nbytes)


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
    sequential: Callable[[], float] | None = None,
    budget: Budget | None = None,
    largest_first: bool = False,
    accept_margin: float | None = None,
    ks: Sequence[int] | None = None,
    sequential_seconds: float | None = None,
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
      sequential: ``() -> seconds per step`` of one trial trained as the sequential executor
        trains it (its own jitted step). When given, it is timed against the best population
        program (``1 + confirm_rounds`` times each, alternately, fastest kept), and the sequential
        path is chosen unless the population trains more trial steps per second. It is timed
        first, before any population program is compiled.
      budget: what measuring may cost (with ``sequential`` only; :class:`Budget`). It is asked
        before each K is compiled and timed and before each confirmation round; once it refuses
        a K the search stops (with no K measured, the sequential path is chosen), and refused
        confirmation rounds are skipped.
      largest_first: with ``sequential``, the search an accelerator wants (see
        :func:`choose_largest_first`): only the largest K that fits is compiled and timed, against
        the sequential step; K=1 and the Ks between are not.
      accept_margin: with ``sequential``, a population program whose first timing trains at least
        this many times the sequential step's trial steps per second is chosen even when the
        budget allows no confirmation round (``None``: never unconfirmed).
      ks: the Ks to try instead of :func:`candidate_ks` (one above ``n_trials`` trains one padded
        chunk: the executor's background compile, or the Ks of a population whose first trial
        trained alone).
      sequential_seconds: the sequential step's first timing when it was timed already (then
        ``sequential`` is called only for the confirmation rounds).

    Returns:
      The :class:`Choice`; ``k == 1`` when no K > 1 beats one trial at a time, and
      ``runner == "sequential"`` when the sequential executor's step beats every population program.

    Raises:
      MemoryError: even one trial does not fit in ``memory_limit``.
    """
    measured: list[Candidate] = []
    reason = ""
    first_seq = None
    if sequential is not None:
        first_seq = sequential() if sequential_seconds is None else sequential_seconds
    if first_seq is None:
        budget = None
    if budget is not None:
        budget.begin(first_seq)
    if largest_first and sequential is not None:
        return choose_largest_first(
            n_trials, measure, sequential, first_seq, memory_limit=memory_limit, max_k=max_k,
            multiple_of=multiple_of, confirm_rounds=confirm_rounds, budget=budget, accept_margin=accept_margin, ks=ks,
        )  # fmt: skip
    for k in sorted(ks) if ks is not None else candidate_ks(n_trials, max_k=max_k, multiple_of=multiple_of):
        why = budget.refuse(k, measured) if budget is not None else None
        if why:
            reason += f"K={k} and larger not measured: {why}. "
            break
        if len(measured) >= 2:
            a, b = measured[0], measured[-1]
            per_trial = (b.bytes - a.bytes) / max(b.k - a.k, 1)
            predicted = a.bytes + per_trial * (k - a.k)
            if predicted > memory_limit:
                reason = f"K={k} would need about {predicted:,.0f} bytes > the {memory_limit:,} available; not tried. "
                break
        seconds, nbytes = measure(k)
        if over := _over_memory(k, nbytes, memory_limit):
            reason = over
            break
        measured.append(_candidate(n_trials, k, seconds, nbytes))
        tps = measured[-1].trial_steps_per_s
        best_so_far = max(measured, key=lambda c: c.trial_steps_per_s)
        if len(measured) >= 2 and tps < stop_below * best_so_far.trial_steps_per_s:
            reason += f"K={k} is slower per trial than K={best_so_far.k}; larger K not tried. "
            break
    if not measured:  # the budget allowed no population program
        reason += "the trials train exactly as the sequential executor trains them."
        return Choice(
            k=1,
            candidates=(),
            reason=reason.strip(),
            memory_limit=memory_limit,
            runner="sequential",
            sequential_seconds=first_seq,
        )
    best = max(measured, key=lambda c: c.trial_steps_per_s)
    if best.k > 1 and confirm_rounds > 0:
        one, times = measured[0], {1: measured[0].step_seconds, best.k: best.step_seconds}
        rounds = 0
        for _ in range(confirm_rounds):
            if budget is not None and not budget.allows(budget.timed_steps * (times[1] + times[best.k])):
                break
            rounds += 1
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
        reason += f"confirmed against K=1 over {rounds} more alternating timings. "
    one = measured[0]
    if sequential is not None:
        return _against_sequential(
            n_trials, measure, sequential, first_seq, measured, best, reason, memory_limit, confirm_rounds, budget,
            accept_margin,
        )  # fmt: skip
    if best.k == 1:
        reason += "vmap does not pay here (no K > 1 beats one trial at a time): trials train one after another."
    else:
        reason += (
            f"K={best.k}: {best.trial_steps_per_s / one.trial_steps_per_s:.2f}x the trial steps per second of K=1."
        )
    return Choice(k=best.k, candidates=tuple(measured), reason=reason.strip(), memory_limit=memory_limit)


def _against_sequential(
    n_trials: int,
    measure: Callable[[int], tuple[float, int]],
    sequential: Callable[[], float],
    seq: float,
    measured: list[Candidate],
    best: Candidate,
    reason: str,
    memory_limit: int,
    confirm_rounds: int,
    budget: Budget | None,
    accept_margin: float | None = None,
) -> Choice:
    """The population's best candidate timed against the sequential executor's step (``seq`` its
    first timing), alternately (the rounds the budget allows). With confirmation rounds asked for
    and none allowed by the budget, the sequential path is kept: one timing each, taken at
    different moments of a loaded machine, does not show the population faster; unless it is
    ``accept_margin`` times faster or more (no load moves a timing that far)."""
    pop, rounds = best.step_seconds, 0
    chunks = math.ceil(n_trials / best.k)
    for _ in range(confirm_rounds):
        cost = budget.timed_steps * pop + budget.sequential_timed_steps * seq if budget is not None else 0.0
        if budget is not None and not budget.allows_confirming(cost, chunks * pop / n_trials):
            reason += "the budget allows no more alternating timings against the sequential step. "
            break
        rounds += 1
        pop = min(pop, measure(best.k)[0])
        seq = min(seq, sequential())
    unconfirmed = confirm_rounds > 0 and rounds == 0
    best = dataclasses.replace(best, step_seconds=pop, trial_steps_per_s=n_trials / (chunks * pop))
    measured = [best if c.k == best.k else c for c in measured]
    seq_tps = 1.0 / seq if seq > 0 else math.inf
    figures = f"{best.trial_steps_per_s:.4g} trial steps/s at K={best.k} against {seq_tps:.4g} for the sequential step"
    if unconfirmed and accept_margin is not None and best.trial_steps_per_s >= accept_margin * seq_tps:
        unconfirmed = False
        reason += f"one timing each, {best.trial_steps_per_s / seq_tps:.1f}x (at least {accept_margin:g}x: taken). "
    if unconfirmed or seq_tps >= best.trial_steps_per_s:
        if seq_tps >= best.trial_steps_per_s:  # slower needs no confirming
            reason += f"the sequential executor's own jitted step is at least as fast as every population program ({figures}): "
        else:
            reason += f"unconfirmed ({figures}, one timing each): "
        reason += "the trials train exactly as the sequential executor trains them."
        return Choice(
            k=1,
            candidates=tuple(measured),
            reason=reason.strip(),
            memory_limit=memory_limit,
            runner="sequential",
            sequential_seconds=seq,
        )
    one = measured[0]
    if best.k == 1:
        reason += f"vmap does not pay here, but the population's K=1 program beats the sequential step ({figures})."
    elif one.k != 1:  # the largest-first search measured no K=1 program
        reason += (
            f"K={best.k}: {best.trial_steps_per_s * seq:.2f}x the sequential step's trial steps per second ({figures})."
        )
    else:
        reason += (
            f"K={best.k}: {best.trial_steps_per_s / one.trial_steps_per_s:.2f}x the trial steps per second of K=1 "
            f"({figures})."
        )
    return Choice(
        k=best.k, candidates=tuple(measured), reason=reason.strip(), memory_limit=memory_limit, sequential_seconds=seq
    )


def choose_largest_first(
    n_trials: int,
    measure: Callable[[int], tuple[float, int]],
    sequential: Callable[[], float],
    first_seq: float,
    *,
    memory_limit: int,
    max_k: int | None = None,
    multiple_of: int = 1,
    confirm_rounds: int = 2,
    budget: Budget | None = None,
    accept_margin: float | None = None,
    ks: Sequence[int] | None = None,
) -> Choice:
    """The search for an accelerator: the largest K that fits, against the sequential step.

    On a GPU the trials of a chunk train in parallel: the measured H200 programs stepped 32 trials
    21.6x as fast per trial as K=1, and each population program took seconds to compile, so the
    ascending search (one compile per power of two) spends more than the training it could save.
    Here the Ks are tried from the largest down, and only until one fits in ``memory_limit``
    (``measure`` returns its bytes before timing it; a K over the limit is reported with
    ``inf`` seconds and not run): that one K is compiled and timed, then timed against the
    sequential step as :func:`choose_k` does (:func:`_against_sequential`: alternating rounds under
    the budget, ``accept_margin`` for a clear winner), and the faster trains.
    ``first_seq`` is the sequential step's first timing (the budget began after it). ``ks``: the
    Ks to try (default :func:`candidate_ks`), largest first; one above ``n_trials`` trains one padded chunk.

    Raises:
      MemoryError: even one trial does not fit in ``memory_limit``.
    """
    reason = ""
    tried = sorted(ks) if ks is not None else candidate_ks(n_trials, max_k=max_k, multiple_of=multiple_of)
    for k in reversed(tried):
        why = budget.refuse(k, []) if budget is not None else None
        if why:  # every K is predicted alike before any is measured
            reason += f"K={k} and smaller not measured: {why}. "
            break
        seconds, nbytes = measure(k)
        if over := _over_memory(k, nbytes, memory_limit):
            reason += over
            continue
        best = _candidate(n_trials, k, seconds, nbytes)
        reason += f"largest first: K={k} measured. "
        return _against_sequential(
            n_trials, measure, sequential, first_seq, [best], best, reason, memory_limit, confirm_rounds, budget,
            accept_margin,
        )  # fmt: skip
    reason += "the trials train exactly as the sequential executor trains them."
    return Choice(
        k=1, candidates=(), reason=reason.strip(), memory_limit=memory_limit, runner="sequential",
        sequential_seconds=first_seq,
    )  # fmt: skip
