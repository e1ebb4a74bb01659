"""Finding coupled channel dimensions from the model itself, by tracing its forward pass.

The model (evaluation mode) is traced with ``jax.make_jaxpr`` as a function of its parameters,
its other state (BatchNorm statistics) and a sample input. Every axis of every value in the
jaxpr is a node; a union-find joins the nodes that must hold the *same* channel index:

* elementwise ops (add, mul, max, ...) tie equal axes of operands and result (size-1 axes are
  broadcasts and tie nothing): this is how BatchNorm, activations and residual adds couple
  channels, the add of a ResNet block tying the channels of whole stages together;
* ``dot_general`` ties contracted axes of both operands and passes free/batch axes to the output
  (a Linear's input features to the previous layer's output);
* ``conv_general_dilated`` ties the input-feature axis to the kernel's ``I`` axis and the output
  feature axis to the kernel's ``O`` axis; a depthwise conv (``feature_group_count`` equal to the
  input channels, multiplier 1) ties input, kernel ``O`` and output channels together; other
  grouped convs pin their channels (not pruned);
* ``reshape`` that merges axes (the flatten before a Linear) records a *derived* edge: channel
  ``c`` of the source becomes the indices ``{o * C * inner + c * inner + i}`` of the merged axis;
* ``transpose``, ``broadcast_in_dim``, ``squeeze``, reductions, pooling windows, ``pad``,
  ``concatenate`` and nested calls (``jit``, ``custom_jvp_call``...) map axes as their semantics say;
* any other primitive pins every axis it touches (conservative: such channels are not pruned).

The model's input and output axes are pinned. A group of tied axes is prunable when nothing in
it is pinned, it contains the output axis of a Conv/Linear kernel (a *producer*), every leaf in
it belongs to a layer type that can be rebuilt smaller (Conv, Linear, BatchNorm), and its
derived (flattened) copies are clean too. This is the same idea as DepGraph (Fang et al. 2023)
applied to the traced program instead of framework modules, so user models built from the same
layer types work without annotations.

References:
  Fang et al., "DepGraph: Towards Any Structural Pruning", https://arxiv.org/abs/2301.12900
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.nn import iter_modules
from research.registry import Registry
from research.train import merge_model
from research.train import split_model
from research.tree import flatten_with_paths


@dataclasses.dataclass(frozen=True)
class Member:
    """One array axis that carries a group's channels.

    Attributes:
      collection: ``"params"`` or ``"state"`` (BatchNorm statistics etc.).
      path: the leaf path, e.g. ``"blocks/0/conv1/kernel"``.
      axis: the axis of that leaf.
      outer, inner: for a flattened copy, the axis has ``outer * C * inner`` entries and channel
        ``c`` owns ``{o * C * inner + c * inner + i}``; both 1 for a plain channel axis.
      role: ``"out"`` (kernel output axis: the producer), ``"in"`` (kernel input axis),
        ``"norm"`` (1-D normalisation parameter/statistic) or ``"other"``.
    """

    collection: str
    path: str
    axis: int
    outer: int = 1
    inner: int = 1
    role: str = "other"

    def indices(self, keep: np.ndarray, size: int) -> np.ndarray:
        """The entries of this axis that belong to the kept channels ``keep`` (of ``size``)."""
        keep = np.asarray(keep)
        o = np.arange(self.outer)[:, None, None] * (size * self.inner)
        c = keep[None, :, None] * self.inner
        i = np.arange(self.inner)[None, None, :]
        return (o + c + i).reshape(-1)


@dataclasses.dataclass
class ChannelGroup:
    """Coupled channel dimensions that must be pruned together.

    Attributes:
      name: the module path of the first producer (e.g. ``"blocks/0/conv1"``).
      size: number of channels.
      members: every leaf axis carrying these channels (plain and flattened).
      producers: the module paths whose kernel outputs these channels.
    """

    name: str
    size: int
    members: list[Member]
    producers: list[str]


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _is_literal(v) -> bool:
    return type(v).__name__ == "Literal"


class _Tracer:
    """Walks a jaxpr and records axis ties, pins and flatten edges."""

    def __init__(self):
        self.uf = _UnionFind()
        self.nodes: dict[tuple[int, Any, int], int] = {}
        self.pinned: set[int] = set()
        self.reasons: dict[int, str] = {}  # pinned node -> why (the first reason recorded)
        self.expand: list[tuple[int, int, int, int]] = []  # (src, dst, outer, inner): flatten
        self.split: list[tuple[int, int, int]] = []  # (src, dst, parts): an axis cut into equal parts
        self.reason = "model input/output"
        self._scopes = 0

    def node(self, scope: int, var, axis: int) -> int:
        key = (scope, var, axis)
        if key not in self.nodes:
            self.nodes[key] = self.uf.add()
        return self.nodes[key]

    def new_scope(self) -> int:
        self._scopes += 1
        return self._scopes

    # -- helpers used by the primitive rules
    def tie(self, scope, a, ax_a, b, ax_b):
        if _is_literal(a) or _is_literal(b):
            return
        self.uf.union(self.node(scope, a, ax_a), self.node(scope, b, ax_b))

    def pin(self, scope, v, axes=None):
        if _is_literal(v):
            return
        nd = len(v.aval.shape)
        for ax in range(nd) if axes is None else axes:
            n = self.node(scope, v, ax)
            self.pinned.add(n)
            self.reasons.setdefault(n, self.reason)

    def tie_or_pin(self, scope, v, out, ax, keep: bool):
        """Ties axis ``ax`` of ``v`` and ``out`` when ``keep``, else pins it on both."""
        if keep:
            self.tie(scope, v, ax, out, ax)
        else:
            self.pin(scope, v, [ax])
            self.pin(scope, out, [ax])

    def pin_all(self, scope, eqn):
        for v in list(eqn.invars) + list(eqn.outvars):
            if hasattr(v, "aval") and hasattr(v.aval, "shape"):
                self.pin(scope, v)

    def run(self, jaxpr, scope: int) -> None:
        for eqn in jaxpr.eqns:
            self.reason = _eqn_reason(eqn)
            rule = PRIMITIVE_RULES.get(eqn.primitive.name) if eqn.primitive.name in PRIMITIVE_RULES else None
            if rule is None:
                sub = _sub_jaxpr(eqn)
                if sub is not None:
                    self._call(eqn, sub, scope)
                else:
                    self.pin_all(scope, eqn)
            else:
                rule(self, eqn, scope)

    def _call(self, eqn, sub, scope):
        inner = sub.jaxpr if hasattr(sub, "jaxpr") and not hasattr(sub, "eqns") else sub
        if len(inner.invars) != len(eqn.invars) or len(inner.outvars) != len(eqn.outvars):
            self.pin_all(scope, eqn)
            return
        child = self.new_scope()
        for outer_v, inner_v in zip(eqn.invars, inner.invars, strict=False):
            if _is_literal(outer_v):
                continue
            for ax in range(len(outer_v.aval.shape)):
                self.uf.union(self.node(scope, outer_v, ax), self.node(child, inner_v, ax))
        self.run(inner, child)
        for outer_v, inner_v in zip(eqn.outvars, inner.outvars, strict=False):
            if _is_literal(inner_v):
                self.pin(scope, outer_v)
                continue
            for ax in range(len(outer_v.aval.shape)):
                self.uf.union(self.node(scope, outer_v, ax), self.node(child, inner_v, ax))


def _eqn_reason(eqn) -> str:
    """``"primitive 'name' in Class.method (file:line)"``: the operation that pinned an axis."""
    where, method = "", ""
    tb = getattr(eqn.source_info, "traceback", None)
    for fr in getattr(tb, "frames", ()) or ():
        library = any(f"/{lib}/" in fr.file_name for lib in ("jax", "jaxlib"))
        if not method and not library and "." in fr.function_name and not fr.function_name.startswith("_"):
            method = f" in {fr.function_name}"
        if not any(f"/{lib}/" in fr.file_name for lib in ("jax", "jaxlib", "flax")):
            where = f" (called at {fr.file_name.rpartition('/')[2]}:{fr.line_num})"
            break
    return f"primitive {eqn.primitive.name!r}{method}{where}"


def _sub_jaxpr(eqn):
    subs = [v for k, v in eqn.params.items() if k in ("jaxpr", "call_jaxpr", "fun_jaxpr")]
    subs = [s for s in subs if hasattr(s, "eqns") or hasattr(s, "jaxpr")]
    if eqn.primitive.name in ("cond", "while", "scan") or len(subs) != 1:
        return None
    return subs[0]


PRIMITIVE_RULES: Registry[Callable[[_Tracer, Any, int], None]] = Registry("channel-tracing primitive rule")


def _rule(*names):
    def deco(fn):
        for n in names:
            PRIMITIVE_RULES.register(n, fn)
        return fn

    return deco


_ELEMENTWISE = (
    "add",
    "sub",
    "mul",
    "div",
    "max",
    "min",
    "neg",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "rsqrt",
    "sqrt",
    "abs",
    "sign",
    "convert_element_type",
    "integer_pow",
    "pow",
    "square",
    "select_n",
    "clamp",
    "erf",
    "ge",
    "gt",
    "lt",
    "le",
    "eq",
    "ne",
    "and",
    "or",
    "not",
    "copy",
    "copy_p",
    "sin",
    "cos",
    "reduce_precision",
    "sharding_constraint",
    "stop_gradient",
    "nextafter",
    "round",
    "floor",
    "ceil",
    "is_finite",
    "erf_inv",
    "atan2",
    "rem",
    "add_any",
    "tan",
)


@_rule(*_ELEMENTWISE)
def _elementwise(t: _Tracer, eqn, scope):
    out = eqn.outvars[0]
    oshape = out.aval.shape
    for o in eqn.outvars[1:]:
        t.pin(scope, o)
    for v in eqn.invars:
        if _is_literal(v) or len(v.aval.shape) == 0:
            continue
        if len(v.aval.shape) != len(oshape):
            t.pin(scope, v)
            t.pin(scope, out)
            continue
        for ax, (a, b) in enumerate(zip(v.aval.shape, oshape, strict=False)):
            if a == b:
                t.tie(scope, v, ax, out, ax)
            elif a != 1:
                t.pin(scope, v, [ax])
                t.pin(scope, out, [ax])


@_rule("broadcast_in_dim")
def _broadcast(t, eqn, scope):
    (v,), out = eqn.invars[:1], eqn.outvars[0]
    dims = eqn.params["broadcast_dimensions"]
    for ax, d in enumerate(dims):
        if v.aval.shape[ax] == out.aval.shape[d]:
            t.tie(scope, v, ax, out, d)


@_rule("transpose")
def _transpose(t, eqn, scope):
    v, out = eqn.invars[0], eqn.outvars[0]
    for o_ax, i_ax in enumerate(eqn.params["permutation"]):
        t.tie(scope, v, i_ax, out, o_ax)


@_rule("squeeze")
def _squeeze(t, eqn, scope):
    v, out = eqn.invars[0], eqn.outvars[0]
    nd = len(v.aval.shape)
    dims = {d % nd for d in eqn.params["dimensions"]}
    kept = [a for a in range(nd) if a not in dims]
    for o_ax, i_ax in enumerate(kept):
        t.tie(scope, v, i_ax, out, o_ax)


@_rule(
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "argmax",
    "argmin",
    "reduce_and",
    "reduce_or",
)
def _reduce(t, eqn, scope):
    v, out = eqn.invars[0], eqn.outvars[0]
    axes = set(eqn.params["axes"])
    t.pin(scope, v, sorted(axes))
    kept = [a for a in range(len(v.aval.shape)) if a not in axes]
    for o_ax, i_ax in enumerate(kept):
        t.tie(scope, v, i_ax, out, o_ax)


@_rule("reduce_window_max", "reduce_window_min", "reduce_window_sum", "cumsum", "cummax")
def _window(t, eqn, scope):
    v, out = eqn.invars[0], eqn.outvars[0]
    p = eqn.params
    if "window_dimensions" not in p:  # cumulative ops along one axis
        t.pin(scope, v, [p["axis"]])
        t.pin(scope, out, [p["axis"]])
        for ax in range(len(v.aval.shape)):
            if ax != p["axis"]:
                t.tie(scope, v, ax, out, ax)
        return
    for ax in range(len(v.aval.shape)):
        plain = (
            p["window_dimensions"][ax] == 1
            and p["window_strides"][ax] == 1
            and tuple(p["padding"][ax]) == (0, 0)
            and p["base_dilation"][ax] == 1
            and p["window_dilation"][ax] == 1
        )
        t.tie_or_pin(scope, v, out, ax, plain)


@_rule("pad")
def _pad(t, eqn, scope):
    v, out = eqn.invars[0], eqn.outvars[0]
    for ax, cfg in enumerate(eqn.params["padding_config"]):
        t.tie_or_pin(scope, v, out, ax, tuple(cfg) == (0, 0, 0))


@_rule("concatenate")
def _concat(t, eqn, scope):
    out, dim = eqn.outvars[0], eqn.params["dimension"]
    for v in eqn.invars:
        for ax in range(len(out.aval.shape)):
            if ax == dim:
                t.pin(scope, v, [ax])
                t.pin(scope, out, [ax])
            else:
                t.tie(scope, v, ax, out, ax)


@_rule("dot_general")
def _dot(t, eqn, scope):
    lhs, rhs = eqn.invars[:2]
    out = eqn.outvars[0]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc, strict=False):
        t.tie(scope, lhs, a, rhs, b)
    if lb:  # activation x activation (attention's q.k and weights.v): the contracted size enters
        # scale factors the trace cannot see (1/sqrt(head_dim)), so those axes are not pruned
        t.pin(scope, lhs, list(lc))
    for i, (a, b) in enumerate(zip(lb, rb, strict=False)):
        t.tie(scope, lhs, a, rhs, b)
        t.tie(scope, lhs, a, out, i)
    o = len(lb)
    for a in range(len(lhs.aval.shape)):
        if a not in lc and a not in lb:
            t.tie(scope, lhs, a, out, o)
            o += 1
    for b in range(len(rhs.aval.shape)):
        if b not in rc and b not in rb:
            t.tie(scope, rhs, b, out, o)
            o += 1


@_rule("conv_general_dilated")
def _conv(t, eqn, scope):
    lhs, rhs = eqn.invars[:2]
    out = eqn.outvars[0]
    dn = eqn.params["dimension_numbers"]
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    if eqn.params["batch_group_count"] != 1:
        t.pin_all(scope, eqn)
        return
    t.tie(scope, lhs, lspec[0], out, ospec[0])
    t.pin(scope, lhs, list(lspec[2:]))
    t.pin(scope, out, list(ospec[2:]))
    groups = eqn.params["feature_group_count"]
    cin = lhs.aval.shape[lspec[1]]
    cout = rhs.aval.shape[rspec[0]]
    if groups == 1:
        t.tie(scope, lhs, lspec[1], rhs, rspec[1])
        t.tie(scope, out, ospec[1], rhs, rspec[0])
    elif groups == cin and cout == cin:  # depthwise, multiplier 1
        t.tie(scope, lhs, lspec[1], out, ospec[1])
        t.tie(scope, out, ospec[1], rhs, rspec[0])
    else:
        t.pin(scope, lhs, [lspec[1]])
        t.pin(scope, out, [ospec[1]])
        t.pin(scope, rhs, [rspec[0], rspec[1]])


@_rule("slice")
def _slice(t, eqn, scope):
    """A slice keeping a whole axis ties it; a cut axis (a time step, ``h[:, -1]``) is pinned."""
    v, out = eqn.invars[0], eqn.outvars[0]
    strides = eqn.params.get("strides") or (1,) * len(v.aval.shape)
    bounds = zip(eqn.params["start_indices"], eqn.params["limit_indices"], strides, strict=True)
    for ax, (start, limit, step) in enumerate(bounds):
        t.tie_or_pin(scope, v, out, ax, start == 0 and limit == v.aval.shape[ax] and step == 1)


@_rule("scan")
def _scan(t, eqn, scope):
    """``lax.scan`` (``nnx.RNN``, ``nnx.scan``): the body is traced once; a carry ties its input,
    its output and the body's carry in and out; scanned inputs/outputs drop their leading
    (time) axis inside the body, which is pinned."""
    body = eqn.params["jaxpr"]
    inner = body.jaxpr if hasattr(body, "jaxpr") else body
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    if len(inner.invars) != len(eqn.invars) or len(inner.outvars) != len(eqn.outvars):
        t.pin_all(scope, eqn)
        return
    child = t.new_scope()

    def link(outer_v, inner_v, scanned):
        if _is_literal(outer_v) or _is_literal(inner_v):
            if not _is_literal(outer_v):
                t.pin(scope, outer_v)
            return
        if scanned:
            t.pin(scope, outer_v, [0])
        shift = 1 if scanned else 0
        for ax in range(len(inner_v.aval.shape)):
            t.uf.union(t.node(scope, outer_v, ax + shift), t.node(child, inner_v, ax))

    for i, (outer_v, inner_v) in enumerate(zip(eqn.invars, inner.invars, strict=True)):
        link(outer_v, inner_v, scanned=i >= n_consts + n_carry)
    t.run(inner, child)
    for j, (outer_v, inner_v) in enumerate(zip(eqn.outvars, inner.outvars, strict=True)):
        link(outer_v, inner_v, scanned=j >= n_carry)
        if j < n_carry and not _is_literal(inner_v):
            carried_in = inner.invars[n_consts + j]
            for ax in range(len(inner_v.aval.shape)):
                t.uf.union(t.node(child, inner_v, ax), t.node(child, carried_in, ax))


@_rule("split")
def _split(t, eqn, scope):
    """``jnp.split`` into equal parts (a GRU's r/z/n gates): the parts' axis is one channel group
    whose channel ``c`` owns entries ``{o * C + c}`` of the input axis."""
    v, outs, ax = eqn.invars[0], eqn.outvars, eqn.params["axis"]
    sizes = eqn.params["sizes"]
    for o in outs:
        for a in range(len(v.aval.shape)):
            if a != ax:
                t.tie(scope, v, a, o, a)
    if len(set(sizes)) != 1:
        t.pin(scope, v, [ax])
        for o in outs:
            t.pin(scope, o, [ax])
        return
    for o in outs[1:]:
        t.tie(scope, outs[0], ax, o, ax)
    t.split.append((t.node(scope, outs[0], ax), t.node(scope, v, ax), len(outs)))


@_rule("reshape")
def _reshape(t, eqn, scope):
    v, out = eqn.invars[0], eqn.outvars[0]
    if eqn.params.get("dimensions") is not None:
        t.pin_all(scope, eqn)
        return
    ishape, oshape = v.aval.shape, out.aval.shape
    iax = [a for a, n in enumerate(ishape) if n != 1]
    oax = [a for a, n in enumerate(oshape) if n != 1]
    i = j = 0
    while i < len(iax) and j < len(oax):
        bi, bj = [iax[i]], [oax[j]]
        pi, pj = ishape[iax[i]], oshape[oax[j]]
        while pi != pj:
            if pi < pj:
                i += 1
                bi.append(iax[i])
                pi *= ishape[iax[i]]
            else:
                j += 1
                bj.append(oax[j])
                pj *= oshape[oax[j]]
        i, j = i + 1, j + 1
        if len(bi) == 1 and len(bj) == 1:
            t.tie(scope, v, bi[0], out, bj[0])
        elif len(bj) == 1:  # merge (flatten): a derived edge per source axis
            sizes = [ishape[a] for a in bi]
            for k, a in enumerate(bi):
                outer = math.prod(sizes[:k])
                inner = math.prod(sizes[k + 1 :])
                t.expand.append((t.node(scope, v, a), t.node(scope, out, bj[0]), outer, inner))
        else:
            t.pin(scope, v, bi)
            t.pin(scope, out, bj)


# ----------------------------------------------------------------------------- layer types

_PRODUCER_TYPES = (nnx.Conv, nnx.Linear, nnx.LinearGeneral)
_NORM_TYPES = (nnx.BatchNorm,)

#: Why a group's channels are the model's own input or output (not a reason to warn about).
MODEL_IO = "model input/output"


def _leaf_module(modules: dict[str, nnx.Module], path: str) -> tuple[str, Any, str]:
    mpath, _, attr = path.rpartition("/")
    return mpath, modules.get(mpath), attr


def _role(module, attr: str, axis: int, ndim: int) -> str:
    if isinstance(module, nnx.LinearGeneral):
        # kernel (*batch, *in_features, *out_features); the first output axis carries the units
        # (the heads of an attention projection, out_features=(heads, head_dim)): the other
        # output axes are inside a unit and are not pruned on their own
        n_in, n_batch = len(module.in_features), len(module.batch_axis)
        if attr == "kernel":
            if axis == n_batch + n_in:
                return "out"
            return "in" if n_batch <= axis < n_batch + n_in else "other"
        if attr == "bias":
            return "bias" if axis == n_batch else "other"
        return "other"
    if isinstance(module, _PRODUCER_TYPES) and attr == "kernel":
        return "out" if axis == ndim - 1 else ("in" if axis == ndim - 2 else "other")
    if isinstance(module, _PRODUCER_TYPES) and attr == "bias":
        return "bias"
    if isinstance(module, _NORM_TYPES):
        return "norm"
    return "other"


def trace_groups(model: nnx.Module, sample_input: jax.Array, *, return_skipped: bool = False):
    """The prunable channel groups of ``model``, found by tracing it on ``sample_input``.

    Args:
      model: an NNX model (not modified).
      sample_input: a batch of inputs (only its shape and dtype matter). Use a batch of 2 or more.
      return_skipped: also return why the other layers' output channels cannot be pruned.

    Returns:
      The groups, in the order of their first producer's parameter path; with
      ``return_skipped``, ``(groups, skipped)`` where ``skipped`` maps each Conv/Linear/LinearGeneral
      module path whose output channels are in no group to the reason (``MODEL_IO`` for the layers
      that compute the model's output).
    """
    from methods.pruning.structured.rebuild import can_rebuild

    model = nnx.clone(model)
    defs, params, state = split_model(model)
    modules = dict(iter_modules(model, include_root=True))
    x = jnp.asarray(sample_input)

    def forward(p, s, xx):
        return merge_model(defs.eval, p, s)(xx)

    closed = jax.make_jaxpr(forward)(params, state, x)
    jaxpr = closed.jaxpr
    tracer = _Tracer()
    scope = tracer.new_scope()
    named = [("params", p, leaf) for p, leaf in flatten_with_paths(params)]
    named += [("state", p, leaf) for p, leaf in flatten_with_paths(state)]
    if len(named) + 1 != len(jaxpr.invars):
        raise RuntimeError(
            f"traced {len(jaxpr.invars)} inputs but the model has {len(named)} leaves + 1 input; "
            "structured pruning needs a model whose forward pass takes one array"
        )
    tracer.reason = MODEL_IO
    tracer.pin(scope, jaxpr.invars[-1])
    for v in jaxpr.outvars:
        tracer.pin(scope, v)
    tracer.run(jaxpr, scope)

    uf = tracer.uf
    members: dict[int, list[Member]] = {}
    for (coll, path, leaf), var in zip(named, jaxpr.invars, strict=False):
        nd = len(np.shape(leaf))
        mpath, module, attr = _leaf_module(modules, path)
        for ax in range(nd):
            key = (scope, var, ax)
            if key not in tracer.nodes:
                continue
            root = uf.find(tracer.nodes[key])
            members.setdefault(root, []).append(Member(coll, path, ax, role=_role(module, attr, ax, nd)))
    pinned: dict[int, str] = {}
    for n in sorted(tracer.pinned):
        r = uf.find(n)
        # the model's own input/output is the most telling reason when a group has several
        if r not in pinned or tracer.reasons[n] == MODEL_IO:
            pinned[r] = tracer.reasons[n]
    # a layer called in a loop (a recurrent cell) repeats its edges: keep each once
    expand = list(dict.fromkeys((uf.find(s), uf.find(d), o, i) for s, d, o, i in tracer.expand))
    splits = list(dict.fromkeys((uf.find(s), uf.find(d), k) for s, d, k in tracer.split))
    sizes = {uf.find(n): None for n in tracer.nodes.values()}
    for (_sc, var, ax), n in tracer.nodes.items():
        sizes[uf.find(n)] = var.aval.shape[ax]

    def unclean(root) -> str | None:
        if root in pinned:
            return f"pinned by {pinned[root]}"
        for m in members.get(root, []):
            mod = _leaf_module(modules, m.path)[1]
            if not can_rebuild(mod):
                where = m.path.rpartition("/")[0] or "<the model itself>"
                return (
                    f"its channels reach {m.path!r} of {type(mod).__name__} {where!r}, which cannot be rebuilt smaller"
                )
        return None

    def has_producer(root) -> bool:
        return any(m.role == "out" for m in members.get(root, []))

    split_dst = {d for _, d, _ in splits}
    derived_dst = {d for _, d, _, _ in expand}
    why: dict[int, str] = {}
    candidates = set()
    for r in members:
        if not (has_producer(r) or any(s == r for s, _, _ in splits)):
            continue
        reason = unclean(r)
        for s, d, _ in splits:
            if s == r and reason is None:
                reason = unclean(d)
        if reason is None and sizes[r] <= 1:
            reason = "a single channel"
        if reason is None and r in split_dst:
            reason = "split into gates: pruned through the gates' channel group"
        if reason is None and r in derived_dst:
            reason = "flattened into a later layer together with other axes"
        if reason is None and not (has_producer(r) or any(has_producer(d) for s, d, _ in splits if s == r)):
            reason = "no layer produces these channels"
        if reason is None:
            candidates.add(r)
        else:
            why[r] = reason
    changed = True
    while changed:
        changed = False
        for s, d, _, _ in expand:
            if s not in candidates:
                continue
            other_sources = [s2 for s2, d2, _, _ in expand if d2 == d and s2 != s and s2 in candidates]
            bad = unclean(d)
            if bad is None and has_producer(d):
                bad = "flattened into an axis that a layer also produces"
            if bad is None and any(s2 == d for s2, _, _, _ in expand):
                bad = "flattened twice"
            if bad is None and other_sources:
                bad = "flattened into a layer together with other channel groups"
            if bad is not None:
                candidates.discard(s)
                why[s] = f"flattened into a later layer whose input is {bad}"
                changed = True

    groups = []
    for root in candidates:
        ms = list(members[root])
        for s, d, outer, inner in expand:
            if s == root:
                ms += [dataclasses.replace(m, outer=outer, inner=inner) for m in members.get(d, [])]
        for s, d, parts in splits:
            if s == root:
                ms += [dataclasses.replace(m, outer=parts) for m in members.get(d, [])]
        producers = sorted({m.path.rpartition("/")[0] for m in ms if m.role == "out"})
        groups.append(ChannelGroup(name=producers[0], size=int(sizes[root]), members=ms, producers=producers))
    groups.sort(key=lambda g: g.name)
    if not return_skipped:
        return groups
    in_groups = {p for g in groups for p in g.producers}
    skipped: dict[str, str] = {}
    for r, ms in members.items():
        for m in ms:
            mpath = m.path.rpartition("/")[0]
            if m.role == "out" and mpath not in in_groups and mpath not in skipped:
                skipped[mpath] = why.get(r) or unclean(r) or "not prunable"
    return groups, dict(sorted(skipped.items()))
