"""Schedules against Zhu & Gupta's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods.pruning as P


def test_polynomial_matches_zhu_gupta():
    si, sf, t0, n, dt = 0.1, 0.9, 100, 10, 50
    s = P.polynomial_schedule(sf, initial_sparsity=si, begin_step=t0, end_step=t0 + n * dt, frequency=dt)
    f = jax.jit(s.sparsity)
    for t in range(t0, t0 + n * dt + 1, dt):
        expect = sf + (si - sf) * (1 - (t - t0) / (n * dt)) ** 3
        assert float(f(t)) == pytest.approx(expect, abs=1e-6)
        assert bool(s.is_update_step(t))
        if t + 1 < t0 + n * dt:
            assert float(f(t + 1)) == pytest.approx(expect, abs=1e-6)  # held between updates
            assert not bool(s.is_update_step(t + 1))
    assert float(f(0)) == 0.0 and float(f(10_000)) == pytest.approx(sf)
    assert not bool(s.is_update_step(t0 + n * dt + dt))


def test_one_shot_and_iterative():
    o = P.one_shot_schedule(0.8, step=5)
    assert float(o.sparsity(4)) == 0.0 and float(o.sparsity(5)) == pytest.approx(0.8)
    assert bool(o.is_update_step(5)) and not bool(o.is_update_step(6))
    it = P.iterative_schedule(0.875, 3, begin_step=0, end_step=20)
    vals = [float(it.sparsity(t)) for t in (0, 10, 20, 30)]
    np.testing.assert_allclose(vals, [0.5, 0.75, 0.875, 0.875], atol=1e-6)
    ups = [t for t in range(40) if bool(it.is_update_step(t))]
    assert ups == [0, 10, 20]


def test_constant():
    c = P.constant_schedule(0.5, begin_step=2, end_step=10, frequency=4)
    assert [t for t in range(15) if bool(c.is_update_step(jnp.asarray(t)))] == [2, 6, 10]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(final_sparsity=1.0),
        dict(final_sparsity=0.5, end_step=-1),
        dict(final_sparsity=0.5, frequency=0),
    ],
)
def test_bad_schedule(kwargs):
    with pytest.raises(ValueError):
        P.Polynomial(**kwargs)
