"""A weight-sharing supernet: the largest member of a family, masks selecting sub-networks, extraction.

The supernet is an ordinary family model built at :meth:`Family.largest`; a sub-network is a dict
of family options; its masks (``model.arch_masks(options)``) are arrays of fixed shapes, so the
masks of K sub-networks stack on a leading axis (:func:`stack_masks`) and ``jax.vmap`` runs them
together. :func:`extract` builds the member as a standalone, physically smaller model whose weights
are slices of the supernet's (channel prefixes, centre taps of the kernels, the first blocks of
each stage); its outputs equal the supernet's under that sub-network's masks.

The functional form used inside jitted code is :class:`Supernet`: the graphs of the model in train
and eval mode and its state as pure dicts (``params``, BatchNorm ``stats``).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from research import nn
from research.nn.families import Family
from research.nn.families import Masks

PyTree = Any


class Supernet(NamedTuple):
    """A supernet split for functional use.

    Attributes:
      family: the model's :class:`research.nn.Family`.
      train_def: graph in train mode (BatchNorm uses and updates batch statistics).
      eval_def: graph in eval mode.
      params: pure dict of the ``nnx.Param`` values.
      stats: pure dict of everything else (BatchNorm running statistics; empty without BN).
      input_shape: one example's shape.
      num_classes: the head's outputs.
    """

    family: Family
    train_def: nnx.GraphDef
    eval_def: nnx.GraphDef
    params: PyTree
    stats: PyTree
    input_shape: tuple[int, ...]
    num_classes: int


def build_supernet(family: str | Family, input_shape: Sequence[int], num_classes: int, *, seed: int = 0) -> nnx.Module:
    """The largest member of ``family`` (the supernet), freshly initialised from ``seed``."""
    fam = nn.get_family(family) if isinstance(family, str) else family
    return nn.build_model(
        fam.name, input_shape=tuple(input_shape), num_classes=num_classes, rngs=nnx.Rngs(seed), **fam.largest()
    )


def split_supernet(model: nnx.Module, family: str | Family, input_shape: Sequence[int], num_classes: int) -> Supernet:
    """Splits a family model into a :class:`Supernet` (the model is left in eval mode).

    Raises:
      TypeError: ``model`` is not a family model (has no ``arch_masks``).
    """
    fam = nn.get_family(family) if isinstance(family, str) else family
    if not hasattr(model, "arch_masks"):
        raise TypeError(f"{type(model).__name__} is not a family model; build {fam.name!r} with build_supernet")
    model.train()
    train_def, params, stats = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_def = nnx.graphdef(model)
    return Supernet(
        fam, train_def, eval_def, nnx.to_pure_dict(params), nnx.to_pure_dict(stats), tuple(input_shape), num_classes
    )


def merge(net: Supernet, params: PyTree | None = None, stats: PyTree | None = None, *, train: bool = False):
    """The NNX supernet holding ``params``/``stats`` (the net's own by default)."""
    return nnx.merge(
        net.train_def if train else net.eval_def,
        net.params if params is None else params,
        net.stats if stats is None else stats,
        copy=True,
    )


def masks_for(net: Supernet, options: Mapping[str, Any]) -> Masks:
    """The masks of sub-network ``options`` in ``net``."""
    return nn.family_masks(merge(net), options)


def stack_masks(net: Supernet, options: Sequence[Mapping[str, Any]]) -> Masks:
    """The masks of several sub-networks stacked on a leading axis (for ``jax.vmap``).

    Raises:
      ValueError: ``options`` is empty.
    """
    if not options:
        raise ValueError("stack_masks needs at least one sub-network's options")
    model = merge(net)
    per = [nn.family_masks(model, o) for o in options]
    return jax.tree.map(lambda *a: jnp.stack(a), *per)


def apply(
    net: Supernet, params: PyTree, stats: PyTree, x: jax.Array, masks: Masks | None, *, train: bool = False
) -> tuple[jax.Array, PyTree]:
    """Pure forward pass of the sub-network ``masks``: ``(logits, new_stats)`` (stats change only in train mode)."""
    model = nnx.merge(net.train_def if train else net.eval_def, params, stats, copy=True)
    logits = model(x, masks)
    return logits, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))


def _slice_like(big: jax.Array, shape: tuple[int, ...], is_kernel: bool) -> jax.Array:
    index = []
    for axis, (n_big, n) in enumerate(zip(big.shape, shape, strict=True)):
        if n > n_big:
            raise ValueError(f"cannot extract a {shape} array from a {big.shape} one: axis {axis} grew")
        spatial = is_kernel and axis < big.ndim - 2
        lo = (n_big - n) // 2 if spatial else 0
        index.append(slice(lo, lo + n))
    return big[tuple(index)]


def extract(
    net: Supernet | nnx.Module,
    options: Mapping[str, Any],
    *,
    stats: PyTree | None = None,
    family: str | Family | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> nnx.Module:
    """The sub-network ``options`` as a standalone zoo model holding the supernet's weights (eval mode).

    Channel axes take the first channels, kernels' spatial axes their centre taps, each stage its
    first blocks; BatchNorm statistics come from ``stats`` (e.g. recalibrated for this sub-network
    by :func:`methods.nas.evaluate_subnets`) or the supernet's own.

    Args:
      net: a :class:`Supernet` (or a family model with ``family``, ``input_shape`` and ``num_classes``).
      options: the sub-network (family options; missing ones take the largest choice).
      stats: BatchNorm statistics of the supernet's structure to slice instead of its own.

    Raises:
      ValueError: an option outside its choices, or a member larger than the supernet.
    """
    if not isinstance(net, Supernet):
        if family is None or input_shape is None or num_classes is None:
            raise TypeError("extract from a model needs family=, input_shape= and num_classes= (or pass a Supernet)")
        net = split_supernet(net, family, input_shape, num_classes)
    opts = net.family.canonical(options)
    member = nn.build_model(
        net.family.name, input_shape=net.input_shape, num_classes=net.num_classes, rngs=nnx.Rngs(0), **opts
    )
    member.eval()
    source = {"params": net.params, "stats": net.stats if stats is None else stats}
    state = nnx.to_pure_dict(nnx.state(member))
    big = _merge_dicts(source["params"], source["stats"])

    def take(path, leaf):
        keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        b = big
        for k in keys:
            b = b[k]
        return _slice_like(jnp.asarray(b), tuple(leaf.shape), keys[-1] == "kernel")

    nnx.update(member, jax.tree_util.tree_map_with_path(take, state))
    return member


def _merge_dicts(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out
