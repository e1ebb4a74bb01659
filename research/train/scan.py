"""Whole-loop training as one compiled program, for quick fits inside tests and benchmarks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def train_scan(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = 150,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> nnx.Module:
    """Trains ``model`` in place with Adam on random minibatches; the loop is one ``lax.scan``.

    One compilation per model (the whole loop is one program), so even ResNet-56 trains in a few
    seconds on a CPU. No checkpoints, logging or resume: use :func:`research.train.fit` for real
    runs. BatchNorm statistics are updated (train mode); the model is left in eval mode.

    Args:
      model: the NNX model, updated in place and returned.
      x, y: training inputs and integer labels (host arrays; copied to the device once).
      steps: optimizer steps.
      batch_size: examples per step, drawn with replacement from ``seed``.
      learning_rate: Adam's learning rate.
      seed: seeds the minibatch indices.

    Raises:
      ValueError: non-positive ``steps`` or ``batch_size``.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
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
