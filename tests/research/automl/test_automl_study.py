"""Study ask/tell semantics and durable SQLite storage (killed process, reopened)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from research.automl import Float
from research.automl import InMemoryStorage
from research.automl import RandomSampler
from research.automl import Space
from research.automl import SQLiteStorage
from research.automl import Study
from research.automl import TrialState

SPACE = Space({"x": Float(-1.0, 1.0)})
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(params=["memory", "sqlite"])
def storage(request, tmp_path):
    if request.param == "memory":
        return InMemoryStorage()
    return SQLiteStorage(tmp_path / "s.db")


def test_ask_tell_best_and_failures(storage):
    study = Study(SPACE, sampler=RandomSampler(seed=0), storage=storage, name="s")
    trials = study.ask(4)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    study.tell(trials[0], 0.5)
    study.tell(trials[1], float("nan"))
    study.tell(trials[2], exception=RuntimeError("boom"))
    assert study.best_trial.number == 0
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAILED, TrialState.FAILED, TrialState.RUNNING]
    assert "boom" in study.trials[2].attrs["error"]
    assert [t.number for t in study.pending_trials] == [3]
    with pytest.raises(ValueError, match="not RUNNING"):
        study.tell(trials[0], 1.0)
    with pytest.raises(ValueError, match="2 value"):
        study.tell(trials[3], [1.0, 2.0])


def test_optimize_marks_raised_exceptions_failed_and_maximizes():
    def f(p):
        if p["x"] > 0.5:
            raise ValueError("diverged")
        return p["x"]

    study = Study(SPACE, sampler=RandomSampler(seed=3), direction="maximize")
    seen = []
    study.optimize(f, n_trials=20, batch_size=3, callbacks=[lambda s, t: seen.append(t.number)])
    assert len(study.trials) == 20 and sorted(seen) == list(range(20))
    failed = study.trials_in(TrialState.FAILED)
    assert failed and all(t.params["x"] > 0.5 for t in failed)
    best = study.best_value
    assert best == max(t.values[0] for t in study.trials_in(TrialState.COMPLETE))


def test_bad_arguments():
    with pytest.raises(ValueError, match="direction"):
        Study(SPACE, direction="up")
    with pytest.raises(TypeError, match="Space"):
        Study({"x": Float(0, 1)})
    with pytest.raises(ValueError, match="storage"):
        Study(SPACE, storage="postgres://x")
    with pytest.raises(ValueError, match="no complete trial"):
        _ = Study(SPACE).best_trial


def test_reopen_requires_same_space(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    Study(SPACE, storage=url, name="s")
    with pytest.raises(ValueError, match="different search space"):
        Study(Space({"x": Float(0.0, 2.0)}), storage=url, name="s")


_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from research.automl import Float, Space, Study, TPESampler
    study = Study(Space({{"x": Float(-1.0, 1.0)}}), sampler=TPESampler(seed=0, n_startup_trials=3),
                  storage="sqlite:///{db}", name="crash")
    for _ in range({n}):
        (t,) = study.ask()
        study.tell(t, (t.params["x"] - 0.3) ** 2)
    study.ask()  # a pending trial held by the worker when it dies
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_worker_loses_nothing_and_study_continues(tmp_path):
    db = tmp_path / "crash.db"
    code = _WORKER.format(root=ROOT, db=db, n=6)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    study = Study(SPACE, storage=f"sqlite:///{db}", name="crash")
    trials = study.trials
    assert len(trials) == 7
    assert [t.state for t in trials[:6]] == [TrialState.COMPLETE] * 6
    assert trials[6].state == TrialState.RUNNING and trials[6].number == 6
    for t in trials[:6]:
        assert t.values[0] == pytest.approx((t.params["x"] - 0.3) ** 2)
    study.tell(trials[6], exception=RuntimeError("worker died"))
    study.optimize(lambda p: (p["x"] - 0.3) ** 2, n_trials=3, show_progress_bar=False)
    assert len(study.trials) == 10 and study.trials[-1].number == 9
    assert study.best_value == min(t.values[0] for t in study.trials_in(TrialState.COMPLETE))


def test_two_writers_on_one_file_do_not_lock_out(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    a = Study(SPACE, sampler=RandomSampler(seed=1), storage=url, name="w")
    b = Study(SPACE, sampler=RandomSampler(seed=2), storage=url, name="w")
    for _ in range(5):
        for s in (a, b):
            (t,) = s.ask()
            s.tell(t, t.params["x"])
    numbers = [t.number for t in a.trials]
    assert numbers == list(range(10)) and len(b.trials) == 10
    assert np.all([t.state == TrialState.COMPLETE for t in b.trials])
