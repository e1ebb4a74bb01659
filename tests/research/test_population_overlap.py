"""A population's first trials trained one after another before the rest: while the population's
program compiles in the background (``overlap``), or one lead trial whose training loop times the
sequential step for the chooser (``lead_trial``); the rest train as the faster, with the same answers."""

import json
import os

import numpy as np
import pytest

from research import config as C
from research import run as run_lib
from research import sweep as sweep_lib
from research.executors import make_executor
from research.population import executor as pop_executor
from research.population.background import BackgroundCompile
from research.population.chooser import SEQUENTIAL_K
from research.population.chooser import choose_k
from research.population.trainer import PopulationTrainer
from research.train import loops_slow_down_convolutions
from research.train import split_model

TINY = """
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    return Config(
        name="tiny",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(
            TrainStage(steps=6, batch_size=32, optimizer="adamw", weight_decay=0.5, checkpoint_every=0, eval_every=3),
        ),
    )
"""
GRID = {"stages.train.learning_rate": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY)
    return C.load_config(str(path))


@pytest.fixture(scope="module")
def sequential(base, tmp_path_factory):
    return sweep_lib.sweep(base, GRID, str(tmp_path_factory.mktemp("seq")), progress=False)


@pytest.fixture(scope="module")
def long(base):
    """60 steps, metrics fetched only at the end: a lead trial's loop times stretches of 20."""
    return C.apply_overrides(base, ["stages.0.steps=60", "stages.0.log_every=0", "stages.0.eval_every=0"])


@pytest.fixture(scope="module")
def sequential_long(long, tmp_path_factory):
    return sweep_lib.sweep(long, GRID, str(tmp_path_factory.mktemp("seq_long")), progress=False)


@pytest.fixture(autouse=True)
def fresh_process_caches(monkeypatch):
    """Each test as the first population of a process: no compiled program, no measured choice."""
    monkeypatch.setattr(pop_executor, "_PROGRAMS", {})
    monkeypatch.setattr(pop_executor, "_CHOICES", {})


def faster_in_chunks(k, fn):
    """A fake timer: the sequential step and a chunk of any K cost the same per call (no wall clock)."""
    return 1.0


def _params(run_dir):
    _, model, _ = run_lib.load_run(run_dir)
    return [np.asarray(x) for x in __import__("jax").tree.leaves(split_model(model)[1])]


def _same_results(seq, pop):
    for a, b in zip(seq.points, pop.points, strict=True):
        assert a.status == b.status == "done"
        assert abs(a.metrics["test_accuracy"] - b.metrics["test_accuracy"]) < 1e-6
        for x, y in zip(_params(a.run_dir), _params(b.run_dir), strict=True):
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)


def _ready_after(monkeypatch, trials: int):
    """Makes the background compile report ready exactly once ``trials`` trials have run (it is
    waited for then): the switch point is deterministic."""
    ran = []
    real_run_one, real_done = pop_executor.run_one, BackgroundCompile.done

    def counting(job, **kw):
        ran.append(job.key)
        return real_run_one(job, **kw)

    def done(self):
        if len(ran) < trials:
            return False
        self.join()
        return real_done(self)

    monkeypatch.setattr(pop_executor, "run_one", counting)
    monkeypatch.setattr(BackgroundCompile, "done", done)
    return ran


def test_first_trials_train_alone_while_the_program_compiles_then_the_rest_together(
    base, sequential, tmp_path, monkeypatch
):
    _ready_after(monkeypatch, 2)
    executor = make_executor("population", timer=faster_in_chunks, overlap=True)
    pop = sweep_lib.sweep(base, GRID, str(tmp_path), progress=False, executor=executor)
    (population,) = pop.executor["populations"]
    # 5 trials: K=4 compiled in the background (the largest power of two), ready after 2 trials
    assert population["overlap"]["trained_first"] == 2 and population["overlap"]["k"] == 4
    assert population["overlap"]["tried"][0][0] == 4 and population["overlap"]["compile_seconds"] > 0
    assert population["k"] == 4 and population["choice"]["runner"] == "population"
    assert [c["k"] for c in population["choice"]["candidates"]] == [4]  # the compiled K, its chunk padded
    assert population["why"].startswith("2 trials trained one after another while the population's program compiled")
    assert "the other 3: " in population["why"]
    notes = [p.note for p in pop.points]
    assert all("while its program compiled" in n for n in notes[:2])
    assert all("chunk of 4" in n for n in notes[2:])
    assert [p.metrics.get("population_k") for p in pop.points] == [None, None, 4, 4, 4]
    assert executor._background == []  # joined when the sweep ended
    _same_results(sequential, pop)
    # the CLI's population line says it too
    (line,) = sweep_lib.report_populations(pop.executor)
    assert "K=4" in line and "while the population's program compiled" in line


