"""Sandwich-rule supernet training with in-place distillation (Yu et al., BigNAS).

Every step trains the largest sub-network on the labels and, on the same batch, the smallest and
``n_random`` random sub-networks on the largest one's softened outputs (``methods.distillation``'s
KD loss, teacher gradients stopped). The gradients of all of them are summed into one update of
the shared weights. Sub-networks are masks (:func:`methods.nas.stack_masks`), so a step is one
program whatever sub-networks it samples, and a whole run is one ``lax.scan``.

References:
  Yu et al., "BigNAS: Scaling Up Neural Architecture Search with Big Single-Stage Models",
  https://arxiv.org/abs/2003.11142
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from methods.distillation.losses import kd_loss
from methods.nas.supernet import Supernet
from methods.nas.supernet import apply
from methods.nas.supernet import stack_masks
from research.nn.families import Masks

PyTree = Any


def sandwich_loss(
    net: Supernet, params: PyTree, stats: PyTree, masks: Masks, x: jax.Array, y: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, tuple[PyTree, jax.Array]]:
    """The sandwich loss of one batch.

    Args:
      masks: stacked masks; entry 0 is the largest sub-network (trained on ``y``), the others are
        distilled from it.
      temperature: KD temperature.

    Returns:
      ``(loss, (stats, ce))``: the summed loss, the BatchNorm statistics after the largest
      sub-network's pass, and each sub-network's cross-entropy on ``y`` (for monitoring).
    """
    n = jax.tree.leaves(masks)[0].shape[0]
    pick = lambda i: jax.tree.map(lambda a: a[i], masks)  # noqa: E731
    teacher, new_stats = apply(net, params, stats, x, pick(0), train=True)
    ce = [optax.softmax_cross_entropy_with_integer_labels(teacher, y).mean()]
    total = ce[0]
    for i in range(1, n):
        logits, _ = apply(net, params, stats, x, pick(i), train=True)
        total = total + kd_loss(logits, teacher, temperature)
        ce.append(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    return total, (new_stats, jnp.stack(ce))


def make_sandwich_step(net: Supernet, tx: optax.GradientTransformation, *, temperature: float = 1.0):
    """A jitted ``step(params, stats, opt_state, masks, x, y) -> (params, stats, opt_state, ce[n])``."""

    @jax.jit
    def step(params, stats, opt_state, masks, x, y):
        grad_fn = jax.value_and_grad(lambda p: sandwich_loss(net, p, stats, masks, x, y, temperature), has_aux=True)
        (_, (stats, ce)), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, ce

    return step


def sandwich_masks(net: Supernet, rng: np.random.Generator, n_random: int) -> Masks:
    """Stacked masks ``[largest, smallest, n_random random]`` for one step."""
    fam = net.family
    return stack_masks(net, [fam.largest(), fam.smallest(), *[fam.sample(rng) for _ in range(n_random)]])


def train_supernet(
    net: Supernet,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    n_random: int = 2,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[Supernet, np.ndarray]:
    """Trains the supernet with the sandwich rule (Adam, cosine decay); the loop is one ``lax.scan``.

    Args:
      net: the supernet (:func:`methods.nas.split_supernet`).
      x, y: training inputs and labels.
      steps: optimizer steps.
      batch_size: examples per step (drawn with replacement from ``seed``).
      learning_rate: peak Adam learning rate.
      n_random: random sub-networks per step besides the largest and the smallest.
      temperature: in-place distillation temperature.
      seed: seeds the batches and the sampled sub-networks.

    Returns:
      ``(net, ce)``: the trained supernet and the per-step cross-entropy of each sandwich member,
      ``ce[step, 0]`` the largest, ``ce[step, 1]`` the smallest.

    Raises:
      ValueError: non-positive ``steps``/``batch_size`` or negative ``n_random``.
    """
    if steps <= 0 or batch_size <= 0 or n_random < 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size} must be positive and n_random={n_random} >= 0")
    rng = np.random.default_rng(seed)
    masks = [sandwich_masks(net, rng, n_random) for _ in range(steps)]
    masks = jax.tree.map(lambda *a: jnp.stack(a), *masks)
    idx = jnp.asarray(rng.integers(0, len(x), size=(steps, batch_size)))
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def run(params, stats, opt_state, masks, idx):
        def body(carry, inp):
            params, stats, opt_state = carry
            m, i = inp
            grad_fn = jax.value_and_grad(
                lambda p: sandwich_loss(net, p, stats, m, xs[i], ys[i], temperature), has_aux=True
            )
            (_, (stats, ce)), grads = grad_fn(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), stats, opt_state), ce

        return jax.lax.scan(body, (params, stats, opt_state), (masks, idx))

    (params, stats, _), ce = run(net.params, net.stats, tx.init(net.params), masks, idx)
    return net._replace(params=params, stats=stats), np.asarray(ce)
