"""Shared conformance test run over every sampler."""

import math

import numpy as np
import pytest

from research.automl import QMCSampler
from research.automl import Study
from research.automl import TrialState
from research.automl import list_samplers
from research.automl import make_sampler
from research.automl.testfunctions import conditional
from research.automl.testfunctions import conditional_space

SMALL_GP = dict(n_candidates=128, n_local=32, n_starts=4, ascent_steps=8, n_screen=8)

# Fast settings for the registered samplers that have them; a sampler registered later (any
# module) is tested as make_sampler(name, seed=seed) without editing this file.
FAST = {
    "gp": dict(n_startup_trials=4, **SMALL_GP),
    "tpe": dict(n_startup_trials=4),
    "bohb": dict(n_startup_trials=4),
    "ehvi": dict(n_startup_trials=4, n_candidates=128, n_local=32, n_mc=16, gp_options=SMALL_GP),
    "motpe": dict(n_startup_trials=4),
    "evolution": dict(population=4, tournament=2),
}
VARIANTS = {"tpe_multivariate": ("tpe", dict(n_startup_trials=4, multivariate=True))}


def sampler_factory(name):
    """``seed -> Sampler`` for a registered name or a variant (fast settings where known)."""
    base, options = VARIANTS.get(name, (name, FAST.get(name, {})))
    return lambda seed: make_sampler(base, seed=seed, **options)


SAMPLERS = {name: sampler_factory(name) for name in [*list_samplers(), *VARIANTS]}


def _objective(params):
    if params.get("knob", 0.0) > 0.9:
        return float("nan")  # some failures, which must never reach a model
    return conditional(params)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_conformance(name):
    check_sampler(SAMPLERS[name])


def check_sampler(make):
    """The shared checks for a sampler built by ``make(seed)`` (also used by tests/test_extension_points.py)."""
    space = conditional_space()
    study = Study(space, sampler=make(0))
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
    again = Study(space, sampler=make(0))
    again.optimize(_objective, n_trials=9, show_progress_bar=False)
    assert [t.params for t in again.trials] == [t.params for t in study.trials[:9]]


@pytest.mark.parametrize("name", ["random", "qmc", "tpe", "ehvi", "motpe", "evolution"])
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
