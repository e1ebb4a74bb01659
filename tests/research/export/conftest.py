"""Fixtures of the export tests: a trained digits MLP and a conv net with BatchNorm.

The export extras skip and ``digits`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from export_test_models import SmallConvNet
from export_test_models import SmallMLP
from flax import nnx


@pytest.fixture(autouse=True)
def _no_temp_files_left(tempfiles_under_pytest_tmp):
    """Converter diagnostics of the failing-conversion tests are written under pytest's temporary
    directory, not left in /tmp."""


@pytest.fixture(scope="session")
def trained_mlp(digits):
    """An MLP trained on digits for 300 full-batch Adam steps (~97% test accuracy).

    The loop is one ``lax.scan`` (one compilation, no per-step dispatch); the steps are the
    same full-batch Adam updates a Python loop over a jitted step would make.
    """
    model = SmallMLP(64, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

    @jax.jit
    def run(params, opt_state):
        def body(carry, _):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(body, (params, opt_state), None, length=300)[0][0]

    nnx.update(model, jax.block_until_ready(run(params, tx.init(params))))
    return model


@pytest.fixture(scope="session")
def convnet():
    """A conv net whose BatchNorm has non-trivial running statistics (eval mode is exported)."""
    model = SmallConvNet(rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    model.bn.mean[...] = jnp.asarray(rng.normal(size=8).astype(np.float32) * 0.1)
    model.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=8).astype(np.float32))
    return model
