"""The population executor: sweep/tune trials trained K at a time as one vmapped program.

For the trials it is given, it

1. reads back every finished run (any executor's) and leaves it be;
2. groups the rest into populations (:func:`research.population.split_populations`; the reason
   each extra population is separate goes into :meth:`PopulationExecutor.summary`);
3. per population, measures the chunk size K (:func:`research.population.chooser.choose_k`; on a
   CPU after its first trial trained as the sequential executor trains it, that trial's steps
   timing the sequential step: ``lead_trial``) and
   trains the leading ``train`` stage of K trials at a time (:class:`PopulationTrainer`); when
   vmap does not pay (K=1) the trials train one after another, with the population's K=1 program
   or, when the sequential executor's own jitted step was measured at least as fast, exactly as
   the sequential executor trains them (``runner == "sequential"``: the population is never
   slower than that path for its training);
4. hands each trained model to :func:`research.run.run` as that trial's stage 0, which stores and
   reports it exactly as a sequential run (measured together: :mod:`research.population.measure`);
   later stages (prune, quantize, export...) run per trial from it, each trial's run in its own
   thread taking turns, and a later stage's fine-tuning trains with the chunk's other trials' as
   one program when they compile to the same one (:mod:`research.population.later`).

Each trial's run directory is complete as soon as its chunk has trained, so a killed population
sweep keeps every finished chunk and resumes with the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from collections.abc import Generator
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from research import store
from research import workdir as workdir_lib
from research.executors import Job
from research.executors import Outcome
from research.executors import finished_report
from research.executors import run_one
from research.population import choices as choices_lib
from research.population.background import BackgroundCompile
from research.population.chooser import Budget
from research.population.chooser import Choice
from research.population.chooser import candidate_ks
from research.population.chooser import choose_k
from research.population.keys import signature
from research.population.keys import split_populations
from research.population.later import TrialThread
from research.population.later import alone_reason
from research.population.later import request_key
from research.population.later import save_progress
from research.population.later import train_requests
from research.population.later import write_trial
from research.population.measure import LATENCY_NOTE
from research.population.measure import LATENCY_NOTE_SIZES
from research.population.measure import PopulationMeasurer
from research.population.padding import resizable_layers
from research.population.trainer import TIMED_REPEATS
from research.population.trainer import PopulationTrainer
from research.population.trainer import SeedBundles
from research.population.trainer import Timer
from research.population.trainer import TrialResult
from research.population.trainer import memory_limit_bytes
from research.population.trainer import time_call
from research.report import CurvePlotter
from research.stages import FINE_TUNE_RUNNER
from research.train.loop import record_step_times
from research.workdir import WorkdirLock

_PROGRAMS: dict = {}  # compiled population programs of this process, by signature and K (as the
# sequential executor's jitted train steps are kept for the process: research.train.make_train_step)
_PROGRAMS_KEPT = 64
_CHOICES: dict = {}  # chunk sizes measured (with the wall-clock timer) by this process, by program and size
SEQUENTIAL_PROBE_STEPS = 20  # steps per timed call of the sequential step (its timings train nothing),
# and the fewest steps per group of a lead trial's stretches (see ``lead_trial``)
CPU_MEASURE_BUDGET = 0.1  # measure_budget's default on a CPU
ACCELERATOR_MEASURE_BUDGET = 0.5  # ... on a GPU/TPU, where the largest-first search compiles one program
LARGEST_FIRST_ACCEPT_MARGIN = 2.0  # a largest-first program this much faster than sequential needs no confirming
_PLATFORM_DEFAULT: Any = object()  # measure_budget's default: CPU_ or ACCELERATOR_MEASURE_BUDGET by platform
_BESIDE_JAX_CACHE: Any = object()  # choices_file's default: choices_lib.default_path() when choosing
_UNREAD: Any = object()  # _choose's stored choice not read yet; no lead trial trained (_measure_choice)


class PopulationExecutor:
    """Trains trials that share architecture and data as one vmapped program per chunk.

    Args:
      chunk_size: a fixed K (skips the measurement; 1 runs everything one after another).
      max_k: the largest K the chooser tries.
      block_steps: training steps per compiled call.
      timer: ``(k, fn) -> seconds of one call of fn`` (tests inject a fake one).
      memory_limit: bytes a chunk may use (default: the device's free memory, or half the host's).
      devices: shard the population axis over these (default: every local device of the default
        backend when there is more than one, else the first).
      measure_budget: with the wall-clock timer, the most the chooser may spend compiling and timing
        population programs, as a fraction of the population's estimated sequential training time
        (trials x steps x the sequential step's seconds). Each program's cost is predicted before
        it is compiled (:class:`research.population.chooser.Budget`), and it is compiled only when
        the cost fits the budget and its best possible gain could repay it; otherwise the trials
        train as the sequential executor trains them. When vmap does not pay, a population sweep
        is then slower than a sequential one by about this fraction at most (plus what one
        measurement costs beyond its prediction). ``None``: no budget. Default: 0.1 on a CPU,
        0.5 on a GPU/TPU (where only one program is compiled, see ``largest_first``).
      largest_first: measure only the largest K that fits against the sequential step
        (:func:`research.population.chooser.choose_largest_first`) instead of every power of two
        from K=1 up, and take a program at least 2x faster than the sequential step without
        confirmation rounds. ``None`` (default): decided per population, largest first where
        vmap's gain grows with K and each population program takes seconds to compile: on a
        GPU/TPU, and on a CPU for a population whose step has convolutions (it trains in
        single-step blocks there, :attr:`PopulationTrainer.unlooped`; LeNet-5 on the 8x8 digits,
        2-core CPU: 3.3x the sequential step's trial steps per second at K=8, and an ascending
        search spent its budget compiling K=1 and 2; on 28x28 inputs K=8 was 3.4x slower and the
        sequential path was kept); the ascending search for the other CPU populations. The
        attribute is ``None`` on a CPU until then.
      overlap: compile a population's program in a background thread while its first trials
        train one after another as the sequential executor trains them
        (:class:`research.population.background.BackgroundCompile`), then time it against the
        sequential step and train the remaining trials with the faster. The chooser's budget is
        asked first (the sequential step timed, the program's predicted cost against it); a
        population whose choice was measured before in the process, or whose program is
        compiled, or with a ``chunk_size``, does not overlap. Default ``False``: on the 2-core CPU
        the compile slowed the trials beside it about as much as it took (LeNet-5, 32 trials of
        100 steps, four fresh processes each: fastest 18.28 s overlapped, 17.95 s measured first,
        17.46 s sequential); it is meant for hosts with idle cores beside an accelerator, where it
        has not been measured yet.
      choices_file: a JSON file where measured chunk sizes are kept for later processes
        (:class:`research.population.choices.ChoiceStore`): a population measured before on the
        same machine, with the same program and options, reads its choice back instead of
        compiling and timing (a stored K is compiled and checked against the memory free now;
        one that no longer fits is measured again). Default: beside JAX's persistent compilation
        cache when one is set (``JAX_COMPILATION_CACHE_DIR``, or a tune study's
        ``workdir/jax_cache``), with the wall-clock timer only; ``None``: never stored.
      lead_trial: before a population's chunk size is measured, its first trial trains exactly as
        the sequential executor trains it, and its training loop's stretches of steps are timed
        (:func:`research.train.loop.record_step_times`): the sequential step's pace and compile
        then come from steps that train, not from timed calls of a copy of the state that train
        nothing, and the chooser measures the population programs for the other trials against
        them. Only a population whose choice is measured (not measured before in the process nor
        stored, no trial resuming, no ``chunk_size``, not overlapped). ``None``
        (default): with the wall-clock timer on a CPU, where a population program gains little
        over one trial trained alone (LeNet-5: 1.3-1.4x); on a GPU/TPU a population can train
        20x as fast, and a whole trial at the sequential pace would cost more than the timed calls.
    """

    name = "population"

    def __init__(
        self,
        *,
        chunk_size: int | None = None,
        max_k: int | None = None,
        block_steps: int = 50,
        timer: Timer | None = None,
        memory_limit: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        measure_budget: float | None = _PLATFORM_DEFAULT,
        largest_first: bool | None = None,
        overlap: bool = False,
        choices_file: str | None = _BESIDE_JAX_CACHE,
        lead_trial: bool | None = None,
    ):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or None to measure it)")
        if max_k is not None and max_k < 1:
            raise ValueError(f"max_k={max_k} must be >= 1")
        if measure_budget is not _PLATFORM_DEFAULT and measure_budget is not None and not measure_budget >= 0:
            raise ValueError(f"measure_budget={measure_budget} must be >= 0 (or None for no budget)")
        self.chunk_size, self.max_k, self.block_steps = chunk_size, max_k, block_steps
        self.timer = timer or time_call
        self.devices = list(devices) if devices else jax.local_devices()
        accelerator = self.devices[0].platform != "cpu"
        self.largest_first = (True if accelerator else None) if largest_first is None else bool(largest_first)
        if measure_budget is _PLATFORM_DEFAULT:
            measure_budget = ACCELERATOR_MEASURE_BUDGET if accelerator else CPU_MEASURE_BUDGET
        self.measure_budget = measure_budget
        self.memory_limit = memory_limit
        self.overlap = bool(overlap)
        self.choices_file = choices_file
        self.lead_trial = lead_trial
        self._background: list[BackgroundCompile] = []  # compiles started by this executor (joined by run)
        self.populations: list[dict[str, Any]] = []
        if len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.clear()
            _CHOICES.clear()
        self._programs = _PROGRAMS  # compiled programs by population signature (shared by the process)
        self._choices: dict = {}  # measured chunk sizes by population signature and size
        self._trained: set[str] = set()  # population signatures this executor has compiled programs for
        self._latencies: dict = {}  # latency_ms by (population, stage, latency batch size): measured once

    def summary(self) -> dict[str, Any]:
        """The populations, their chunk sizes, the measured figures and the device."""
        dev = self.devices[0]
        return {
            "executor": self.name,
            "device": dev.device_kind,
            "platform": dev.platform,
            "device_count": len(self.devices),
            "populations": self.populations,
        }

    def run(self, jobs: Sequence[Job], *, progress: bool = False) -> Iterator[Outcome]:
        """Yields one :class:`Outcome` per job: finished ones first, then chunk by chunk."""
        plotter = CurvePlotter()
        try:
            yield from self._run(jobs, progress, plotter)
        finally:
            plotter.close()
            for compile_ in self._background:  # a compile still running when its trials all trained
                compile_.join()
            self._background.clear()

    def _run(self, jobs: Sequence[Job], progress: bool, plotter: CurvePlotter) -> Iterator[Outcome]:
        pending = []
        for job in jobs:
            report = finished_report(job.run_dir, job.config)
            if report is not None:
                yield Outcome(job=job, report=report, reused=True, note="finished earlier")
            elif _first_stage_stored(job):
                yield run_one(job, progress=progress, note="resumed after its first stage")
            else:
                pending.append(job)
        if not pending:
            return
        for number, group in enumerate(split_populations([j.config for j in pending])):
            members = [pending[i] for i in group.indices]
            entry: dict[str, Any] = {
                "population": len(self.populations),
                "trials": [j.key for j in members],
                "separate_because": group.reason,
            }
            self.populations.append(entry)
            if group.solo:
                entry.update(k=1, why="cannot train in a population")
                for job in members:
                    yield run_one(job, progress=progress, note="one after another: " + group.reason)
                continue
            sig = json.dumps(signature(members[0].config), sort_keys=True, default=str)
            if len(members) == 1 and sig not in self._trained:
                # Alone and nothing compiled for it yet: a plain run costs no more than a K=1 program.
                entry.update(k=1, why="a single trial")
                yield run_one(members[0], progress=progress, note="one after another: a single trial")
                continue
            self._trained.add(sig)
            stored = self._stored([j.config for j in members])
            if stored is not None and stored.runner == "sequential":
                # An earlier process measured the sequential path faster: no trainer, no measuring.
                entry.update(k=1, why=stored.reason, choice=stored.to_dict(), devices=len(self._devices(len(members))))
                yield from self._run_plain(
                    SeedBundles([j.config for j in members]), members, range(len(members)), number, progress,
                    plotter, "its step measured faster" if stored.candidates else stored.reason,
                )  # fmt: skip
                continue
            try:
                trainer = PopulationTrainer(
                    [j.config for j in members],
                    block_steps=self.block_steps,
                    devices=self._devices(len(members)),
                    cache=self._programs,
                )
                background, choice = self._start_overlap(trainer, members, stored)
                leads = background is None and choice is None and self._leads(trainer, members, stored)
                if background is None and choice is None and not leads:
                    choice = self._choose(trainer, len(members), stored=stored)
            except Exception as e:  # a program that does not vmap or compile: run the trials alone
                yield from _alone(members, e, entry, progress)
                continue
            positions, lead = list(range(len(members))), ""
            if leads:
                timing = yield from self._run_lead(trainer, members, number, progress, plotter, entry)
                positions = positions[1:]
                try:
                    choice = self._choose(trainer, len(members), stored=None, lead=timing)
                except Exception as e:  # a program that does not vmap or compile: the rest train alone
                    yield from _alone(members[1:], e, entry, progress)
                    continue
                lead = f"trial {members[0].key} trained first as the sequential executor trains it, its steps timed; "
                lead += f"the other {len(positions)}: "
            if background is not None:
                first, choice, lead = yield from self._run_overlapped(
                    trainer, members, background, number, progress, plotter, entry
                )
                if choice is None:  # every trial trained
                    continue
                positions = positions[first:]
            entry.update(
                k=choice.k,
                why=lead + choice.reason,
                choice=choice.to_dict(),
                devices=len(trainer.devices),
                block_steps=trainer.block_steps,
            )
            yield from self._train(trainer, members, positions, choice, number, progress, plotter, entry)

    def _train(self, trainer, members, positions, choice, number, progress, plotter, entry) -> Iterator[Outcome]:
        """Trains trials ``positions`` of the population (``members``, indexed as ``trainer``'s)
        as ``choice`` says: with the sequential executor's step, or in chunks of ``choice.k``."""
        if choice.runner == "sequential":
            why = "its step measured faster" if choice.candidates else choice.reason
            yield from self._run_plain(trainer, members, positions, number, progress, plotter, why)
            return
        # K=1 here trains with the population's compiled program, one trial after another: it was
        # measured faster than the sequential executor's step (else runner == "sequential" above).
        # Trials of a killed sweep resume from their checkpoints: chunks of one resume step each.
        resumed = _resume_points(trainer, members, positions)
        finish_alone = [i for i, (_, step) in resumed.items() if step >= trainer.steps]
        for i in finish_alone:  # checkpointed at the last step, not stored: run() finishes it
            yield run_one(members[i], progress=progress, note="resumed after its last checkpoint")
        by_start: dict[int, list[int]] = {}
        for i in positions:
            if i not in finish_alone:
                by_start.setdefault(resumed[i][1] if i in resumed else 0, []).append(i)
        for start_step, chunk_positions in sorted(by_start.items()):
            for first in range(0, len(chunk_positions), choice.k):
                chunk = chunk_positions[first : first + choice.k]
                yield from self._run_chunk(
                    trainer,
                    [members[i] for i in chunk],
                    chunk,
                    choice.k,
                    number,
                    progress,
                    plotter,
                    entry,
                    start=start_step,
                    states=[resumed[i][0] for i in chunk] if start_step else None,
                )

    def _start_overlap(
        self, trainer: PopulationTrainer, members: Sequence[Job], stored: Choice | None = None
    ) -> tuple[BackgroundCompile | None, Choice | None]:
        """Starts a :class:`BackgroundCompile` of the population's largest chunk size when it is to
        overlap the first trials' training (see ``overlap``): ``(started, None)``; ``(None, choice)``
        when the budget refuses it (the chooser's first step: the sequential step timed, then the
        program's predicted cost against the budget; the trials then train as the sequential
        executor trains them); ``(None, None)`` when the population does not overlap."""
        n = len(members)
        if not self.overlap or not self._measured_afresh(trainer, members, stored):
            return None, None
        ks = candidate_ks(n, max_k=self.max_k, multiple_of=len(trainer.devices))[1:]
        if not ks or any(trainer.is_compiled(k) for k in ks):
            return None, None
        limit = self._memory_limit(trainer)
        t0 = time.perf_counter()
        seq = trainer.sequential_step_seconds(self.timer, steps=_probe_steps(trainer))
        budget = self._budget(trainer, n)
        if budget is not None:
            budget.begin(seq)
            if why := budget.refuse(ks[-1], []):
                reason = f"K={ks[-1]} and smaller not compiled: {why}. The trials train exactly as the sequential "
                reason += "executor trains them."
                choice = Choice(
                    k=1, candidates=(), reason=reason, memory_limit=limit, runner="sequential", sequential_seconds=seq
                )
                choice = dataclasses.replace(choice, measuring_seconds=time.perf_counter() - t0)
                _CHOICES[self._memo(trainer, n)] = choice  # as a measured choice: for the process
                self._keep(trainer, choice)
                return None, choice
        started = BackgroundCompile(trainer, ks, limit, sequential_seconds=seq).start()
        self._background.append(started)
        return started, None

    def _run_overlapped(self, trainer, members, background, number, progress, plotter, entry):
        """Trains the population's first trials one after another (the sequential executor's way)
        until ``background`` has compiled the program, then chooses how the rest train.

        Returns (as the generator's value) ``(trials trained, the choice for the rest or None when
        every trial trained here, the sentence that precedes its reason)``."""
        first = yield from self._run_plain(
            trainer, members, range(len(members)), number, progress, plotter, "while its program compiled",
            until=background.done,
        )  # fmt: skip
        entry["overlap"] = {"compiling": background.ks[0], "trained_first": first}
        if not background.done():
            entry.update(
                k=1,
                runner="sequential",
                why=f"every trial trained one after another while the K={background.ks[0]} program compiled "
                "(it was not ready before the last trial).",
            )
            return first, None, ""
        entry["overlap"].update(
            k=background.k, compile_seconds=background.seconds, tried=[list(t) for t in background.tried]
        )
        lead = (
            f"{first} trial{'s' * (first != 1)} trained one after another while the population's program compiled "
            f"({background.seconds:.1f} s); "
        )
        if background.k is None:
            entry.update(k=1, why=lead + f"the population failed to build ({background.error}); the rest as well.")
            yield from self._run_plain(trainer, members, range(first, len(members)), number, progress, plotter, "")
            return first, None, ""
        rest = len(members) - first
        if rest == 0:
            entry.update(k=1, why=lead + "none was left to train.")
            return first, None, ""
        t0 = time.perf_counter()
        choice = self._measure_choice(
            trainer, rest, ks=[background.k], sequential_seconds=background.sequential_seconds
        )
        choice = dataclasses.replace(choice, measuring_seconds=time.perf_counter() - t0)
        return first, choice, lead + f"the other {rest}: "

    def _measured_afresh(self, trainer: PopulationTrainer, members: Sequence[Job], stored: Choice | None) -> bool:
        """Whether the population's chunk size is to be measured from nothing (what overlap and
        the lead trial apply to): no ``chunk_size``, two trials or more, a first stage's configs,
        not measured before in this process (its programs compiled) nor by an earlier one
        (``stored``, :meth:`_stored`: read back by :meth:`_choose`), no trial resuming."""
        if self.chunk_size is not None or len(members) < 2 or not trainer.configs or stored is not None:
            return False
        if self._memo(trainer, len(members)) in (_CHOICES if self.timer is time_call else self._choices):
            return False
        # a killed sweep's trials resume from their checkpoints, chunk by chunk
        return not any(os.path.isdir(_stage_dir(job)) for job in members)

    def _leads(self, trainer: PopulationTrainer, members: Sequence[Job], stored: Choice | None) -> bool:
        """Whether the population's first trial trains first, timed, before its chunk size is
        measured (see ``lead_trial``)."""
        leads = self.lead_trial
        if leads is None:
            leads = self.timer is time_call and trainer.devices[0].platform == "cpu"
        return leads and self._measured_afresh(trainer, members, stored)

    def _run_lead(
        self, trainer, members, number, progress, plotter, entry
    ) -> Generator[Outcome, None, tuple[float, float] | None]:
        """Trains the population's first trial as the sequential executor trains it, timing its
        first stage's stretches of steps. Returns (as the generator's value) ``(seconds per step,
        seconds of the step's first call beyond its steps)`` of the sequential step, or ``None``
        when too few steps were timed (the chooser then times the step itself)."""
        with record_step_times(_stage_dir(members[0]), every=SEQUENTIAL_PROBE_STEPS) as times:
            (outcome,) = self._run_plain(
                trainer, members, [0], number, progress, plotter, "trained first, its steps timed for the chooser"
            )
        timing = times.step_seconds(SEQUENTIAL_PROBE_STEPS) if outcome.error is None else None
        entry["lead"] = {
            "trial": members[0].key,
            "stretches": [list(s) for s in times.stretches],
            "sequential_step_seconds": timing[0] if timing else None,
            "compile_seconds": timing[1] if timing else None,
        }
        yield outcome
        return timing

    def _devices(self, n_trials: int) -> list[jax.Device]:
        """Shard over every device only when the population fills them."""
        return self.devices if len(self.devices) > 1 and n_trials >= len(self.devices) else self.devices[:1]

    def plan(self, config, n: int) -> int:
        """The chunk size for ``n`` trials like ``config`` (measured once; ``tune`` asks batches of it)."""
        if n <= 1:
            return 1
        trainer = PopulationTrainer(
            [config] * n, block_steps=self.block_steps, devices=self._devices(n), cache=self._programs
        )
        self._trained.add(json.dumps(signature(config), sort_keys=True, default=str))
        return self._choose(trainer, n).k

    def _choose(self, trainer: PopulationTrainer, n: int, stored: Any = _UNREAD, lead: Any = _UNREAD) -> Choice:
        """The chunk size of ``n`` trials of ``trainer``'s program: measured once per process, or
        read back from an earlier process's (``stored``: :meth:`_stored` when read already).
        ``lead``: the first trial trained already, its sequential step timed (:meth:`_run_lead`'s
        figures, or ``None``): the chunk size is measured for the other ``n - 1`` against them."""
        # Measured with the real timer, a choice holds for the process (as its compiled programs do).
        choices = _CHOICES if self.timer is time_call else self._choices
        if n == 1:
            limit = self._memory_limit(trainer)
            # as measured for larger batches of this program (a tune study's), else as the sequential executor
            earlier = [c for m, c in choices.items() if m[0] == trainer.program_key and self.chunk_size is None]
            if earlier and earlier[-1].runner == "population":
                return Choice(
                    k=1, candidates=(), reason="a single trial (its K=1 program measured faster)", memory_limit=limit
                )
            return Choice(
                k=1,
                candidates=(),
                reason="a single trial, trained as the sequential executor trains it",
                memory_limit=limit,
                runner="sequential",
            )
        memo = self._memo(trainer, n)
        if memo not in choices:
            choice = self._read_back(trainer, self._stored(trainer.configs) if stored is _UNREAD else stored)
            if choice is None:
                t0 = time.perf_counter()
                choice = self._measure_choice(trainer, n, lead=lead)
                choice = dataclasses.replace(choice, measuring_seconds=time.perf_counter() - t0)
                self._keep(trainer, choice)
            choices[memo] = choice
        return choices[memo]

    def _store(self, configs: Sequence[Any]) -> choices_lib.ChoiceStore | None:
        """Where measured choices of a population of ``configs`` are kept for later processes (see
        ``choices_file``); ``None``: nowhere (a fixed chunk size, a later stage's fine-tuning)."""
        if self.chunk_size is not None or not configs:
            return None
        if self.choices_file is _BESIDE_JAX_CACHE:
            path = choices_lib.default_path() if self.timer is time_call else None  # a fake timer's are a test's
        else:
            path = self.choices_file
        return choices_lib.ChoiceStore(path) if path else None

    def _store_key(self, configs: Sequence[Any]) -> tuple[str, dict[str, Any]]:
        """The stored entry's key of a population of ``configs`` and the machine in it: what its
        program and the choice depend on, read from the configs and the executor's options (no
        trainer is built: a population whose stored choice is the sequential path builds none),
        and :func:`research.population.choices.machine`."""
        n = len(configs)
        memo = (
            json.dumps(signature(configs[0]), sort_keys=True, default=str), len({c.seed for c in configs}),
            self.block_steps, n, self.chunk_size, self.max_k, self.memory_limit, self.largest_first,
            self.measure_budget,
        )  # fmt: skip
        machine = choices_lib.machine(self._devices(n))
        return choices_lib.entry_key(memo, machine), machine

    def _stored(self, configs: Sequence[Any]) -> Choice | None:
        """The choice an earlier process measured for a population of ``configs`` (read back: its
        reason says so), or ``None``."""
        store = self._store(configs)
        found = store.get(self._store_key(configs)[0]) if store else None
        if found is None:
            return None
        choice, entry = found
        stored = f"{store.path}, measured {entry.get('measured', '?')}"
        reason = f"{choice.reason} (figures measured by an earlier process on this machine: {stored})"
        return dataclasses.replace(choice, reason=reason, stored=stored, measuring_seconds=0.0)

    def _read_back(self, trainer: PopulationTrainer, choice: Choice | None) -> Choice | None:
        """``choice`` (:meth:`_stored` for ``trainer``'s population) with its chunk's program
        compiled; ``None`` when none was stored or its chunk no longer fits in the memory free now."""
        if choice is None:
            return None
        t0 = time.perf_counter()
        limit = self._memory_limit(trainer)
        if choice.runner == "population":
            trainer.compiled(choice.k)
            if trainer.memory.get(choice.k, 0) > limit:
                return None
        return dataclasses.replace(choice, memory_limit=limit, measuring_seconds=time.perf_counter() - t0)

    def _keep(self, trainer: PopulationTrainer, choice: Choice) -> None:
        """Stores a choice measured here for later processes (see ``choices_file``)."""
        store = self._store(trainer.configs)
        if store is not None:
            config = trainer.configs[0]
            key, machine = self._store_key(trainer.configs)
            store.put(
                key,
                choice,
                population=f"{config.name}: {len(trainer.configs)} trials of {config.model.name} on {config.data.name}",
                machine_=machine,
            )

    def _memory_limit(self, trainer: PopulationTrainer) -> int:
        """Bytes a chunk may use: ``memory_limit``, or what the trainer's first device has free."""
        return self.memory_limit if self.memory_limit is not None else memory_limit_bytes(trainer.devices[0])

    def _memo(self, trainer: PopulationTrainer, n: int) -> tuple:
        """What a measured choice of ``n`` trials of ``trainer``'s program depends on."""
        return (
            trainer.program_key, n, self.chunk_size, self.max_k, self.memory_limit, self._largest_first(trainer),
            self.measure_budget,
        )  # fmt: skip

    def _largest_first(self, trainer: PopulationTrainer) -> bool:
        """Whether ``trainer``'s population is searched largest first (see ``largest_first``)."""
        return trainer.unlooped if self.largest_first is None else self.largest_first

    def _measure_choice(
        self,
        trainer: PopulationTrainer,
        n: int,
        ks: Sequence[int] | None = None,
        sequential_seconds: float | None = None,
        lead: Any = _UNREAD,
    ) -> Choice:
        """``ks`` and ``sequential_seconds``: the programs compiled in the background and the
        sequential step's timing then; ``lead``: the figures of a first trial trained alone
        (:meth:`_run_lead`; ``None`` when too few of its steps were timed): the chunk size of the
        other ``n - 1`` trials is measured, from the same Ks as for ``n``."""
        multiple = len(trainer.devices)
        limit = self._memory_limit(trainer)

        def measure(k: int, timer: Timer = self.timer) -> tuple[float, int]:
            trainer.compiled(k)  # its bytes first: a program that would not fit is never run
            if trainer.memory.get(k, 0) > limit:
                return math.inf, trainer.memory[k]
            seconds = trainer.step_seconds(k, timer)
            return seconds, trainer.memory.get(k, 0)

        if self.chunk_size is not None:
            k = min(self.chunk_size, n)
            if k > 1 and k % multiple:
                k = max(multiple, k - k % multiple)
            if k > 1:
                trainer.compiled(k)
                needed = trainer.memory.get(k, 0)
                if needed > limit:
                    raise MemoryError(f"chunk_size={k} needs {needed:,} bytes > the {limit:,} available")
            return Choice(k=k, candidates=(), reason=f"chunk_size={k} given", memory_limit=limit)
        if not trainer.configs:
            return choose_k(n, measure, memory_limit=limit, max_k=self.max_k, multiple_of=multiple)

        def sequential() -> float:
            return trainer.sequential_step_seconds(self.timer, steps=_probe_steps(trainer))

        compiled = ks is not None  # in the background: the largest first, compiled already
        figures, confirm_rounds = None, 2
        if lead is not _UNREAD:  # the other trials', from the Ks of all
            ks, n, figures = candidate_ks(n, max_k=self.max_k, multiple_of=multiple), n - 1, lead
            if figures:
                # With the lead's pace (the fastest of several stretches of real steps), a program's
                # timing needs no confirming rounds: other work on the machine only ever adds time
                # to it, so a program timed faster than that pace is faster.
                sequential_seconds, confirm_rounds = figures[0], 0
        budget = self._budget(trainer, n, compiled=compiled, sequential_compile=figures[1] if figures else None)
        if budget is not None:
            # a program slower than predicted stops being timed when the budget runs out
            measure = functools.partial(measure, timer=functools.partial(time_call, afford=budget.allows))
        largest_first = self._largest_first(trainer) or compiled
        return choose_k(
            n,
            measure,
            memory_limit=limit,
            max_k=self.max_k,
            multiple_of=multiple,
            confirm_rounds=confirm_rounds,
            sequential=sequential,
            budget=budget,
            largest_first=largest_first,
            accept_margin=LARGEST_FIRST_ACCEPT_MARGIN if largest_first else None,
            ks=ks,
            sequential_seconds=sequential_seconds,
        )

    def _budget(
        self, trainer: PopulationTrainer, n: int, *, compiled: bool = False, sequential_compile: float | None = None
    ) -> Budget | None:
        """What measuring ``n`` trials' programs may cost (``None``: no budget, or a fake timer).
        ``compiled``: the programs are compiled already (in the background): timing them is the cost.
        ``sequential_compile``: the sequential step's first compile when it was measured already
        (a lead trial's: :meth:`_run_lead`)."""
        if self.measure_budget is None or self.timer is not time_call:
            return None

        def seq_compile() -> float:
            if sequential_compile is not None:
                return sequential_compile
            return 0.0 if compiled else trainer.sequential_compile_seconds

        return Budget(
            trials=n,
            steps=trainer.steps,
            fraction=self.measure_budget,
            clock=time.perf_counter,
            compile_seconds=lambda k: 0.0 if compiled else trainer.compile_seconds.get(k, 0.0),
            timed_steps=(1 + TIMED_REPEATS) * trainer.block_steps,
            sequential_timed_steps=(1 + TIMED_REPEATS) * _probe_steps(trainer),
            sequential_compile=seq_compile,
        )

    def _run_plain(
        self, trainer, members, positions, number, progress, plotter, why, *, until: Callable[[], bool] | None = None
    ) -> Generator[Outcome, None, int]:
        """Trials ``positions`` trained exactly as the sequential executor trains them (each stage's
        own jitted step), one after another; only the untrained bundle (``trainer.bundle``: a
        :class:`PopulationTrainer` or :class:`SeedBundles`) and the curves' figure are shared.
        With ``until``, it is asked before each trial and the trials stop once it says so.
        Returns (as the generator's value) how many trials trained."""
        from research.run import RunHooks  # pylint: disable=import-outside-toplevel

        note = f"population {number}: one after another as the sequential executor trains" + (
            f" ({why})" if why else ""
        )
        trained = 0
        for index in positions:
            if until is not None and until():
                break
            hooks = RunHooks(bundle=functools.partial(trainer.bundle, index), plot=plotter)
            yield run_one(members[index], progress=progress, note=note, hooks=hooks)
            trained += 1
        return trained

    def _run_chunk(
        self, trainer, jobs, indices, k, number, progress, plotter, entry, *, start=0, states=None
    ) -> Iterator[Outcome]:
        from research.run import RunHooks  # pylint: disable=import-outside-toplevel

        t_chunk = time.perf_counter()
        measurer = PopulationMeasurer(number, self._latencies)

        def save(step, j, state, metrics, val_rows):  # a checkpoint where a sequential run saves one
            with WorkdirLock(jobs[j].run_dir):
                save_progress(_stage_dir(jobs[j]), step, state, metrics, start, val_rows)

        try:
            results = trainer.train(indices, k, start=start, states=states, on_checkpoint=save)
            keys = [j.key for j in jobs]
            measurer.evaluate(0, keys, [r.model for r in results], [trainer.bundle(i).dataset for i in indices], k)
        except Exception as e:  # the chunk's program failed: its trials run alone
            note = f"population {number}: chunk failed ({type(e).__name__}: {e}); one after another"
            for job in jobs:
                yield run_one(job, progress=progress, note=note)
            return
        # Each trial's run() in its own thread, one at a time: a later stage's fine-tuning waits
        # for the chunk's other trials and trains with them (research.population.later).
        threads = []
        for job, index, result in zip(jobs, indices, results, strict=True):
            hooks = RunHooks(
                bundle=functools.partial(trainer.bundle, index), measure=measurer.for_trial(job.key), plot=plotter
            )
            target = functools.partial(
                run_one,
                job,
                progress=progress,
                prepared={0: _trained_stage(result, k, measurer.val_row(job.key, 0), number)},
                note=f"population {number}, chunk of {k}" if k > 1 else f"population {number}, one at a time (K=1)",
                hooks=hooks,
            )
            threads.append(TrialThread(target, FINE_TUNE_RUNNER))
        for t in threads:
            t.resume()
        while any(t.request is not None for t in threads):
            waiting = [t for t in threads if t.request is not None]
            replies = self._fine_tune_together(waiting, jobs, threads, k, number, measurer, entry)
            for t in waiting:
                t.resume(replies.get(id(t)))
        per_trial = (time.perf_counter() - t_chunk) / len(jobs)
        for t in threads:
            if t.outcome is None:  # its thread ended without an outcome (run_one never raises an Exception)
                continue
            t.outcome.seconds = per_trial  # the chunk's wall time, shared out
            yield t.outcome

    def _fine_tune_together(self, waiting, jobs, threads, k, number, measurer, entry) -> dict[int, Any]:
        """Trains the waiting trials' fine-tuning requests, those with one program key together;
        returns ``{id(thread): (model, records, (defs, state), notes)}`` (absent: trains alone)."""
        groups: dict[Any, list] = {}
        keys: dict[int, Any] = {}
        unhashable: dict[int, str] = {}
        for t in waiting:
            try:
                key = request_key(t.request)
                hash(key)
            except Exception as e:  # e.g. an unhashable step key: it trains alone, as in a plain run
                key, unhashable[id(t)] = None, f"its program key is not hashable ({type(e).__name__}: {e})"
            keys[id(t)] = key
            if key is not None:
                groups.setdefault(key, []).append(t)
        for t in waiting:  # why a fine-tuning trains alone (its own jitted step, as in a plain run)
            if keys[id(t)] is None or len(groups[keys[id(t)]]) < 2:
                others = [keys[id(o)] for o in waiting if o is not t]
                why = unhashable.get(id(t)) or alone_reason(t.request, keys[id(t)], others)
                trial = jobs[threads.index(t)].key
                entry.setdefault("later_alone", []).append({"stage": t.request.stage, "trial": trial, "why": why})
        replies: dict[int, Any] = {}
        for key, members in groups.items():
            if len(members) < 2:
                continue
            requests = [t.request for t in members]
            try:
                trained = train_requests(
                    requests, key, k, block_steps=self.block_steps, devices=self.devices, cache=self._programs
                )
                results = trained.results
                trials = [jobs[threads.index(t)].key for t in members]
                stage = requests[0].stage
                measurer.evaluate(
                    stage, trials, trained.models, [q.dataset for q in requests], k, same_as=[r.model for r in results]
                )
            except Exception as e:  # the group's program failed: each trains alone
                entry.setdefault("later_stages", []).append(
                    {"stage": requests[0].stage, "error": f"{type(e).__name__}: {e}; trained one after another"}
                )
                continue
            later = {"stage": stage, "trials": trials, "k": k}
            notes = [
                f"fine-tuned in a population of {len(members)} (chunks of {k}, one vmapped program); "
                "its validation and test accuracy evaluated together",
                (LATENCY_NOTE_SIZES if trained.padded or trained.lifted else LATENCY_NOTE).format(
                    population=number, stage=stage
                ),
            ]
            if trained.padded:
                sizes = resizable_layers(trained.models[0])
                later["padded_to"] = {p: list(v) for p, v in sizes.items()}
                notes.append(
                    "its factorized layers trained padded with zero components to the population's largest "
                    f"ranks ({', '.join(f'{p}: {v}' for p, v in later['padded_to'].items())}), then cut back to its own"
                )
            if trained.lifted:
                later["lifted"] = {p: [list(v) for v in values] for p, values in trained.lifted.items()}
                notes.append(
                    "its quantizers of different bit widths trained with their integer grids as values in the "
                    f"state ({', '.join(f'{p}: {sorted(v[0] for v in vs)}' for p, vs in trained.lifted.items())}), "
                    "then rebuilt at its own"
                )
            entry.setdefault("later_stages", []).append(later)
            for t, trial, request, result, defs in zip(members, trials, requests, results, trained.defs, strict=True):
                try:
                    rows = write_trial(request.kwargs["workdir"], result, measurer.val_row(trial, stage))
                except Exception as e:  # a NaN loss: raised in the trial's own thread
                    replies[id(t)] = e
                    continue
                replies[id(t)] = (result.model, rows, (defs, result.state), notes)
        return replies


def _alone(jobs: Sequence[Job], error: Exception, entry: dict[str, Any], progress: bool) -> Iterator[Outcome]:
    """``jobs`` run one after another, alone: their population failed to build (``error``)."""
    entry.update(k=1, why=f"one after another: the population failed to build ({type(error).__name__}: {error})")
    for job in jobs:
        yield run_one(job, progress=progress, note=entry["why"])


def _probe_steps(trainer: PopulationTrainer) -> int:
    """Steps per timed call of the sequential step (its timings train nothing): as many as one
    block of the population's program, at most :data:`SEQUENTIAL_PROBE_STEPS`; that many for a
    population of single-step blocks (convolutions on a CPU), whose sequential step, timed one
    step per call, would wait for the device after every step, as the sequential executor does
    not (LeNet-5: 342 timed steps/s against 508 in its training loop)."""
    return SEQUENTIAL_PROBE_STEPS if trainer.unlooped else min(trainer.block_steps, SEQUENTIAL_PROBE_STEPS)


def _stage_dir(job: Job) -> str:
    return os.path.join(job.run_dir, workdir_lib.STAGES_DIR, f"0_{job.config.stages[0].kind}")


def _resume_points(
    trainer: PopulationTrainer, jobs: Sequence[Job], positions: Sequence[int] | None = None
) -> dict[int, tuple[Any, int]]:
    """``{position: (train state, step)}`` of the trials whose first stage a killed sweep left
    checkpointed. A trial that will checkpoint (or has a stage directory) first gets what
    :func:`research.run.run` prepares before a stage (``config.json``, the stage's ``key.json``;
    a directory of another config moved aside), so its checkpoints are resumed by any executor.
    ``positions``: only these trials (default: all)."""
    out = {}
    for i in range(len(jobs)) if positions is None else positions:
        job = jobs[i]
        sdir = _stage_dir(job)
        if not (trainer.checkpoint_steps(i) or os.path.isdir(sdir)):
            continue
        with WorkdirLock(job.run_dir):
            workdir_lib.reconcile(job.run_dir, job.config)
            label = os.path.basename(sdir)
            keys = workdir_lib.stage_keys(job.config)
            workdir_lib.prepare_stage_dir(job.run_dir, label, keys[0], workdir_lib.stage_prefix(job.config, 0))
            found = trainer.restore(i, os.path.join(sdir, "checkpoints"))
        if found is not None:
            out[i] = found
    return out


def _first_stage_stored(job: Job) -> bool:
    """Whether the trial's run directory holds its finished first stage (a run killed later on), or
    something :func:`research.run.run` must judge (a legacy or unreadable stage): it runs alone."""
    if not job.config.stages:
        return True
    try:
        return store.is_finished(os.path.join(job.run_dir, "stages", f"0_{job.config.stages[0].kind}"))
    except Exception:  # e.g. a legacy pickle: run() reports it with its fix
        return True


def _trained_stage(result: TrialResult, k: int, val_row: dict[str, float] | None, population: int):
    """A stage function returning the model the population trained (for :func:`research.run.run`);
    ``val_row`` is its validation evaluation (done for the chunk at once), ``None`` without a
    validation split."""
    from research.stages import StageResult

    def stage(bundle, cfg, ctx):
        write_trial(ctx.workdir, result, val_row)
        losses = np.asarray(result.losses, np.float64)
        steps = len(losses)
        metrics = {
            "final_train_loss": float(losses[-1]),
            "train_steps_per_s": steps / result.seconds if result.seconds > 0 else math.inf,
            "train_examples_per_s": steps * min(cfg.batch_size, len(bundle.dataset.x_train)) / result.seconds
            if result.seconds > 0
            else math.inf,
            "population_k": k,
        }
        return StageResult(
            bundle=dataclasses.replace(bundle, model=result.model),
            metrics=metrics,
            notes=[
                f"trained in a population of {k} (one vmapped program); train_steps_per_s is per trial",
                LATENCY_NOTE.format(population=population, stage=ctx.index),
            ],
        )

    return stage
