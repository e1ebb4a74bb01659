"""The int8-noise agreement term (``methods.quantization.noise``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from methods.quantization import activations
from methods.quantization import grid_noise
from methods.quantization import noisy_forward
from methods.quantization import quant_noise_regularizer
from methods.quantization.kurtosis import run_activations
from research.train import cross_entropy_loss


def test_grid_noise_is_at_most_half_a_step_keeps_the_range_and_has_a_range_gradient():
    t = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)) + 0.5, jnp.float32)
    key = jax.random.key(0)
    out = grid_noise(t, key)
    step = (max(float(t.max()), 0.0) - min(float(t.min()), 0.0)) / 255
    d = np.abs(np.asarray(out - t))
    assert 0.3 * step < d.max() <= step / 2 * (1 + 1e-5)
    assert float(out.min()) >= float(t.min()) and float(out.max()) <= float(t.max())
    four = np.abs(np.asarray(grid_noise(t, key, bits=4) - t))  # 17x the step
    assert 8 * d.max() < four.max() <= 255 / 15 * step / 2 * (1 + 1e-5)
    positive = jnp.abs(t)  # a non-negative tensor (a variance) stays non-negative
    assert float(grid_noise(positive, key, bits=2).min()) >= 0.0
    np.testing.assert_array_equal(np.asarray(grid_noise(t, key, scale=0.0)), np.asarray(t))
    ints = jnp.arange(6)
    assert grid_noise(ints, key) is ints
    # the step is a function of the range: moving the largest element moves every other one
    g = jax.grad(lambda t: jnp.sum(grid_noise(t, key)[1:] * (grid_noise(t, key)[1:] - t[1:])))(t)
    i = np.unravel_index(int(jnp.argmax(t)), t.shape)
    assert i[0] > 0 and float(g[i]) != 0.0


class Small(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(6, 8, rngs=rngs)
        self.b = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_noisy_forward_perturbs_the_input_and_every_activation():
    model = Small(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 6)), jnp.float32)
    _, acts = activations(model, x)
    seen = []

    def perturb(name, t):
        seen.append(name)
        return t

    y, _ = run_activations(model, x, perturb=perturb)
    assert seen == ["input"] + [name for name, _ in acts]
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(x)), rtol=1e-6)
    key = jax.random.key(3)
    np.testing.assert_allclose(np.asarray(noisy_forward(model, x, key, scale=0.0)), np.asarray(model(x)), rtol=1e-6)
    noisy = np.asarray(noisy_forward(model, x, key))
    err = np.abs(noisy - np.asarray(model(x))).max()
    assert 0 < err < 0.1
    assert np.abs(np.asarray(noisy_forward(model, x, key, bits=4)) - np.asarray(model(x))).max() > 4 * err


class Normed(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(6, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.b = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(self.norm(self.a(x)))


def test_noisy_forward_through_a_layernorm_is_finite_at_two_bits():
    model = Normed(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 6)), jnp.float32)
    run = jax.jit(lambda x, key: noisy_forward(model, x, key, bits=2))
    for seed in range(4):  # LayerNorm variances near 0 stay >= 0 for their rsqrt
        assert np.isfinite(np.asarray(run(x * 1e-3, jax.random.key(seed)))).all()


def test_regularizer_adds_the_term_and_logs_it_and_zero_weight_is_the_loss_itself():
    model = Small(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 6)), jnp.float32)
    batch = {"x": x, "y": jnp.zeros((16,), jnp.int32)}
    rng = jax.random.key(0)
    base, _ = cross_entropy_loss(model, batch, rng)
    for target in ("top1", "kl"):
        loss, aux = quant_noise_regularizer(2.0, bits=3, target=target)(cross_entropy_loss)(model, batch, rng)
        assert float(aux["quant_noise_loss"]) > 0
        np.testing.assert_allclose(float(loss), float(base) + 2.0 * float(aux["quant_noise_loss"]), rtol=1e-5)
        assert 0.0 <= float(aux["quant_noise_agreement"]) <= 1.0
    assert quant_noise_regularizer(0.0)(cross_entropy_loss) is cross_entropy_loss


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": -1.0}, "weight=-1.0"),
        ({"weight": float("nan")}, "weight=nan"),
        ({"bits": 1}, "bits=1"),
        ({"bits": 8.0}, "bits=8.0"),
        ({"scale": -0.5}, "scale=-0.5"),
        ({"target": "mse"}, "target='mse'"),
        ({"min_size": 1}, "min_size=1"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant_noise_regularizer(**kwargs)
