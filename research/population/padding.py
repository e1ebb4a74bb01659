"""Trials whose models differ only in inner sizes (factorization ranks) trained as one program.

A vmapped program needs every trial's arrays at one shape. Layers whose size is a free choice of
the trial (a low-rank layer's rank, a Tucker-2 convolution's two ranks) are registered here with
:func:`register_resizable`; the population executor then groups a later stage's fine-tuning
requests by the model graph *with those sizes set to 1* (:func:`canonical_graphdef`), pads each
trial's layers to the largest sizes of its group (:func:`pad_models`: the new components are
zeros), trains the group as one program and slices every trained array back to the trial's own
shapes (:func:`unpad_model`, :func:`unpad_tree`).

Why zeros need no mask: in a factorization the padded components enter the output only through
products of factors that are all zero in those components, so the loss does not depend on any
single one of them at zero, their gradients are zero, and an optimizer whose update is zero for a
zero gradient (SGD, momentum, Adam, AdamW: weight decay of zero is zero) keeps them at zero. The
padded model computes the same function as the trial's own, and trains the same way up to the
summation order of the padded contractions (float rounding). A registered layer must have this
property: every size it declares is an axis where the components beyond a smaller size are
multiplied only by each other.

Choices that are not sizes but constants of a module's code (a quantizer's bit width) are
registered with :func:`register_liftable`: a *lifted* copy of the module holds the choice as a value
in its state and has one graph whatever the choice. Requests are grouped by the lifted graph too;
when a group's choices differ, every model trains lifted (:func:`lift_models`) and is cut back to its
own graph afterwards (:func:`unpad_tree` drops the lifted values).

The registries are filled by the method packages (``methods.decomposition`` registers its factorized
layers, ``methods.quantization`` its fake quantizers); the core names none of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.nn import get_module
from research.nn import iter_modules
from research.nn import replace_module


@dataclasses.dataclass(frozen=True)
class Resizable:
    """How to read and change a layer class's free sizes.

    Attributes:
      sizes: ``layer -> tuple of ints`` (e.g. ``(rank,)``).
      resized: ``(layer, sizes) -> a layer of the same class and options with those sizes`` (its
        values are replaced: it may be built with any initialisation, under ``nnx.eval_shape``).
    """

    sizes: Callable[[nnx.Module], tuple[int, ...]]
    resized: Callable[[nnx.Module, tuple[int, ...]], nnx.Module]


RESIZABLE: dict[type, Resizable] = {}
"""Layer class -> :class:`Resizable`; see :func:`register_resizable`."""


def register_resizable(
    cls: type,
    *,
    sizes: Callable[[nnx.Module], tuple[int, ...]],
    resized: Callable[[nnx.Module, tuple[int, ...]], nnx.Module],
) -> None:
    """Declares ``cls``'s free sizes (see the module docstring for what zero padding requires)."""
    RESIZABLE[cls] = Resizable(sizes=sizes, resized=resized)


@dataclasses.dataclass(frozen=True)
class Liftable:
    """How a module class's choice (a constant of its code) becomes a value in its state.

    Attributes:
      values: ``module -> tuple`` of the choice (e.g. ``(bits,)``); modules with equal values
        compute alike.
      lift: ``module -> None``, in place (on a copy): the module keeps computing the same function
        with the choice read from a variable of its state, and its graph no longer depends on the
        choice (equal for every value).
    """

    values: Callable[[nnx.Module], tuple]
    lift: Callable[[nnx.Module], None]


LIFTABLE: dict[type, Liftable] = {}
"""Module class -> :class:`Liftable`; see :func:`register_liftable`."""


def register_liftable(cls: type, *, values: Callable[[nnx.Module], tuple], lift: Callable[[nnx.Module], None]) -> None:
    """Declares that ``cls``'s choice ``values(module)`` can be lifted into its state by ``lift``."""
    LIFTABLE[cls] = Liftable(values=values, lift=lift)


def liftable_modules(model: nnx.Module) -> dict[str, tuple]:
    """``{path: values}`` of the registered liftable modules in ``model`` (paths as
    :func:`research.nn.iter_modules` writes them)."""
    return {p: tuple(LIFTABLE[type(m)].values(m)) for p, m in iter_modules(model) if type(m) in LIFTABLE}


