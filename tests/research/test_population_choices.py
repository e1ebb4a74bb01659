"""Measured chunk sizes kept on disk: a later process (a fresh executor, the process caches emptied)
reads its population's choice back instead of compiling and timing, on the same machine only."""

import json
import os
import types

import jax
import pytest

from research import config as C
from research import sweep as sweep_lib
from research.executors import make_executor
from research.population import choices as choices_lib
from research.population import executor as pop_executor
from research.population.chooser import SEQUENTIAL_K
from research.population.chooser import Candidate
from research.population.chooser import Choice

TINY = """
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    return Config(
        name="tiny",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(TrainStage(steps=6, batch_size=32, checkpoint_every=0, eval_every=0),),
    )
"""
GRID = {"stages.train.learning_rate": [1e-3, 3e-3, 1e-2, 3e-2]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY)
    return C.load_config(str(path))


def _fresh_process(monkeypatch):
    """As a new process: no compiled program, no choice measured in the process."""
    monkeypatch.setattr(pop_executor, "_PROGRAMS", {})
    monkeypatch.setattr(pop_executor, "_CHOICES", {})


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    _fresh_process(monkeypatch)


class CountingTimer:
    """A fake timer (no wall clock): every call costs 1 s, so a chunk of K trials is K times the
    sequential step's throughput; counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, k, fn):
        self.calls += 1
        return 1.0


def _sweep(base, workdir, timer, choices_file):
    executor = make_executor("population", timer=timer, choices_file=choices_file)
    report = sweep_lib.sweep(base, GRID, str(workdir), progress=False, executor=executor)
    assert [p.status for p in report.points] == ["done"] * len(GRID["stages.train.learning_rate"])
    (population,) = report.executor["populations"]
    return report, population


def test_a_later_process_reads_the_measured_choice_back_without_measuring(base, tmp_path, monkeypatch):
    path = str(tmp_path / "choices.json")
    first_timer = CountingTimer()
    first, measured = _sweep(base, tmp_path / "first", first_timer, path)
    assert first_timer.calls > 0 and measured["choice"]["stored"] is None
    stored = json.load(open(path))
    (entry,) = stored["entries"].values()
    assert entry["choice"]["k"] == measured["k"] == 4
    assert entry["population"] == "tiny: 4 trials of mlp on digits"
    assert entry["machine"]["jax"] == jax.__version__

    _fresh_process(monkeypatch)
    second_timer = CountingTimer()
    second, read_back = _sweep(base, tmp_path / "second", second_timer, path)
    assert second_timer.calls == 0, "the stored choice was measured again"
    assert read_back["k"] == 4 and read_back["choice"]["runner"] == "population"
    assert read_back["choice"]["stored"].startswith(path + ", measured ")
    assert "measured by an earlier process on this machine" in read_back["why"]
    assert read_back["choice"]["candidates"] == measured["choice"]["candidates"]
    for a, b in zip(first.points, second.points, strict=True):
        assert a.metrics["test_accuracy"] == pytest.approx(b.metrics["test_accuracy"], abs=1e-6)


def test_a_stored_sequential_choice_trains_the_trials_as_the_sequential_executor_without_a_trainer(
    base, tmp_path, monkeypatch
):
    path = str(tmp_path / "choices.json")

    def sequential_faster(k, fn):
        return 1e-6 if k == SEQUENTIAL_K else 10.0

    _, measured = _sweep(base, tmp_path / "first", sequential_faster, path)
    assert measured["choice"]["runner"] == "sequential"
    _fresh_process(monkeypatch)

    def no_trainer(*args, **kwargs):
        raise AssertionError("a population trainer was built")

    monkeypatch.setattr(pop_executor.PopulationTrainer, "__init__", no_trainer)
    timer = CountingTimer()
    second, read_back = _sweep(base, tmp_path / "second", timer, path)
    assert timer.calls == 0 and read_back["k"] == 1 and read_back["choice"]["runner"] == "sequential"
    assert read_back["choice"]["stored"].startswith(path)
    sequential = sweep_lib.sweep(base, GRID, str(tmp_path / "seq"), progress=False)
    for a, b in zip(sequential.points, second.points, strict=True):
        assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]  # the same path: the same figures
        assert "one after another as the sequential executor trains" in b.note


def test_another_machine_or_other_program_sources_measure_anew(base, tmp_path, monkeypatch):
    path = str(tmp_path / "choices.json")
    _sweep(base, tmp_path / "first", CountingTimer(), path)
    real = choices_lib.machine
    for change in ({"cores": 96}, {"programs": "0" * 16}, {"jaxlib": "0.0.1"}):
        _fresh_process(monkeypatch)
        monkeypatch.setattr(choices_lib, "machine", lambda devices, change=change: {**real(devices), **change})
        timer = CountingTimer()
        _, population = _sweep(base, tmp_path / f"run-{len(os.listdir(tmp_path))}", timer, path)
        assert timer.calls > 0, f"{change}: read back a choice measured elsewhere"
        assert population["choice"]["stored"] is None
    assert len(json.load(open(path))["entries"]) == 4  # one per machine


def test_a_stored_chunk_that_no_longer_fits_in_memory_is_measured_again(base, tmp_path, monkeypatch):
    path = str(tmp_path / "choices.json")
    _, first = _sweep(base, tmp_path / "first", CountingTimer(), path)
    needs = {c["k"]: c["bytes"] for c in first["choice"]["candidates"]}[first["k"]]
    _fresh_process(monkeypatch)
    monkeypatch.setattr(pop_executor, "memory_limit_bytes", lambda device=None: needs - 1)  # now in use elsewhere
    timer = CountingTimer()
    _, population = _sweep(base, tmp_path / "second", timer, path)
    assert timer.calls > 0
    assert population["k"] < first["k"] == 4 and population["choice"]["stored"] is None


def test_an_unreadable_file_is_set_aside_and_the_chunk_size_measured_again(base, tmp_path, capsys):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    timer = CountingTimer()
    _, population = _sweep(base, tmp_path / "run", timer, str(path))
    assert timer.calls > 0 and population["k"] == 4
    assert "could not be read" in capsys.readouterr().err
    (aside,) = [p for p in os.listdir(tmp_path) if p.startswith("choices.json.unreadable-")]
    assert (tmp_path / aside).read_text() == "{not json"  # kept, never deleted
    assert len(json.load(open(path))["entries"]) == 1


def test_a_fixed_chunk_size_is_not_stored(base, tmp_path):
    path = tmp_path / "choices.json"
    executor = make_executor("population", chunk_size=2, choices_file=str(path))
    report = sweep_lib.sweep(base, GRID, str(tmp_path / "run"), progress=False, executor=executor)
    assert report.executor["populations"][0]["k"] == 2
    assert not path.exists()


def test_the_default_file_is_beside_the_jax_compilation_cache_with_the_wall_clock_timer_only(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(choices_lib.ENV, raising=False)
    before = jax.config.jax_compilation_cache_dir
    trainer = types.SimpleNamespace(configs=[object()])
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert choices_lib.default_path() is None
        assert make_executor("population")._store(trainer) is None
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        assert choices_lib.default_path() == str(tmp_path / "env" / choices_lib.FILE_NAME)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cfg"))
        assert choices_lib.default_path() == str(tmp_path / "cfg" / choices_lib.FILE_NAME)
        assert make_executor("population")._store(trainer).path == choices_lib.default_path()
        assert make_executor("population", timer=CountingTimer())._store(trainer) is None  # a test's figures
        assert make_executor("population", choices_file=None)._store(trainer) is None
        monkeypatch.setenv(choices_lib.ENV, "")  # off
        assert choices_lib.default_path() is None
        monkeypatch.setenv(choices_lib.ENV, str(tmp_path / "mine.json"))
        assert make_executor("population")._store(trainer).path == str(tmp_path / "mine.json")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_choice_survives_its_dict():
    choice = Choice(
        k=8,
        candidates=(Candidate(k=8, step_seconds=0.01, trial_steps_per_s=800.0, bytes=1 << 20),),
        reason="largest first",
        memory_limit=1 << 30,
        runner="population",
        sequential_seconds=0.004,
        measuring_seconds=1.5,
        stored="f.json, measured 2026-12-05T00:00:00+00:00",
    )
    assert Choice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice
