"""Balanced CP factors: same kernel and outputs, equal column norms, well-scaled SGD steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from methods.decomposition import CPConv
from methods.decomposition import balance_cp_factors
from methods.decomposition import cp_factors
from methods.decomposition.decompose import cp_reconstruct

RANK = 6


def _small_conv(scale: float = 0.02, cin: int = 8, cout: int = 10, seed: int = 0) -> nnx.Conv:
    """A conv whose kernel has the small scale of a weight-decayed one (ALS then leaves unequal norms)."""
    conv = nnx.Conv(cin, cout, (3, 3), rngs=nnx.Rngs(seed))
    conv.kernel[...] = scale * jax.random.normal(jax.random.key(seed + 7), conv.kernel[...].shape)
    conv.bias[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (cout,))
    return conv


def _column_norms(factors) -> np.ndarray:
    return np.stack([np.linalg.norm(f, axis=0) for f in factors])  # (n_factors, rank)


def _apply(module, x):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_balanced_factors_same_kernel_and_equal_column_norms(scale):
    kernel = np.asarray(_small_conv(scale).kernel[...], np.float64)
    raw = cp_factors(kernel, RANK, n_iter_max=100, balance=False)
    bal = cp_factors(kernel, RANK, n_iter_max=100)
    np.testing.assert_allclose(cp_reconstruct(bal), cp_reconstruct(raw), rtol=1e-10, atol=1e-12 * scale)
    norms = _column_norms(bal)
    np.testing.assert_allclose(norms, np.broadcast_to(norms[0], norms.shape), rtol=1e-10)
    np.testing.assert_allclose(np.prod(norms, axis=0), np.prod(_column_norms(raw), axis=0), rtol=1e-10)
    spread = _column_norms(raw).max(axis=0) / _column_norms(raw).min(axis=0)
    assert spread.max() > 1.5, spread  # ALS's factors are unbalanced, so balancing did something


def test_balanced_cp_conv_computes_the_same_outputs():
    conv = _small_conv()
    kernel = np.asarray(conv.kernel[...], np.float64)
    raw = CPConv.from_dense(conv, RANK, factors=cp_factors(kernel, RANK, n_iter_max=100, balance=False))
    bal = CPConv.from_dense(conv, RANK, n_iter_max=100)
    x = jax.random.normal(jax.random.key(3), (2, 9, 9, 8))
    chex.assert_trees_all_close(_apply(bal, x), _apply(raw, x), atol=1e-5, rtol=1e-4)
    norms = _column_norms(bal.factors())
    np.testing.assert_allclose(norms, np.broadcast_to(norms[0], norms.shape), rtol=1e-4)


def test_balance_keeps_signed_weights_and_zero_components():
    rng = np.random.default_rng(0)
    factors = [rng.normal(size=(d, 3)) for d in (3, 4, 5)]
    factors[1][:, 2] = 0.0  # a dead component
    weights = np.array([2.0, -0.5, 3.0])
    want = np.einsum("ar,br,cr,r->abc", *factors, weights)
    bal = balance_cp_factors(factors, weights)
    np.testing.assert_allclose(cp_reconstruct(bal), want, atol=1e-12)
    norms = _column_norms(bal)
    np.testing.assert_allclose(norms[:, :2], np.broadcast_to(norms[0, :2], (3, 2)), rtol=1e-12)
    np.testing.assert_array_equal(norms[:, 2], 0.0)


@pytest.mark.parametrize(
    "factors, weights, match",
    [
        ([np.ones((3, 2)), np.ones((4, 3))], None, r"ranks \[2, 3\]"),
        ([np.ones((3, 2)), np.ones((4, 2))], np.ones(3), r"weights of shape \(3,\) for rank 2"),
    ],
)
def test_balance_rejects_bad_shapes(factors, weights, match):
    with pytest.raises(ValueError, match=match):
        balance_cp_factors(factors, weights)


def test_one_sgd_step_on_balanced_factors_changes_the_loss_far_less():
    """The same CP kernel, one plain-SGD step on an output-matching loss: ALS's unequal factor
    scales make the step overshoot along the small factor; balanced factors do not."""
    conv = _small_conv()
    kernel = np.asarray(conv.kernel[...], np.float64)
    x = jax.random.normal(jax.random.key(5), (4, 8, 8, 8))
    target = _apply(conv, x)

    def step_losses(layer: CPConv) -> tuple[float, float]:
        graphdef, params = nnx.split(layer)

        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p)(x) - target) ** 2)

        before, grads = jax.jit(jax.value_and_grad(loss))(params)
        tx = optax.sgd(0.5)
        updates, _ = tx.update(grads, tx.init(params), params)
        return float(before), float(jax.jit(loss)(optax.apply_updates(params, updates)))

    raw = CPConv.from_dense(conv, RANK, factors=cp_factors(kernel, RANK, n_iter_max=100, balance=False))
    bal = CPConv.from_dense(conv, RANK, n_iter_max=100)
    raw_before, raw_after = step_losses(raw)
    bal_before, bal_after = step_losses(bal)
    np.testing.assert_allclose(bal_before, raw_before, rtol=1e-4)
    assert bal_after < bal_before, (bal_before, bal_after)
    assert abs(bal_after - bal_before) < 0.1 * abs(raw_after - raw_before), (raw_before, raw_after, bal_after)
