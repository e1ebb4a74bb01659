"""Small NNX models used by the export tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class SmallMLP(nnx.Module):
    """64 -> hidden -> 10 classifier for flattened 8x8 digits."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


class SmallConvNet(nnx.Module):
    """Conv + BatchNorm + ReLU + Dense on 8x8x1 inputs."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(x.reshape(x.shape[0], -1))


class SortFeatures(nnx.Module):
    """Sorts features: ``sort`` has no TFLite builtin."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.sort(x, axis=-1)


class Unsupported(nnx.Module):
    """A model with an operation the TFLite converter rejects, in layer ``block``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(64, 16, rngs=rngs)
        self.block = SortFeatures()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block(self.fc(x.reshape(x.shape[0], -1)))


def train_briefly(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = 150,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> nnx.Module:
    """Trains ``model`` in place with Adam on random minibatches, as one jitted ``lax.scan``.

    One compilation per model (the whole loop is one program), so even ResNet-56 trains in a few
    seconds on a CPU; BatchNorm statistics are updated (train mode), the model is left in eval
    mode. Used so that int8 top-1 agreement is measured on a model with real margins.
    """
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(learning_rate)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(steps, batch_size))
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def run(params, rest, opt_state, idx):
        def body(carry, i):
            params, rest, opt_state = carry

            def loss_fn(p):
                m = nnx.merge(graphdef, p, rest, copy=True)
                loss = optax.softmax_cross_entropy_with_integer_labels(m(xs[i]), ys[i]).mean()
                return loss, nnx.split(m, nnx.Param, ...)[2]

            (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), rest, opt_state), loss

        return jax.lax.scan(body, (params, rest, opt_state), idx)

    (params, rest, _), _ = run(params, rest, tx.init(params), jnp.asarray(idx))
    nnx.update(model, params, rest)
    model.eval()
    return model
