"""Rebuilding layers with fewer features: a registry of builders by layer type.

``register_rebuilder(nnx.Conv)`` registers ``fn(old_module, new_leaves) -> new_module`` where
``new_leaves`` maps attribute names (``kernel``, ``bias``, ``scale``, ``mean`` ...) to the sliced
arrays. Builders construct a **new** module of the same type with the new sizes and copy every
other setting of the old one (strides, padding, epsilon, dtypes...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from research.registry import Registry

Rebuilder = Callable[[nnx.Module, dict[str, Any]], nnx.Module]
# Keyed by the layer's exact type as "module.QualName" (a registry name is a string).
REBUILDERS: Registry[Rebuilder] = Registry(
    "layer rebuilder", hint="register one with methods.pruning.structured.register_rebuilder(LayerType)"
)


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def register_rebuilder(module_type: type) -> Callable[[Rebuilder], Rebuilder]:
    """Registers the builder of smaller ``module_type`` layers.

    Raises:
      DuplicateNameError: the type already has another rebuilder (a ``ValueError``).
    """
    return REBUILDERS.register(_type_name(module_type))


def can_rebuild(module: Any) -> bool:
    """Whether ``module``'s exact type has a registered rebuilder."""
    return module is not None and _type_name(type(module)) in REBUILDERS


def rebuild(module: nnx.Module, leaves: dict[str, Any]) -> nnx.Module:
    """A new module like ``module`` holding ``leaves`` (sliced arrays).

    Raises:
      TypeError: no rebuilder for the module's type.
    """
    if not can_rebuild(module):
        raise TypeError(
            f"cannot rebuild {type(module).__name__}: {REBUILDERS.unknown_message(_type_name(type(module)))}"
        )
    return REBUILDERS.get(_type_name(type(module)))(module, leaves)


def _set(variable, value):
    variable.set_value(jax.device_put(value))


def _filled(new: nnx.Module, old: nnx.Module, leaves: dict[str, Any]) -> nnx.Module:
    """``new`` (a Conv/Linear/LinearGeneral shell) holding the sliced kernel and, if ``old`` has one, bias."""
    _set(new.kernel, leaves["kernel"])
    if old.use_bias:
        _set(new.bias, leaves["bias"])
    return new


# Modules are built with nnx.eval_shape (no random initialisation is computed) and every
# variable is then set from the sliced arrays.


@register_rebuilder(nnx.Conv)
def _conv(m: nnx.Conv, leaves):
    if m.mask is not None:
        raise TypeError("cannot rebuild an nnx.Conv with a weight mask; remove the mask first")
    kernel = leaves["kernel"]
    out_f, in_per_group = kernel.shape[-1], kernel.shape[-2]
    groups = 1 if m.feature_group_count == 1 else out_f  # pruned grouped convs are depthwise (x1)
    new = nnx.eval_shape(
        lambda: nnx.Conv(
            in_per_group * groups,
            out_f,
            m.kernel_size,
            m.strides,
            padding=m.padding,
            input_dilation=m.input_dilation,
            kernel_dilation=m.kernel_dilation,
            feature_group_count=groups,
            use_bias=m.use_bias,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            precision=m.precision,
            conv_general_dilated=m.conv_general_dilated,
            promote_dtype=m.promote_dtype,
            preferred_element_type=m.preferred_element_type,
            rngs=nnx.Rngs(0),
        )
    )
    return _filled(new, m, leaves)


@register_rebuilder(nnx.Linear)
def _linear(m: nnx.Linear, leaves):
    kernel = leaves["kernel"]
    new = nnx.eval_shape(
        lambda: nnx.Linear(
            kernel.shape[0],
            kernel.shape[1],
            use_bias=m.use_bias,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            precision=m.precision,
            dot_general=m.dot_general,
            promote_dtype=m.promote_dtype,
            preferred_element_type=m.preferred_element_type,
            rngs=nnx.Rngs(0),
        )
    )
    return _filled(new, m, leaves)


@register_rebuilder(nnx.BatchNorm)
def _batchnorm(m: nnx.BatchNorm, leaves):
    n = leaves["mean"].shape[0]
    new = nnx.eval_shape(
        lambda: nnx.BatchNorm(
            n,
            use_running_average=m.use_running_average,
            axis=m.axis,
            momentum=m.momentum,
            epsilon=m.epsilon,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            use_bias=m.use_bias,
            use_scale=m.use_scale,
            axis_name=m.axis_name,
            axis_index_groups=m.axis_index_groups,
            use_fast_variance=m.use_fast_variance,
            promote_dtype=m.promote_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    _set(new.mean, leaves["mean"])
    _set(new.var, leaves["var"])
    if m.use_scale:
        _set(new.scale, leaves["scale"])
    if m.use_bias:
        _set(new.bias, leaves["bias"])
    return new


@register_rebuilder(nnx.LinearGeneral)
def _linear_general(m: nnx.LinearGeneral, leaves):
    kernel = leaves["kernel"]
    n_batch, n_in = len(m.batch_axis), len(m.in_features)
    batch_axis = dict(zip(m.batch_axis.keys(), kernel.shape[:n_batch], strict=True))
    new = nnx.eval_shape(
        lambda: nnx.LinearGeneral(
            kernel.shape[n_batch : n_batch + n_in],
            kernel.shape[n_batch + n_in :],
            axis=m.axis,
            batch_axis=batch_axis,
            use_bias=m.use_bias,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            precision=m.precision,
            promote_dtype=m.promote_dtype,
            dot_general=m.dot_general,
            dot_general_cls=m.dot_general_cls,
            preferred_element_type=m.preferred_element_type,
            rngs=nnx.Rngs(0),
        )
    )
    return _filled(new, m, leaves)


# ----------------------------------------------------------------------------- containers

Fixup = Callable[[nnx.Module], None]
# Containers whose own attributes record their children's sizes (a MultiHeadAttention's num_heads):
# after their children were rebuilt smaller, ``fn(container)`` sets those attributes again.
FIXUPS: Registry[Fixup] = Registry(
    "container fix-up after channel removal",
    hint="register one with methods.pruning.structured.register_fixup(ContainerType)",
)


def register_fixup(container_type: type) -> Callable[[Fixup], Fixup]:
    """Registers ``fn(container)`` that updates ``container_type``'s size attributes in place.

    Raises:
      DuplicateNameError: the type already has another fix-up (a ``ValueError``).
    """
    return FIXUPS.register(_type_name(container_type))


def fix_containers(model: nnx.Module) -> None:
    """Runs the registered fix-up of every container in ``model`` (in place)."""
    from research.nn import iter_modules

    for _, module in iter_modules(model, include_root=True):
        name = _type_name(type(module))
        if name in FIXUPS:
            FIXUPS.get(name)(module)


@register_fixup(nnx.MultiHeadAttention)
def _fix_attention(m: nnx.MultiHeadAttention) -> None:
    heads, head_dim = m.query.out_features
    m.num_heads = heads
    m.num_kv_heads = m.key.out_features[0]
    m.head_dim = head_dim
    m.qkv_features = heads * head_dim
    m.in_features = m.query.in_features[0]
    m.in_kv_features = m.key.in_features[0]
    m.out_features = m.out.out_features[0]


@register_fixup(nnx.GRUCell)
def _fix_gru(m: nnx.GRUCell) -> None:
    m.in_features = m.dense_i.in_features
    m.hidden_features = m.dense_h.in_features
