"""Successive halving, Hyperband, ASHA and BOHB."""

import math

import pytest

from research.automl import ASHA
from research.automl import BOHBSampler
from research.automl import Float
from research.automl import Hyperband
from research.automl import RandomSampler
from research.automl import Space
from research.automl import Study
from research.automl import SuccessiveHalving
from research.automl import TrialState

SPACE = Space({"x": Float(0.0, 1.0), "y": Float(0.0, 1.0)})


def _objective(p, budget):
    # Lower budgets are noisier versions of the full-budget loss.
    return (p["x"] - 0.3) ** 2 + (p["y"] - 0.6) ** 2 + 0.1 / budget


def test_hyperband_bracket_sizes():
    hb = Hyperband(min_budget=1, max_budget=27, eta=3)
    assert hb.s_max == 3
    assert [hb.n_configs(s) for s in (3, 2, 1, 0)] == [27, 12, 6, 4]
    assert [hb.budget(3, i) for i in range(4)] == pytest.approx([1, 3, 9, 27])
    assert [hb.n_configs(3, i) for i in range(4)] == [27, 9, 3, 1]


def test_successive_halving_promotes_the_best_third():
    study = Study(SPACE, sampler=RandomSampler(seed=0), scheduler=SuccessiveHalving(1, 9, eta=3))
    study.optimize(_objective, n_trials=9 + 3 + 1, show_progress_bar=False)
    trials = study.trials
    assert len(trials) == 9
    at1 = sorted(trials, key=lambda t: t.intermediate[1.0])
    promoted = {t.id for t in trials if 3.0 in t.intermediate}
    assert promoted == {t.id for t in at1[:3]}
    complete = study.trials_in(TrialState.COMPLETE)
    assert len(complete) == 1 and complete[0].budget == 9.0
    assert len(study.trials_in(TrialState.PRUNED)) == 8
    best3 = min((t for t in trials if 3.0 in t.intermediate), key=lambda t: t.intermediate[3.0])
    assert complete[0].id == best3.id


def test_asha_promotes_without_waiting_and_failed_are_never_promoted():
    study = Study(SPACE, sampler=RandomSampler(seed=1), scheduler=ASHA(1, 9, eta=3))

    def f(p, budget):
        return math.nan if p["x"] < 0.1 else _objective(p, budget)

    study.optimize(f, n_trials=40, show_progress_bar=False)
    trials = study.trials
    assert any(3.0 in t.intermediate for t in trials)
    assert study.trials_in(TrialState.COMPLETE)
    for t in trials:
        if t.state == TrialState.FAILED:
            assert int(t.attrs.get("rung", 0)) == 0 or t.params["x"] < 0.1
        if 3.0 in t.intermediate:  # promoted from rung 0: in the top third when promoted
            assert math.isfinite(t.intermediate[1.0])


def test_bohb_runs_hyperband_and_resumes_from_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'bohb.db'}"
    study = Study(SPACE, sampler=BOHBSampler(seed=0), scheduler=Hyperband(1, 9, 3), storage=url,
                  name="b")  # fmt: skip
    study.optimize(_objective, n_trials=25, show_progress_bar=False)
    again = Study(SPACE, sampler=BOHBSampler(seed=0), scheduler=Hyperband(1, 9, 3), storage=url,
                  name="b")  # fmt: skip
    n_before = len(again.trials)
    again.optimize(_objective, n_trials=20, show_progress_bar=False)
    assert len(again.trials) >= n_before
    assert again.best_value < 0.2
    brackets = {t.attrs["bracket"] for t in again.trials}
    assert len(brackets) >= 2


def test_scheduler_validation():
    with pytest.raises(ValueError, match="eta"):
        Hyperband(1, 9, eta=1)
    with pytest.raises(ValueError, match="one objective"):
        Study(SPACE, direction=["minimize", "minimize"], scheduler=ASHA(1, 9))
