"""TPE estimators: densities are normalised; candidate scoring is jitted once per bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.automl import Categorical
from research.automl import Float
from research.automl import Space
from research.automl import TPESampler
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