def test_trials_that_all_finish_before_the_compile_train_as_the_sequential_executor(
    base, sequential, tmp_path, monkeypatch
):
    _ready_after(monkeypatch, 10**6)  # never ready while trials remain
    executor = make_executor("population", timer=faster_in_chunks, overlap=True)
    pop = sweep_lib.sweep(base, GRID, str(tmp_path), progress=False, executor=executor)
    (population,) = pop.executor["populations"]
    assert population["k"] == 1 and population["runner"] == "sequential"
    assert population["overlap"]["trained_first"] == 5 and "not ready before the last trial" in population["why"]
    assert executor._background == []
    _same_results(sequential, pop)


def test_a_population_that_fails_to_compile_in_the_background_trains_the_rest_alone(
    base, sequential, tmp_path, monkeypatch
):
    _ready_after(monkeypatch, 1)

    def broken(self, k, args=None):
        raise RuntimeError("this step does not vmap")

    monkeypatch.setattr(PopulationTrainer, "compiled", broken)
    pop = sweep_lib.sweep(
        base,
        GRID,
        str(tmp_path),
        progress=False,
        executor=make_executor("population", timer=faster_in_chunks, overlap=True),
    )
    (population,) = pop.executor["populations"]
    assert population["k"] == 1 and population["overlap"]["k"] is None
    assert "failed to build (RuntimeError: this step does not vmap)" in population["why"]
    _same_results(sequential, pop)


