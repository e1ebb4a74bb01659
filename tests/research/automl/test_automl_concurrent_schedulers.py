"""ASHA and Hyperband with several worker processes on one SQLite study.

Every worker runs ``Study.optimize`` on the same study file at once. Promotions are claimed in
the store (an atomic ``PAUSED -> RUNNING`` transition at the planned rung), so no two workers
evaluate the same promotion, no worker dies on a trial another one took, Hyperband brackets
are never overfilled, and the evaluations add up exactly.
"""

import collections
import multiprocessing
import os
import random
import time
import traceback

import pytest

from research.automl import ASHA
from research.automl import Float
from research.automl import Hyperband
from research.automl import RandomSampler
from research.automl import Space
from research.automl import SQLiteStorage
from research.automl import Study
from research.automl import TrialState

pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
EVALS_PER_WORKER = 12
MIN_BUDGET, MAX_BUDGET, ETA = 1, 9, 3


def _worker(db, kind, evals, log, worker):
    """One worker process: ``Study.optimize`` on the shared study, logging every evaluation."""
    try:
        scheduler = {"asha": ASHA, "hyperband": Hyperband}[kind](min_budget=MIN_BUDGET, max_budget=MAX_BUDGET, eta=ETA)
        study = Study(
            Space({"x": Float(-1.0, 1.0)}),
            sampler=RandomSampler(seed=worker),
            storage="sqlite:///" + db,
            name="shared",
            scheduler=scheduler,
        )
        rng = random.Random(worker)

        def objective(params, budget):
            time.sleep(rng.uniform(0.0, 0.01))  # widen the window between ask and tell
            return (params["x"] - 0.3) ** 2 + 1.0 / budget

        def record(study, trial):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, f"{trial.id} {trial.budget} {worker}\n".encode())
            finally:
                os.close(fd)

        study.optimize(objective, n_trials=evals, callbacks=[record], show_progress_bar=False)
    except BaseException:
        with open(f"{log}.error{worker}", "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_workers(tmp_path, kind, n_workers):
    db, log = str(tmp_path / "study.db"), str(tmp_path / "evals.log")
    SQLiteStorage(db).close()  # create the schema once, before the workers race
    # Real processes, each with its own SQLite connection. Forked, so no worker imports JAX
    # again (spawn or a fork server costs seconds per worker). JAX warns about forking a
    # process that ran it; the workers never call JAX (stdlib sqlite3, numpy and the random
    # sampler only), so none of its threads' locks is needed after the fork.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(db, kind, EVALS_PER_WORKER, log, w)) for w in range(n_workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    errors = [open(f"{log}.error{w}").read() for w in range(n_workers) if os.path.exists(f"{log}.error{w}")]
    assert not errors, errors[0]
    assert [p.exitcode for p in procs] == [0] * n_workers
    with open(log) as f:
        evals = [(int(tid), float(b)) for tid, b, _ in (line.split() for line in f)]
    storage = SQLiteStorage(db)
    (sid,) = [r[0] for r in storage._read("SELECT id FROM studies WHERE name = 'shared'")]
    trials = storage.get_trials(sid)
    storage.close()
    return evals, trials


def _check_common(evals, trials, n_workers, scheduler):
    # Exact counts: every worker ran its evaluations, each (trial, budget) exactly once.
    assert len(evals) == n_workers * EVALS_PER_WORKER
    dupes = [k for k, c in collections.Counter(evals).items() if c > 1]
    assert not dupes, f"promotions evaluated twice: {dupes}"
    assert sum(len(t.intermediate) for t in trials) == len(evals)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    by_trial = collections.defaultdict(list)
    for tid, b in evals:
        by_trial[tid].append(b)
    for t in trials:
        brackets = getattr(scheduler, "brackets", [scheduler.s_max])  # ASHA: one bracket
        s = brackets[int(t.attrs["bracket"]) % len(brackets)]
        ladder = [scheduler.budget(s, i) for i in range(int(t.attrs["rung"]) + 1)]
        # A trial was evaluated once per rung it reached, in rung order, and stored the same.
        assert sorted(by_trial[t.id]) == pytest.approx(ladder), (t, by_trial[t.id])
        assert sorted(t.intermediate) == pytest.approx(ladder)


@pytest.mark.parametrize("n_workers", [2, 4])
def test_asha_workers_never_share_a_promotion(tmp_path, n_workers):
    evals, trials = _run_workers(tmp_path, "asha", n_workers)
    scheduler = ASHA(MIN_BUDGET, MAX_BUDGET, ETA)
    _check_common(evals, trials, n_workers, scheduler)
    promoted = [t for t in trials if int(t.attrs["rung"]) > 0]
    assert promoted, "the run is long enough for ASHA to promote"
    assert all(t.state in (TrialState.PAUSED, TrialState.COMPLETE) for t in trials)


@pytest.mark.parametrize("n_workers", [2, 4])
def test_hyperband_workers_never_overfill_a_bracket(tmp_path, n_workers):
    evals, trials = _run_workers(tmp_path, "hyperband", n_workers)
    scheduler = Hyperband(MIN_BUDGET, MAX_BUDGET, ETA)
    _check_common(evals, trials, n_workers, scheduler)
    brackets = collections.defaultdict(list)
    for t in trials:
        brackets[int(t.attrs["bracket"])].append(t)
    for k, members in brackets.items():
        s = scheduler.brackets[k % len(scheduler.brackets)]
        for i in range(s + 1):
            reached = sum(int(t.attrs["rung"]) >= i for t in members)
            assert reached <= scheduler.n_configs(s, i), (k, i, reached)
    full = brackets[0]
    assert len(full) == scheduler.n_configs(scheduler.brackets[0], 0)
    assert any(int(t.attrs["rung"]) > 0 for t in full), "bracket 0 was completed and promoted"


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_transition_is_compare_and_set_and_cap_limits_a_group(tmp_path, kind):
    from research.automl import InMemoryStorage

    storage = InMemoryStorage() if kind == "memory" else SQLiteStorage(tmp_path / "s.db")
    sid = storage.create_study("s", ["minimize"], {}, load_if_exists=True)
    t = storage.create_trial(sid, {"x": 0.0}, budget=1.0, attrs={"bracket": 0, "rung": 0})
    storage.update_trial(t.id, state=TrialState.PAUSED, intermediate=(1.0, 0.5))
    # Wrong rung or wrong state: nothing changes.
    assert not storage.transition(t.id, TrialState.PAUSED, TrialState.RUNNING, expect_attrs={"rung": 1})
    assert not storage.transition(t.id, TrialState.RUNNING, TrialState.COMPLETE)
    assert storage.get_trial(t.id).state == TrialState.PAUSED
    # The first claim wins; the second finds the trial no longer paused.
    claim = {"expect_attrs": {"rung": 0}, "budget": 3.0, "attrs": {"rung": 1}}
    assert storage.transition(t.id, TrialState.PAUSED, TrialState.RUNNING, **claim)
    assert not storage.transition(t.id, TrialState.PAUSED, TrialState.RUNNING, **claim)
    got = storage.get_trial(t.id)
    assert (got.state, got.budget, got.attrs) == (TrialState.RUNNING, 3.0, {"bracket": 0, "rung": 1})
    with pytest.raises(KeyError, match="no trial with id 999"):
        storage.transition(999, TrialState.PAUSED, TrialState.RUNNING)
    # cap: at most 2 trials in bracket 0 (one exists), any number in bracket 1.
    assert storage.create_trial(sid, {"x": 0.1}, attrs={"bracket": 0}, cap=("bracket", 0, 2)) is not None
    assert storage.create_trial(sid, {"x": 0.2}, attrs={"bracket": 0}, cap=("bracket", 0, 2)) is None
    assert storage.create_trial(sid, {"x": 0.3}, attrs={"bracket": 1}, cap=("bracket", 1, 2)) is not None
    assert [tr.number for tr in storage.get_trials(sid)] == [0, 1, 2]