def lift_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every registered liftable module lifted (same function, one graph
    for every choice)."""
    model = nnx.clone(model)
    for _, m in iter_modules(model):
        if type(m) in LIFTABLE:
            LIFTABLE[type(m)].lift(m)
    return model


def lift_models(models: Sequence[nnx.Module]) -> tuple[list[nnx.Module], dict[str, list]]:
    """The models lifted when their liftable modules' choices differ (``({path: sorted distinct
    values}`` of the paths where they differ``)``), else unchanged with ``{}``.

    Raises:
      ValueError: the models' liftable modules are not at the same paths (different graphs).
    """
    found = [liftable_modules(m) for m in models]
    if not any(found):
        return list(models), {}
    if any(set(f) != set(found[0]) for f in found):
        raise ValueError("the models' liftable modules are at different paths; they cannot train as one graph")
    differ = {p: sorted({f[p] for f in found}) for p in found[0] if len({f[p] for f in found}) > 1}
    if not differ:
        return list(models), {}
    return [lift_model(m) for m in models], differ


def resizable_layers(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """``{path: sizes}`` of the registered layers in ``model`` (outermost only; paths as
    :func:`research.nn.iter_modules` writes them, e.g. ``"layers/0"``)."""
    found = {p: m for p, m in iter_modules(model) if type(m) in RESIZABLE}
    outer = [p for p in found if not any(p.startswith(q + "/") for q in found)]
    return {p: tuple(int(s) for s in RESIZABLE[type(found[p])].sizes(found[p])) for p in sorted(outer)}


def _fit(values: Any, shape: tuple[int, ...]) -> jax.Array:
    """``values`` in the leading corner of zeros of ``shape`` (or its leading corner of that shape)."""
    values = np.asarray(values)
    if values.ndim != len(shape):
        raise ValueError(f"an array of shape {values.shape} cannot take the shape {shape}: different ranks")
    out = np.zeros(shape, values.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(values.shape, shape, strict=True))
    out[common] = values[common]
    return jnp.asarray(out)


def _with_sizes(model: nnx.Module, sizes: dict[str, tuple[int, ...]], fill: bool) -> nnx.Module:
    """A copy of ``model`` whose registered layers at ``sizes``' paths have those sizes; with
    ``fill`` their arrays are the old ones padded with zeros (or cut), else left abstract."""
    model = nnx.clone(model)
    for path, new in sizes.items():
        layer = get_module(model, path)
        spec = RESIZABLE[type(layer)]
        if tuple(spec.sizes(layer)) == tuple(new):
            continue
        shell = nnx.eval_shape(lambda layer=layer, spec=spec, new=new: spec.resized(layer, tuple(new)))
        graph, shapes = nnx.split(shell)
        if fill:
            _, old = nnx.split(layer)
            shapes = jax.tree.map(lambda a, v: _fit(v, a.shape), shapes, old)
        replace_module(model, path, nnx.merge(graph, shapes), copy=False)
    return model


def canonical_graphdef(model: nnx.Module) -> Any:
    """The graph of ``model`` lifted (:func:`lift_model`) and with every registered layer's sizes
    set to 1: equal for models that differ only in those sizes and lifted choices (the grouping key
    of :func:`pad_models` and :func:`lift_models`). A layer whose ``resized`` refuses it (raises
    ``TypeError``, e.g. a sub-layer wrapped by a fake quantizer) leaves the model's sizes: it groups
    only with models of its exact shapes."""
    if liftable_modules(model):
        model = lift_model(model)
    layers = resizable_layers(model)
    if not layers:
        return nnx.graphdef(model)
    ones = {p: (1,) * len(s) for p, s in layers.items()}
    try:
        return nnx.graphdef(_with_sizes(model, ones, fill=False))
    except TypeError:
        return nnx.graphdef(model)


def pad_models(models: Sequence[nnx.Module]) -> tuple[list[nnx.Module], bool]:
    """Each model with its registered layers padded with zeros to the largest sizes among ``models``
    at the same path; ``(models, whether any was padded)``.

    Raises:
      ValueError: the models' registered layers are not at the same paths (different graphs).
    """
    layers = [resizable_layers(m) for m in models]
    if not any(layers):
        return list(models), False
    paths = set(layers[0])
    if any(set(ls) != paths for ls in layers):
        raise ValueError("the models' resizable layers are at different paths; they cannot be padded to one graph")
    target = {p: tuple(int(v) for v in np.max([ls[p] for ls in layers], axis=0)) for p in paths}
    if all(ls == target for ls in layers):
        return list(models), False
    return [_with_sizes(m, target, fill=True) for m in models], True


def unpad_tree(padded: Any, template: Any) -> Any:
    """``padded``'s arrays cut to the shapes of ``template``'s (the same tree at the trial's own
    sizes: a model state, a train state, an optimizer state); the entries of its dicts that
    ``template``'s lack (a lifted model's values, :func:`lift_models`) are dropped."""
    if isinstance(template, dict):
        return {k: unpad_tree(padded[k], t) for k, t in template.items()}
    leaves, treedef = jax.tree.flatten(template, is_leaf=lambda x: isinstance(x, dict))
    if jax.tree_util.treedef_is_leaf(treedef):  # an array
        return _fit(padded, np.shape(template)) if np.shape(padded) != np.shape(template) else padded
    cut = [unpad_tree(p, t) for p, t in zip(treedef.flatten_up_to(padded), leaves, strict=True)]
    return jax.tree.unflatten(treedef, cut)


def unpad_model(padded: nnx.Module, original: nnx.Module) -> nnx.Module:
    """The trained ``padded`` model at ``original``'s sizes and graph (``original``'s graph,
    ``padded``'s values; lifted values dropped)."""
    graph, template = nnx.split(original)
    _, values = nnx.split(padded)
    return nnx.merge(graph, unpad_tree(nnx.to_pure_dict(values), nnx.to_pure_dict(template)))
