"""Sub-network evaluation: K masks on the validation set as one vmapped program, with per-sub-network
BatchNorm recalibration inside that program.

A sub-network's BatchNorm statistics are not the supernet's (its channels see other inputs), so as
in Once-for-All each sub-network's statistics are re-estimated on a few training batches before it
is evaluated: every calibration batch runs through the sub-network in train mode from the same
starting statistics ``s0``; with momentum ``m`` BatchNorm writes ``m * s0 + (1 - m) * batch_stat``,
from which the batch statistic is recovered exactly and averaged over the batches. This happens
per sub-network inside the vmapped program, so K sub-networks cost one compilation and one launch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.nas.supernet import Supernet
from methods.nas.supernet import apply
from methods.nas.supernet import merge
from research.nn.families import Masks

PyTree = Any


def bn_momentum(net: Supernet) -> float | None:
    """The BatchNorm momentum shared by every BatchNorm of ``net`` (``None`` when it has none).

    Raises:
      ValueError: BatchNorms with different momenta (recalibration needs one).
    """
    momenta = {float(m.momentum) for _, m in nnx.iter_graph(merge(net)) if isinstance(m, nnx.BatchNorm)}
    if not momenta:
        return None
    if len(momenta) > 1:
        raise ValueError(f"BatchNorm momenta differ ({sorted(momenta)}); recalibration needs one momentum")
    return momenta.pop()


def recalibrate(net: Supernet, params: PyTree, stats: PyTree, masks: Masks, calib_x: jax.Array) -> PyTree:
    """BatchNorm statistics of sub-network ``masks``: the mean over ``calib_x``'s batches of each
    batch's mean and variance (parameters are untouched).

    Args:
      calib_x: ``(num_batches, batch, *input_shape)`` training inputs.

    Returns:
      The new ``stats`` (same structure); ``stats`` itself when the net has no BatchNorm.
    """
    m = bn_momentum(net)
    if m is None:
        return stats

    def one(xb):
        _, s1 = apply(net, params, stats, xb, masks, train=True)
        return jax.tree.map(lambda a1, a0: (a1 - m * a0) / (1.0 - m), s1, stats)

    per_batch = jax.lax.map(one, calib_x)
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), per_batch)


def _chunks(x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(x)
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return xp.reshape(nb, batch_size, *x.shape[1:]), w.reshape(nb, batch_size)


def make_evaluator(net: Supernet, *, calibrate: bool = True) -> Callable[..., tuple[jax.Array, PyTree]]:
    """A jitted ``evaluate(params, stats, masks, x_chunks, y_chunks, w_chunks, calib_x)``.

    ``masks`` are stacked on a leading axis K; returns ``(accuracy[K], stats[K, ...])`` where the
    stats are each sub-network's recalibrated BatchNorm statistics (the supernet's, stacked, when
    ``calibrate`` is off or the net has no BatchNorm).
    """

    @jax.jit
    def evaluate(params, stats, masks, xs, ys, ws, calib_x):
        def one(mask):
            s = recalibrate(net, params, stats, mask, calib_x) if calibrate else stats

            def batch(args):
                xb, yb, wb = args
                logits, _ = apply(net, params, s, xb, mask)
                return jnp.sum((jnp.argmax(logits, -1) == yb) * wb)

            correct = jnp.sum(jax.lax.map(batch, (xs, ys, ws)))
            return correct / jnp.sum(ws), s

        return jax.vmap(one)(masks)

    return evaluate


def evaluate_subnets(
    net: Supernet,
    masks: Masks,
    x: np.ndarray,
    y: np.ndarray,
    *,
    calib_x: np.ndarray | None = None,
    batch_size: int = 500,
    evaluator: Callable[..., tuple[jax.Array, PyTree]] | None = None,
) -> tuple[np.ndarray, PyTree]:
    """Validation accuracy of K stacked sub-networks in one vmapped program.

    Args:
      net: the supernet.
      masks: masks stacked on a leading axis (:func:`methods.nas.stack_masks`).
      x, y: validation inputs and labels.
      calib_x: ``(num_batches, batch, ...)`` training inputs to recalibrate each sub-network's
        BatchNorm statistics on (``None``: use the supernet's statistics).
      batch_size: validation examples per forward pass.
      evaluator: a :func:`make_evaluator` result to reuse (its ``calibrate`` must match ``calib_x``).

    Returns:
      ``(accuracy[K], stats)`` with each sub-network's BatchNorm statistics stacked on axis 0.
    """
    calibrate = calib_x is not None
    evaluator = evaluator or make_evaluator(net, calibrate=calibrate)
    xs, ws = _chunks(np.asarray(x), batch_size)
    ys, _ = _chunks(np.asarray(y), batch_size)
    calib = jnp.asarray(calib_x) if calibrate else jnp.zeros((0,))
    acc, stats = evaluator(net.params, net.stats, masks, xs, ys, ws, calib)
    return np.asarray(acc), stats


def calibration_batches(x: np.ndarray, num_batches: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """``(num_batches, batch_size, ...)`` distinct training inputs drawn with ``seed``.

    Raises:
      ValueError: more examples asked than ``x`` holds.
    """
    need = num_batches * batch_size
    if need > len(x):
        raise ValueError(f"{num_batches} x {batch_size} calibration examples asked, only {len(x)} available")
    idx = np.random.default_rng(seed).permutation(len(x))[:need]
    return np.asarray(x)[idx].reshape(num_batches, batch_size, *np.shape(x)[1:])
