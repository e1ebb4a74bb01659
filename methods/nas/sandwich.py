"""Sandwich-rule supernet training with in-place distillation (Yu et al., BigNAS).

Every step trains the largest sub-network on the labels and, on the same batch, the smallest and
``n_random`` random sub-networks on the largest one's softened outputs (``methods.distillation``'s
KD loss, teacher gradients stopped). The gradients of all of them are summed into one update of
the shared weights. Sub-networks are masks (:func:`methods.nas.stack_masks`), so a step is one
program whatever sub-networks it samples, and a whole run is one ``lax.scan``
(:func:`research.train.scan_steps`: one compiled step per call on a CPU, where convolutions run
slowly inside a loop).

References:
  Yu et al., "BigNAS: Scaling Up Neural Architecture Search with Big Single-Stage Models",
  https://arxiv.org/abs/2003.11142
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from methods.distillation.losses import kd_loss
from methods.nas.supernet import Supernet
from methods.nas.supernet import apply
from methods.nas.supernet import merge
from methods.nas.supernet import stack_masks
from research.nn.families import Family
from research.nn.families import Masks
from research.nn.families import family_masks
from research.train.scan import scan_steps

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


def sandwich_masks(net: Supernet, rng: np.random.Generator, n_random: int, *, family: Family | None = None) -> Masks:
    """Stacked masks ``[largest, smallest, n_random random]`` for one step.

    Args:
      family: the choices to draw from (default: the net's whole family); a progressive-shrinking
        phase passes ``net.family.restrict(phase.elastic)``.
    """
    return stack_masks(net, _sandwich_options(net.family if family is None else family, rng, n_random))


def _sandwich_options(fam: Family, rng: np.random.Generator, n_random: int) -> list[dict]:
    return [fam.largest(), fam.smallest(), *[fam.sample(rng) for _ in range(n_random)]]


def _stacked(net: Supernet, per_step: list[list[dict]]) -> Masks:
    """Masks of every step's sub-networks, stacked ``[step, member, ...]`` (the supernet merged once)."""
    model = merge(net)
    steps = [[family_masks(model, o) for o in opts] for opts in per_step]
    return jax.tree.map(lambda *a: jnp.stack(a), *[jax.tree.map(lambda *b: jnp.stack(b), *s) for s in steps])


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of progressive shrinking.

    Attributes:
      steps: optimizer steps of the phase.
      elastic: the family's dimensions (``Family.dimensions()``: ``kernel``, ``depth``, ``width``...)
        whose options may shrink in this phase; every other option stays at its largest choice.
    """

    steps: int
    elastic: tuple[str, ...]


#: The order in which progressive shrinking frees the dimensions (Once-for-All: kernel, then depth,
#: then width; expansion ratios shrink with width). A head choice (``conv1d_family``'s global-max or
#: flattened head) changes no layer of the body, so it is freed first, like the kernel.
#: Dimensions not listed are freed last.
SHRINK_ORDER = ("head", "kernel", "depth", "expand", "width")


def progressive_phases(
    family: Family, steps: int, *, first: float = 0.25, order: Sequence[str] | None = None
) -> list[Phase]:
    """A progressive-shrinking schedule of ``steps`` steps (Cai et al., Once-for-All).

    Phase 0 (``first`` of the steps) trains the largest network only; each later phase frees one
    more dimension, in ``order`` (default :data:`SHRINK_ORDER` restricted to the family's
    dimensions, then any others), so the last phase samples the whole family. The remaining steps
    are split evenly over the later phases.

    Raises:
      ValueError: ``first`` outside ``[0, 1)``, an ``order`` naming a dimension the family lacks, or
        fewer steps than phases.
    """
    dims = family.dimensions()
    if order is None:
        order = [d for d in SHRINK_ORDER if d in dims] + [d for d in dims if d not in SHRINK_ORDER]
    missing = sorted(set(order) - set(dims))
    if missing:
        raise ValueError(f"order names {missing}, which family {family.name!r} lacks; its dimensions: {list(dims)}")
    order = list(order) + [d for d in dims if d not in order]
    if not 0.0 <= first < 1.0:
        raise ValueError(f"first={first} must be in [0, 1): the fraction of steps spent on the largest network alone")
    n0 = int(round(first * steps))
    if steps - n0 < len(order) or (first > 0 and n0 == 0):
        raise ValueError(f"steps={steps} is too few for {len(order) + (n0 > 0)} phases; raise steps")
    rest = np.diff(np.linspace(0, steps - n0, len(order) + 1).round().astype(int))
    phases = [Phase(n0, ())] if n0 else []
    return phases + [Phase(int(n), tuple(order[: i + 1])) for i, n in enumerate(rest)]


def phase_masks(net: Supernet, phases: Sequence[Phase], rng: np.random.Generator, n_random: int) -> list[Masks]:
    """The sandwich masks of every step of ``phases``, in order (one stacked ``Masks`` per step)."""
    per_step = _phase_options(net.family, phases, rng, n_random)
    stacked = _stacked(net, per_step)
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(len(per_step))]


def _phase_options(fam: Family, phases: Sequence[Phase], rng: np.random.Generator, n_random: int) -> list[list[dict]]:
    out = []
    for ph in phases:
        sub = fam.restrict(ph.elastic)
        out += [_sandwich_options(sub, rng, n_random) for _ in range(ph.steps)]
    return out


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
    phases: Sequence[Phase] | None = None,
) -> tuple[Supernet, np.ndarray]:
    """Trains the supernet with the sandwich rule (Adam, cosine decay); the loop is :func:`scan_steps`.

    Args:
      net: the supernet (:func:`methods.nas.split_supernet`).
      x, y: training inputs and labels.
      steps: optimizer steps.
      batch_size: examples per step (drawn with replacement from ``seed``).
      learning_rate: peak Adam learning rate.
      n_random: random sub-networks per step besides the largest and the smallest.
      temperature: in-place distillation temperature.
      seed: seeds the batches and the sampled sub-networks.
      phases: progressive shrinking (:func:`progressive_phases`): the sub-networks of each phase
        are drawn from the family restricted to its elastic dimensions, and the learning rate
        restarts its cosine decay at every phase. Their steps must add up to ``steps``.
        ``None``: the whole family from the first step.

    Returns:
      ``(net, ce)``: the trained supernet and the per-step cross-entropy of each sandwich member,
      ``ce[step, 0]`` the largest, ``ce[step, 1]`` the smallest (of the step's phase).

    Raises:
      ValueError: non-positive ``steps``/``batch_size``, negative ``n_random``, or phases whose
        steps do not add up to ``steps``.
    """
    if steps <= 0 or batch_size <= 0 or n_random < 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size} must be positive and n_random={n_random} >= 0")
    if phases is not None and sum(p.steps for p in phases) != steps:
        raise ValueError(
            f"the phases' steps add up to {sum(p.steps for p in phases)}, not steps={steps}; "
            "build them with progressive_phases(family, steps)"
        )
    rng = np.random.default_rng(seed)
    if phases is None:
        masks = _stacked(net, [_sandwich_options(net.family, rng, n_random) for _ in range(steps)])
        schedule = optax.cosine_decay_schedule(learning_rate, steps)
    else:
        masks = _stacked(net, _phase_options(net.family, phases, rng, n_random))
        lengths = [p.steps for p in phases if p.steps > 0]
        schedule = optax.join_schedules(
            [optax.cosine_decay_schedule(learning_rate, n) for n in lengths], list(np.cumsum(lengths)[:-1])
        )
    idx = rng.integers(0, len(x), size=(steps, batch_size))
    tx = optax.adam(schedule)
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def body(carry, inp):
        params, stats, opt_state = carry
        m, i = inp
        grad_fn = jax.value_and_grad(lambda p: sandwich_loss(net, p, stats, m, xs[i], ys[i], temperature), has_aux=True)
        (_, (stats, ce)), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), ce

    # One lax.scan, or on a CPU one compiled step per call (convolutions run slowly in a loop there).
    (params, stats, _), ce = scan_steps(body)((net.params, net.stats, tx.init(net.params)), (masks, idx))
    return net._replace(params=params, stats=stats), np.asarray(ce)