def test_the_budget_refuses_the_background_compile_before_any_trial_trains(base, sequential, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(BackgroundCompile, "start", lambda self: started.append(self) or self)
    executor = make_executor("population", overlap=True, measure_budget=0.0)  # the wall clock: no time to spend
    pop = sweep_lib.sweep(base, GRID, str(tmp_path), progress=False, executor=executor)
    (population,) = pop.executor["populations"]
    assert not started and "overlap" not in population
    assert population["k"] == 1 and population["choice"]["runner"] == "sequential"
    assert "K=4 and smaller not compiled" in population["why"] and "exceeds the budget" in population["why"]
    assert population["choice"]["sequential_step_seconds"] > 0
    _same_results(sequential, pop)
    with open(os.path.join(pop.workdir, "sweep.json")) as f:
        assert json.load(f)["executor"]["populations"][0]["choice"]["runner"] == "sequential"


def test_no_background_compile_by_default_for_a_fixed_chunk_size_or_a_compiled_program(base):
    configs = [C.apply_overrides(base, [f"stages.0.learning_rate={lr}"]) for lr in GRID["stages.train.learning_rate"]]
    jobs = [pop_executor.Job(key=i, config=c, run_dir="/nonexistent/run") for i, c in enumerate(configs)]
    trainer = PopulationTrainer(configs, cache={})
    assert make_executor("population", chunk_size=2, overlap=True)._start_overlap(trainer, jobs) == (None, None)
    assert make_executor("population")._start_overlap(trainer, jobs) == (None, None)  # off unless asked
    trainer.compiled(2)
    assert make_executor("population", overlap=True)._start_overlap(trainer, jobs) == (None, None)


def test_background_compile_takes_the_largest_chunk_that_fits(base):
    configs = [C.apply_overrides(base, [f"stages.0.learning_rate={lr}"]) for lr in GRID["stages.train.learning_rate"]]
    trainer = PopulationTrainer(configs, cache={})
    big = BackgroundCompile(trainer, [2, 4], memory_limit=10**12).start()
    big.join()
    assert big.done() and big.k == 4 and big.error == "" and [k for k, _ in big.tried] == [4]
    four, two = trainer.memory[4], None
    trainer = PopulationTrainer(configs, cache={})
    fits_two = BackgroundCompile(trainer, [4, 2], memory_limit=four - 1).start()
    fits_two.join()
    two = trainer.memory[2]
    assert two < four and fits_two.k == 2 and [k for k, _ in fits_two.tried] == [4, 2]
    trainer = PopulationTrainer(configs, cache={})
    none_fit = BackgroundCompile(trainer, [4, 2], memory_limit=two - 1).start()
    none_fit.join()
    assert none_fit.k is None and "no chunk size fits" in none_fit.error and f"{four:,}" in none_fit.error
    with pytest.raises(ValueError, match="no chunk sizes"):
        BackgroundCompile(trainer, [], memory_limit=1)


def test_the_chooser_times_given_chunk_sizes_padded():
    timed = []

    def measure(k):
        timed.append(k)
        return 1.0, 0

    choice = choose_k(3, measure, memory_limit=10, sequential=lambda: 1.0, largest_first=True, ks=[4])
    assert set(timed) == {4} and choice.k == 4
    (candidate,) = choice.candidates
    assert candidate.trial_steps_per_s == pytest.approx(3.0)  # 3 trials in one padded chunk of 4 per second
    seq_calls = []
    choice = choose_k(
        3,
        measure,
        memory_limit=10,
        sequential=lambda: seq_calls.append(1) or 1.0,
        largest_first=True,
        ks=[4],
        sequential_seconds=2.0,
        confirm_rounds=0,
    )
    assert not seq_calls and choice.sequential_seconds == 2.0  # timed before: not timed again
    assert SEQUENTIAL_K == 0


# ----------------------------------------------------------------------------- a lead trial


class ChunksFaster:
    """A fake timer (no wall clock) under which every population program steps far faster than
    the sequential step; records the ``k`` of each call in order."""

    def __init__(self):
        self.ks = []

    def __call__(self, k, fn):
        self.ks.append(k)
        return 1.0 if k == SEQUENTIAL_K else 1e-9


def test_the_first_trial_trains_alone_timed_and_the_rest_are_measured_against_it(
    long, sequential_long, tmp_path, monkeypatch
):
    timer = ChunksFaster()
    probes = []
    real = PopulationTrainer.sequential_step_seconds
    monkeypatch.setattr(
        PopulationTrainer, "sequential_step_seconds", lambda self, *a, **k: probes.append(1) or real(self, *a, **k)
    )
    executor = make_executor("population", timer=timer, lead_trial=True)
    pop = sweep_lib.sweep(long, GRID, str(tmp_path), progress=False, executor=executor)
    (population,) = pop.executor["populations"]
    lead = population["lead"]
    # 60 steps, fetched only at the end (log_every=0): stretches of 20 waited for
    assert lead["trial"] == population["trials"][0]
    assert [s[0] for s in lead["stretches"]] == [20, 20, 20]
    assert lead["sequential_step_seconds"] > 0 and lead["compile_seconds"] >= 0
    # the first population program is timed before the sequential step is (its pace came from the lead)
    assert timer.ks[0] != SEQUENTIAL_K
    assert population["why"].startswith(f"trial {lead['trial']} trained first as the sequential executor trains it")
    assert "the other 4: " in population["why"]
    # the Ks of 5 trials, measured for the other 4 (K=4: one chunk, trial steps per second = 4 / seconds)
    choice = population["choice"]
    assert population["k"] == 4 and choice["runner"] == "population"
    by_k = {c["k"]: c for c in choice["candidates"]}
    assert by_k[4]["trial_steps_per_s"] == pytest.approx(4 / by_k[4]["step_seconds"])
    assert choice["sequential_step_seconds"] is not None
    notes = [p.note for p in pop.points]
    assert "trained first, its steps timed for the chooser" in notes[0]
    assert all("chunk of 4" in n for n in notes[1:])
    assert [p.metrics.get("population_k") for p in pop.points] == [None, 4, 4, 4, 4]
    _same_results(sequential_long, pop)
    # the sequential step is never timed apart: the lead's pace needs no confirming rounds
    assert probes == [] and SEQUENTIAL_K not in timer.ks


def test_programs_slower_than_the_lead_trials_pace_leave_the_rest_to_the_sequential_path(
    long, sequential_long, tmp_path
):
    executor = make_executor("population", timer=lambda k, fn: 10.0, lead_trial=True)  # 10 s per call
    pop = sweep_lib.sweep(long, GRID, str(tmp_path), progress=False, executor=executor)
    (population,) = pop.executor["populations"]
    assert population["k"] == 1 and population["choice"]["runner"] == "sequential"
    assert "the sequential executor's own jitted step is at least as fast" in population["why"]
    assert all("one after another as the sequential executor trains" in p.note for p in pop.points)
    _same_results(sequential_long, pop)


def test_too_few_steps_timed_and_the_chooser_times_the_sequential_step_itself(long, tmp_path):
    short = C.apply_overrides(long, ["stages.0.steps=15"])
    timer = ChunksFaster()
    executor = make_executor("population", timer=timer, lead_trial=True)
    pop = sweep_lib.sweep(short, GRID, str(tmp_path), progress=False, executor=executor)
    (population,) = pop.executor["populations"]
    assert [s[0] for s in population["lead"]["stretches"]] == [15]
    assert population["lead"]["sequential_step_seconds"] is None
    assert timer.ks[0] == SEQUENTIAL_K  # timed first, as without a lead trial
    assert population["k"] == 4 and [p.status for p in pop.points] == ["done"] * 5


def test_no_lead_trial_for_a_fixed_chunk_size_or_when_switched_off(long, sequential_long, tmp_path):
    fixed = make_executor("population", timer=ChunksFaster(), lead_trial=True, chunk_size=2)
    pop = sweep_lib.sweep(long, GRID, str(tmp_path / "fixed"), progress=False, executor=fixed)
    (population,) = pop.executor["populations"]
    assert "lead" not in population and population["k"] == 2
    timer = ChunksFaster()
    off = make_executor("population", timer=timer, lead_trial=False)
    pop = sweep_lib.sweep(long, GRID, str(tmp_path / "off"), progress=False, executor=off)
    (population,) = pop.executor["populations"]
    assert "lead" not in population and timer.ks[0] == SEQUENTIAL_K
    _same_results(sequential_long, pop)


def test_by_default_a_lead_trial_with_the_wall_clock_timer_on_a_cpu_only(base):
    trainer = PopulationTrainer([base] * 3, cache={})
    jobs = [pop_executor.Job(key=i, config=base, run_dir="/nonexistent/run") for i in range(3)]
    assert pop_executor.PopulationExecutor()._leads(trainer, jobs, None)
    assert not pop_executor.PopulationExecutor(timer=ChunksFaster())._leads(trainer, jobs, None)
    assert not pop_executor.PopulationExecutor(lead_trial=False)._leads(trainer, jobs, None)
    assert not pop_executor.PopulationExecutor()._leads(trainer, jobs[:1], None)  # a single trial


def test_the_convolution_check_traces_the_sequential_step_that_the_sequential_path_then_calls(base, monkeypatch):
    from research.train import losses

    traced = []
    real = losses.cross_entropy_loss

    def counting(model, batch, rng):
        traced.append(1)
        return real(model, batch, rng)

    monkeypatch.setattr(losses, "cross_entropy_loss", counting)
    trainer = PopulationTrainer([base] * 2, cache={})
    # the convolution check (made where loops slow convolutions down: a CPU) traced the sequential
    # executor's jitted step ...
    assert len(traced) == int(loops_slow_down_convolutions())
    trainer.sequential_step_seconds(lambda k, fn: fn() and 1.0, steps=2)
    assert len(traced) == 1  # ... and its call reused that trace
