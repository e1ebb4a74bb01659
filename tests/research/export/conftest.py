"""Fixtures of the export tests: a trained digits MLP and a conv net with BatchNorm.

The export extras skip and ``digits`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from export_test_models import SmallConvNet
from export_test_models import SmallMLP
from flax import nnx


@pytest.fixture(scope="session")
def trained_mlp(digits):
    """An MLP trained on digits for a few hundred full-batch Adam steps (~97% test accuracy)."""
    model = SmallMLP(64, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(300):
        step(model, opt)
    return model


@pytest.fixture(scope="session")
def convnet():
    """A conv net whose BatchNorm has non-trivial running statistics (eval mode is exported)."""
    model = SmallConvNet(rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    model.bn.mean[...] = jnp.asarray(rng.normal(size=8).astype(np.float32) * 0.1)
    model.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=8).astype(np.float32))
    return model
