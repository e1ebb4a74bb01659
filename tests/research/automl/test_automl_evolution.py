"""The evolution sampler: regularized evolution (one objective), NSGA-II (several)."""

import numpy as np
import pytest

from research.automl import Categorical
from research.automl import EvolutionSampler
from research.automl import Float
from research.automl import RandomSampler
from research.automl import Space
from research.automl import Study
from research.automl import crowding_distance
from research.automl import hypervolume
from research.automl import make_sampler
from research.automl.samplers import observations
from research.automl.testfunctions import branin
from research.automl.testfunctions import branin_space


def test_crowding_distance_by_hand():
    # Sorted by the first objective: 0, 1, 3, 4. Ranges 4 and 4.
    losses = np.array([[0.0, 4.0], [3.0, 1.0], [1.0, 3.0], [4.0, 0.0]])
    d = crowding_distance(losses)
    assert np.isinf(d[0]) and np.isinf(d[3])
    np.testing.assert_allclose(d[2], (3.0 - 0.0) / 4 + (4.0 - 1.0) / 4)  # neighbours (0,4) and (3,1)
    np.testing.assert_allclose(d[1], (4.0 - 1.0) / 4 + (3.0 - 0.0) / 4)
    assert np.isinf(crowding_distance(losses[:2])).all()


def _told(space, values, directions):
    study = Study(space, sampler=RandomSampler(seed=0), direction=directions)
    for v in values:
        trial = study.ask()[0]
        study.tell(trial, v)
    return study


def test_one_objective_parents_come_from_the_youngest_trials():
    space = Space({"x": Float(0.0, 1.0)})
    study = _told(space, [0.0, 5.0, 6.0, 7.0, 8.0], ["minimize"])  # the best trial is the oldest
    sampler = EvolutionSampler(seed=0, population=3, tournament=3)
    obs = observations(space, study.trials, ["minimize"])
    pool = sampler.pool(obs)
    assert sorted(obs.numbers[pool].tolist()) == [2, 3, 4]
    # the tournament over the whole pool picks its best (trial 2, value 6), never the aged-out best
    parent_x = study.trials[2].params["x"]
    for _ in range(5):
        child = sampler.sample(space, study.trials, ["minimize"], 1)[0]["x"]
        assert abs(child - parent_x) < 0.9


def test_several_objectives_keep_the_front_then_the_least_crowded():
    space = Space({"x": Float(0.0, 1.0)})
    values = [(0.0, 4.0), (1.0, 3.0), (1.1, 2.9), (4.0, 0.0), (5.0, 5.0)]
    study = _told(space, values, ["minimize", "minimize"])
    obs = observations(space, study.trials, ["minimize", "minimize"])
    pool = EvolutionSampler(seed=0, population=3).pool(obs)
    # the front is trials 0-3; its two extremes have infinite crowding, then 1 and 2 tie on rank:
    # 1's neighbours (0 and 2) span less than 2's (1 and 3), so 2 is kept
    assert sorted(obs.numbers[pool].tolist()) == [0, 2, 3]


def test_mutation_changes_a_categorical_and_draws_newly_active_children():
    space = Space(
        {
            "kind": Categorical(["a", "b"]),
            "a_size": Float(0.0, 1.0, when={"kind": "a"}),
        }
    )
    sampler = EvolutionSampler(seed=0, population=2)
    rng = np.random.default_rng(0)
    u, active = space.encode({"kind": "b"})
    changed_kind = 0
    for _ in range(50):
        child = space.decode(space.snap(sampler._mutate(space, u.copy(), active, rng)))
        space.validate(child)
        if child["kind"] == "a":  # the only live coordinate flipped, so a_size is drawn fresh
            changed_kind += 1
            assert 0.0 <= child["a_size"] <= 1.0
    assert changed_kind == 50  # one live coordinate: it always mutates, to the other choice


def _branin_regret(sampler, n):
    study = Study(branin_space(), sampler=sampler)
    study.optimize(branin, n_trials=n, show_progress_bar=False)
    return study.best_trial.value - 0.397887


def test_beats_random_search_on_branin():
    evo = [_branin_regret(EvolutionSampler(seed=s, population=10), 80) for s in range(3)]
    rnd = [_branin_regret(RandomSampler(seed=s), 80) for s in range(5)]
    assert np.median(evo) < np.median(rnd)


def _zdt1(p):
    x = np.array([p[f"x{i}"] for i in range(5)])
    g = 1.0 + 9.0 * np.mean(x[1:])
    return float(x[0]), float(g * (1.0 - np.sqrt(x[0] / g)))


def test_nsga2_beats_random_search_on_zdt1():
    space = Space({f"x{i}": Float(0.0, 1.0) for i in range(5)})

    def hv(sampler):
        study = Study(space, sampler=sampler, direction=["minimize", "minimize"])
        study.optimize(_zdt1, n_trials=120, show_progress_bar=False)
        return hypervolume(np.array([t.values for t in study.trials]), np.array([1.1, 11.0]))

    evo = [hv(EvolutionSampler(seed=s)) for s in range(2)]
    rnd = [hv(RandomSampler(seed=s)) for s in range(4)]
    assert min(evo) > max(rnd)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"population": 1}, "population=1 must be an integer >= 2"),
        ({"population": 4, "tournament": 5}, r"tournament=5 must be an integer in \[1, population=4\]"),
        ({"crossover": 1.5}, r"crossover=1.5 is a probability"),
        ({"mutation_scale": 0.0}, r"mutation_scale=0.0 is a step in the unit cube"),
    ],
)
def test_bad_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvolutionSampler(**kwargs)


def test_registered_for_tune_and_nas():
    assert isinstance(make_sampler("evolution", seed=3, population=8), EvolutionSampler)
