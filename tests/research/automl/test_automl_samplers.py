"""Shared conformance test run over every sampler."""

import math

import numpy as np
import pytest

from research.automl import BOHBSampler
from research.automl import EHVISampler
from research.automl import GPSampler
from research.automl import MOTPESampler
from research.automl import QMCSampler
from research.automl import RandomSampler
from research.automl import Study
from research.automl import TPESampler
from research.automl import TrialState
from research.automl import list_samplers
from research.automl import make_sampler
from research.automl.testfunctions import conditional
from research.automl.testfunctions import conditional_space

SMALL_GP = dict(n_candidates=128, n_local=32, n_starts=4, ascent_steps=8, n_screen=8)

SAMPLERS = {
    "random": lambda seed: RandomSampler(seed=seed),
    "qmc": lambda seed: QMCSampler(seed=seed),
    "gp": lambda seed: GPSampler(seed=seed, n_startup_trials=4, **SMALL_GP),
    "tpe": lambda seed: TPESampler(seed=seed, n_startup_trials=4),
    "tpe_multivariate": lambda seed: TPESampler(seed=seed, n_startup_trials=4, multivariate=True),
    "bohb": lambda seed: BOHBSampler(seed=seed, n_startup_trials=4),
    "ehvi": lambda seed: EHVISampler(
        seed=seed, n_startup_trials=4, n_candidates=128, n_local=32, n_mc=16, gp_options=SMALL_GP
    ),
    "motpe": lambda seed: MOTPESampler(seed=seed, n_startup_trials=4),
}


def _objective(params):
    if params.get("knob", 0.0) > 0.9:
        return float("nan")  # some failures, which must never reach a model
    return conditional(params)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_conformance(name):
    space = conditional_space()
    study = Study(space, sampler=SAMPLERS[name](0))
    study.optimize(_objective, n_trials=9, show_progress_bar=False)
    batch = study.ask(3)
    assert len(batch) == 3
    for t in study.trials:
        space.validate(t.params)  # only active parameters, valid values
        for k, v in t.params.items():
            p = space[k]
            if hasattr(p, "choices"):
                assert v in p.choices
            elif isinstance(v, int):
                assert p.low <= v <= p.high and type(p).__name__ == "Int"
            else:
                assert p.low <= v <= p.high
    assert len({tuple(sorted(t.params.items())) for t in batch}) == 3
    assert all(t.state == TrialState.RUNNING for t in batch)
    assert all(t.state != TrialState.RUNNING for t in study.trials[:9])
    # Same seed, same history -> same proposals.
    again = Study(space, sampler=SAMPLERS[name](0))
    again.optimize(_objective, n_trials=9, show_progress_bar=False)
    assert [t.params for t in again.trials] == [t.params for t in study.trials[:9]]


@pytest.mark.parametrize("name", ["random", "qmc", "tpe", "ehvi", "motpe"])
def test_multi_objective(name):
    space = conditional_space()
    study = Study(space, sampler=SAMPLERS[name](1), direction=["minimize", "maximize"])
    study.optimize(lambda p: (conditional(p), len(p)), n_trials=12, show_progress_bar=False)
    front = study.pareto_front()
    assert front
    vals = np.array([t.values for t in study.trials_in(TrialState.COMPLETE)])
    for t in front:
        dominated = np.any(
            (vals[:, 0] <= t.values[0]) & (vals[:, 1] >= t.values[1])
            & ((vals[:, 0] < t.values[0]) | (vals[:, 1] > t.values[1]))
        )  # fmt: skip
        assert not dominated


def test_registry_refuses_duplicates_and_lists():
    from research.automl import register_sampler

    assert {"random", "qmc", "gp", "tpe", "bohb"} <= set(list_samplers())
    assert isinstance(make_sampler("qmc", seed=2), QMCSampler)
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("tpe")(type("X", (), {}))
    with pytest.raises(KeyError, match="registered"):
        make_sampler("nope")


def test_gp_finds_the_conditional_optimum_region():
    study = Study(conditional_space(), sampler=SAMPLERS["gp"](0))
    study.optimize(conditional, n_trials=14, show_progress_bar=False)
    assert study.best_value < 0.3 and math.isfinite(study.best_value)
