"""TPE estimators: densities are normalised; candidate scoring is jitted once per bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.automl import Categorical
from research.automl import Float
from research.automl import Space
from research.automl import TPESampler
from research.automl.tpe import BOHBSampler
from research.automl.tpe import Mixture
from research.automl.tpe import log_mixture_pdf


@pytest.mark.parametrize("multivariate", [False, True])
def test_continuous_density_integrates_to_one(multivariate):
    space = Space({"x": Float(0.0, 1.0), "c": Categorical(["a", "b", "c"])})
    rng = np.random.default_rng(0)
    u = np.stack([rng.random(9), (rng.integers(0, 3, 9) + 0.5) / 3], 1)
    sampler = TPESampler(multivariate=multivariate)
    mix = sampler._mixture(u, None, np.ones(9), np.array([True, True]), space, 16)
    mix = Mixture(*map(jnp.asarray, mix))
    is_cat, nc = jnp.asarray(space.is_categorical), jnp.asarray(space.n_choices)
    grid = np.linspace(0.0, 1.0, 4001)

    def density(points, dims):
        f = jax.jit(jax.vmap(lambda x: log_mixture_pdf(x, mix, jnp.asarray(dims), is_cat, nc)))
        return np.exp(np.asarray(f(jnp.asarray(points))))

    dens = density(np.stack([grid, np.full_like(grid, 0.5)], 1), [True, False])
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=2e-3)
    cells = (np.arange(3) + 0.5) / 3
    probs = density(np.stack([np.full(3, 0.5), cells], 1), [False, True])
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    # The joint density over both coordinates is normalised too.
    total = sum(np.trapezoid(density(np.stack([grid, np.full_like(grid, c)], 1), [True, True]), grid) for c in cells)
    assert total == pytest.approx(1.0, abs=2e-3)


def test_good_region_gets_more_mass():
    space = Space({"x": Float(0.0, 1.0)})
    from research.automl import Study

    study = Study(space, sampler=TPESampler(seed=1, n_startup_trials=10))
    study.optimize(lambda p: (p["x"] - 0.2) ** 2, n_trials=40, show_progress_bar=False)
    late = [t.params["x"] for t in study.trials[20:]]
    # Uniform sampling would give a median distance of 0.3.
    assert np.median(np.abs(np.array(late) - 0.2)) < 0.15


def _group_mixtures(sampler, u, numbers, losses, space):
    dims = np.ones(space.dim, bool)
    return sampler._group_mixtures(u, numbers, losses[:, None], np.zeros((0, space.dim)), dims, space)


def test_recency_weights_are_per_group():
    # The 6 (= gamma(60)) best of 60 observations are the oldest; they still weigh equally.
    space = Space({"x": Float(0.0, 1.0)})
    rng = np.random.default_rng(0)
    u = rng.random((60, 1))
    losses = np.arange(60.0)
    numbers = np.arange(60)
    sampler = TPESampler()
    below, above = _group_mixtures(sampler, u, numbers, losses, space)
    wb = np.exp(below.logw[:7])
    np.testing.assert_allclose(wb, np.full(7, 1 / 7), rtol=1e-12)  # 6 points + the prior
    ramp = np.append(sampler.weights(54), sampler.prior_weight)
    np.testing.assert_allclose(np.exp(above.logw[:55]), ramp / ramp.sum(), rtol=1e-12)
    assert np.all(np.isneginf(below.logw[7:])) and np.all(np.isneginf(above.logw[55:]))


@pytest.mark.parametrize(("floor", "n_clip"), [("shared", 60), ("per_estimator", 6)])
def test_bandwidth_floor(floor, n_clip):
    # 6 good points packed into [0.5, 0.501]: their kernels sit on the floor 1/min(100, n + 2).
    space = Space({"x": Float(0.0, 1.0), "y": Float(0.0, 1.0)})
    rng = np.random.default_rng(1)
    u = np.concatenate([0.5 + 0.001 * rng.random((6, 2)), rng.random((54, 2))])
    losses = np.concatenate([np.zeros(6), 1.0 + np.arange(54.0)])
    below, above = _group_mixtures(TPESampler(bandwidth_floor=floor), u, np.arange(60), losses, space)
    np.testing.assert_allclose(below.sigma[:6], 1.0 / (n_clip + 2))
    assert below.sigma[6].tolist() == [1.0, 1.0]  # the prior keeps its width
    assert above.sigma[:54].min() >= 1.0 / (60 + 2) - 1e-12


@pytest.mark.parametrize(
    ("make", "floor"),
    [
        (lambda: TPESampler(), "shared"),
        (lambda: TPESampler(multivariate=False), "per_estimator"),
        (lambda: TPESampler(multivariate=False, bandwidth_floor="shared"), "shared"),
        (lambda: BOHBSampler(), "per_estimator"),
    ],
)
def test_default_bandwidth_floor(make, floor):
    # Univariate TPE (and BOHB) keep the per-estimator magic clip unless asked otherwise.
    assert make().bandwidth_floor == floor


def test_bandwidth_floor_is_validated():
    with pytest.raises(ValueError, match="bandwidth_floor='wide'"):
        TPESampler(bandwidth_floor="wide")


def test_shared_floor_converges_on_branin():
    """The shared floor lets TPE zoom in on Branin within 50 trials; the magic clip does not."""
    from research.automl import Study
    from research.automl import testfunctions as tf

    def median_regret(floor):
        regrets = []
        for seed in range(3):
            study = Study(tf.branin_space(), sampler=TPESampler(seed=seed, bandwidth_floor=floor))
            study.optimize(tf.branin, n_trials=50, show_progress_bar=False)
            regrets.append(study.best_value - tf.BRANIN_MIN)
        return np.median(regrets)

    shared, per_estimator = median_regret("shared"), median_regret("per_estimator")
    assert shared < 0.05
    assert shared < 0.5 * per_estimator


def test_same_shaped_spaces_share_the_candidate_program():
    """The space's bounds are values of the jitted candidate step: other bounds, no new trace."""
    from research.automl import Study
    from research.automl._numerics import TRACE_COUNTS

    def run(space):
        def objective(params):  # a function of the unit-cube point: the same for both spaces
            u, _ = space.encode(params)
            return float((u[0] - 0.3) ** 2 + (u[1] - 0.7) ** 2)

        study = Study(space, sampler=TPESampler(seed=2))
        study.optimize(objective, n_trials=16, show_progress_bar=False)
        return np.stack([space.encode(t.params)[0] for t in study.trials])

    first = run(Space({"x1": Float(-5.0, 10.0), "x2": Float(0.0, 15.0)}))
    traces = TRACE_COUNTS["tpe_pick"]
    again = run(Space({"a": Float(1e-3, 1.0, log=True), "b": Float(-1.0, 1.0)}))
    assert TRACE_COUNTS["tpe_pick"] == traces
    np.testing.assert_allclose(again, first, rtol=0, atol=1e-9)
