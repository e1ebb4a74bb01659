"""Turning an NNX model into an exportable function, and naming the op that cannot export.

The exporters need a pure function ``x -> y`` with the weights baked in as constants. For an
``nnx.Module`` this is ``nnx.merge(graphdef, state)(x)`` on an eval-mode clone (BatchNorm uses
its running statistics, Dropout is off); the caller's model is left untouched.

When a converter rejects the program, :func:`diagnose` finds the JAX primitive responsible: it
walks the jaxpr (including nested jaxprs of ``jit``, ``custom_jvp`` ...), prefers equations whose
source line is the one the converter's error points at, and converts each candidate primitive on
its own until one fails the same way. The layer path comes from the NNX module whose
``__call__`` frame is in the equation's traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from research.nn.flax_errors import flax_boundary

#: Layer paths that stand for the model itself start with this (then "the model's own __call__ (Cls)").
ROOT_PREFIX = "<model>"

_LOCATION_RE = re.compile(r"([^\s:|]+\.py):(\d+):\d+: error: (.*?)(?: \||$)", re.MULTILINE)


class UnsupportedOpError(RuntimeError):
    """An operation in the model cannot be converted to the requested format.

    Attributes:
      target: the format that failed (e.g. ``"tflite"``).
      primitive: the JAX primitive name (e.g. ``"fft"``), or None if it could not be isolated.
      layer_paths: NNX module paths that issued the primitive (more than one when several
        modules of the same class exist), empty when unknown.
      location: ``file:line (function)`` of the user frame that issued the primitive.
      detail: the converter's own message, shortened.
      via: the converter that failed (``"tflite"`` for an ONNX export, which converts the TFLite
        file); equals ``target`` when the format's own converter failed.
      drop: the requested formats that need the failing conversion (named in the message).
    """

    def __init__(
        self,
        target: str,
        primitive: str | None,
        layer_paths: Sequence[str],
        location: str,
        detail: str,
        *,
        via: str | None = None,
        drop: Sequence[str] | None = None,
    ):
        self.target = target
        self.primitive = primitive
        self.layer_paths = tuple(layer_paths)
        self.location = location
        self.detail = detail
        self.via = via or target
        self.drop = tuple(drop or (target,))
        where = ""
        named = [p for p in self.layer_paths if not p.startswith(ROOT_PREFIX)]
        roots = [p for p in self.layer_paths if p.startswith(ROOT_PREFIX)]
        if named:
            where = f" in layer {named[0]!r}" if len(named) == 1 else f" in one of the layers {named}"
        elif roots:
            where = f" in {roots[0][len(ROOT_PREFIX) :]}"
        prim = f"JAX primitive {primitive!r}" if primitive else "an operation"
        through = "" if self.via == target else f", which the {target} export goes through"
        super().__init__(
            f"{target} export failed: {prim}{where} is not supported by the {self.via} converter{through}"
            f" (issued at {location or 'unknown location'}). Replace that operation in the model"
            f" (or drop {' and '.join(repr(d) for d in self.drop)} from formats). Converter said: {detail}"
        )

    def short(self) -> str:
        """One line: the primitive and where, without the converter's text."""
        prim = f"JAX primitive {self.primitive!r}" if self.primitive else "an operation"
        return f"{prim} at {self.location or 'unknown location'} is not supported by the {self.via} converter"

    def retarget(self, target: str, *, via: str, drop: Sequence[str]) -> UnsupportedOpError:
        """The same failure, reported for the requested format ``target`` that needed converter ``via``."""
        return UnsupportedOpError(
            target, self.primitive, self.layer_paths, self.location, self.detail, via=via, drop=drop
        )


def inference_fn(model: Any) -> Callable[[jax.Array], jax.Array]:
    """Returns a pure inference function for an NNX module (eval mode) or a callable.

    Args:
      model: an ``nnx.Module`` taking one array and returning one array, or any such callable.

    Returns:
      ``fn(x) -> y`` closing over the weights; the caller's model is not modified.
    """
    if not isinstance(model, nnx.Module):
        if not callable(model):
            raise TypeError(
                f"model of type {type(model).__name__} is neither an nnx.Module nor callable; "
                "pass a flax.nnx model or a function x -> y"
            )
        return model
    clone = nnx.clone(model)
    clone.eval()
    graphdef, state = nnx.split(clone)

    # The model is rebuilt inside one jit, at the trace level of everything it calls: NNX
    # transforms inside the model (nnx.RNN's scan) refuse graph nodes from an outer trace.
    # PRNG keys (an nnx.RNN's Rngs stream) travel as their raw data: converters take no key dtype.
    is_key = jax.tree.map(lambda a: jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key), state)
    raw = jax.tree.map(lambda a, k: jax.random.key_data(a) if k else a, state, is_key)
    impls = jax.tree.map(lambda a, k: jax.random.key_impl(a) if k else None, state, is_key)

    @jax.jit
    def apply(s: Any, x: jax.Array) -> jax.Array:
        s = jax.tree.map(lambda a, k, i: jax.random.wrap_key_data(a, impl=i) if k else a, s, is_key, impls)
        merged = nnx.merge(graphdef, s)
        with flax_boundary("tracing the model for export", merged):
            return merged(x)

    def fn(x: jax.Array) -> jax.Array:
        return apply(raw, x)

    return fn


class ExportLinearGeneral(nnx.Module):
    """An ``nnx.LinearGeneral`` computed with the matrix products TFLite and tf2onnx convert cleanly.

    jax2tf + the TFLite converter lower a ``dot_general`` whose output has several feature axes
    (an attention projection ``(B, L, E) -> (B, L, heads, head_dim)``) through dynamic shape ops
    (``SHAPE``, ``UNSORTED_SEGMENT_PROD``): the static-batch trace then fails its batch check and
    tf2onnx converts the fallback into ``Reshape`` nodes with a wrong target. This stand-in computes
    the same function from ``FULLY_CONNECTED``-shaped products: one ``x @ K[:, u, :]`` per unit of
    the first output axis, stacked (expansion), or a flatten of the trailing input axes followed by
    one product (contraction, the attention's output projection). Anything else calls the layer.

    Args:
      layer: the ``nnx.LinearGeneral`` (kept as ``self.layer``; its arrays are shared).
    """

    def __init__(self, layer: nnx.LinearGeneral):
        self.layer = layer

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        m = self.layer
        n_in, n_out = len(m.in_features), len(m.out_features)
        axes = tuple(a % x.ndim for a in m.axis)
        if m.batch_axis or args or axes != tuple(range(x.ndim - n_in, x.ndim)) or n_out > 2:
            return m(x, *args, **kwargs)
        kernel = m.kernel[...]
        size_in = int(np.prod(m.in_features))
        if n_in > 1:
            x = x.reshape(*x.shape[:-n_in], size_in)
        kernel = kernel.reshape(size_in, *m.out_features)
        if n_out == 1:
            y = x @ kernel
        else:
            y = jax.numpy.stack([x @ kernel[:, u, :] for u in range(m.out_features[0])], axis=-2)
        if m.bias is not None:
            y = y + m.bias[...]
        return y


class ExportAttention(nnx.Module):
    """An ``nnx.MultiHeadAttention`` (self/cross attention without mask, cache or dropout) computed
    with 4-D batched products: ``softmax(q k^T / sqrt(d)) v`` per head, the form TFLite's
    ``BATCH_MATMUL`` and tf2onnx take at a freed batch. Flax's ``dot_product_attention`` adds a
    grouped-query axis (5-D products) that the static-batch route cannot free. Any call it does not
    cover (a mask, decoding, dropout, normalised q/k, grouped kv heads, another attention_fn) runs
    the module itself.

    Args:
      attention: the ``nnx.MultiHeadAttention`` (kept as ``self.attention``; its projections are
        called as they are, so fake-quant stand-ins and export forms of them apply).
    """

    def __init__(self, attention: nnx.MultiHeadAttention):
        self.attention = attention

    def _plain(self) -> bool:
        m = self.attention
        return (
            m.attention_fn is nnx.dot_product_attention
            and not m.normalize_qk
            and not m.decode
            and m.num_kv_heads == m.num_heads
            and (m.dropout_rate == 0.0 or m.deterministic)
        )

    def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None, inputs_v: jax.Array | None = None, **kw):
        m = self.attention
        if kw or not self._plain() or inputs_q.ndim != 3:
            return m(inputs_q, inputs_k, inputs_v, **kw)
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        q, k, v = m.query(inputs_q), m.key(inputs_k), m.value(inputs_v)
        q = q / np.sqrt(q.shape[-1]).astype(q.dtype)
        weights = jax.nn.softmax(jax.numpy.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        return m.out(jax.numpy.einsum("bhqk,bkhd->bqhd", weights, v))


class ExportLayerNorm(nnx.Module):
    """An ``nnx.LayerNorm`` (or ``nnx.RMSNorm``) over the last axis computed in the form integer
    converters quantize well.

    Flax computes the variance as ``E[x^2] - E[x]^2`` (``use_fast_variance``) with the means as
    ``reduce_sum``; converted to TFLite that is a ``SUM`` over the features, whose quantized output
    TFLite's 16x8 mode gives the input's scale (a sum of 32 features clips), and a difference of
    two large quantized numbers (a token with a small spread loses its variance). This stand-in
    computes the same function as Flax's two-pass form: the mean and the variance as products with
    a constant ``1/n`` column (``FULLY_CONNECTED``, whose output range is calibrated like any
    layer's), the variance from the centred values. In float it differs from the layer by rounding
    only (about 1e-6 relative). An ``nnx.RMSNorm`` (``x * rsqrt(mean(x^2) + epsilon) * scale``)
    is the same without the centring and the bias: its mean square is the product with the
    column. A norm over other axes, with a mask, a cross-device ``axis_name`` or a compute
    ``dtype`` runs the layer itself.

    Args:
      layer: the ``nnx.LayerNorm`` or ``nnx.RMSNorm`` (kept as ``self.layer``; its scale and bias
        are shared).
    """

    def __init__(self, layer: nnx.LayerNorm):
        self.layer = layer

    def _plain(self, x: jax.Array) -> bool:
        m = self.layer

        def last_only(axes: int | Sequence[int]) -> bool:
            axes = (axes,) if isinstance(axes, int) else tuple(axes)
            return x.ndim > 0 and {a % x.ndim for a in axes} == {x.ndim - 1}

        floating = jax.numpy.issubdtype(x.dtype, np.floating)
        return (
            last_only(m.reduction_axes)
            and last_only(m.feature_axes)
            and m.axis_name is None
            and m.dtype is None
            and floating
        )

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        m = self.layer
        if mask is not None or not self._plain(x):
            return m(x, mask=mask)
        n = x.shape[-1]
        mean_of = jax.numpy.full((n, 1), 1.0 / n, x.dtype)
        rms = isinstance(m, nnx.RMSNorm)  # no mean subtracted, no bias
        y, gain = self._normalized(x if rms else x - x @ mean_of, mean_of)
        if m.use_scale:
            scale = m.scale[...].astype(x.dtype)
            y = y * (scale if gain is None else scale * gain)  # a constant gain folds into the scale
        elif gain is not None:
            y = y * gain
        if not rms and m.use_bias:
            y = y + m.bias[...].astype(x.dtype)
        return y

    def _normalized(self, centred: jax.Array, mean_of: jax.Array) -> tuple[jax.Array, np.ndarray | None]:
        """``centred / sqrt(mean(centred^2) + epsilon)`` as ``(y, gain)``: ``y * gain`` (``gain`` None:
        1). ``centred`` is ``x - mean`` for a LayerNorm, ``x`` for an RMSNorm."""
        eps = np.asarray(self.layer.epsilon, centred.dtype)
        return centred * jax.lax.rsqrt(((centred * centred) @ mean_of) + eps), None


class L2LayerNorm(ExportLayerNorm):
    """An ``nnx.LayerNorm`` (or ``nnx.RMSNorm``) over the last axis written as TFLite's
    ``L2_NORMALIZATION`` (full int8).

    Converted as it is, a LayerNorm becomes int8 ``SUM``/``MUL``/``RSQRT`` ops, each requantized
    to one per-tensor grid: the variance of every token shares one grid (on the digits ViT its
    values span two decades), so a quiet token's ``rsqrt(var + epsilon)`` lands a fraction of a
    step from its value. This stand-in computes ``(x - mean) / sqrt(var + epsilon)`` as

        y = sqrt(n) * (a / sqrt(sum(a * a)))[..., :n],   a = pad(x - mean, one column of sqrt(n * epsilon))

    which the converter fuses into one ``L2_NORMALIZATION`` (the sum of squares and its inverse
    square root in 32-bit integers, per token; output grid fixed at 1/128). The padded column
    carries the epsilon, so in float it is the layer's function up to rounding. An ``nnx.RMSNorm``
    is ``x * rsqrt(mean(x^2) + epsilon) * scale``: the same with ``a = pad(x, ...)``. Measured on
    the zoo ViT (digits, six trainings): TFLite int8 top-1 agreement 0.9842 -> 0.9923 on average,
    the median largest logit error 0.86 -> 0.51 (``experiments/int8_seq/README.md``). The same
    fallbacks as :class:`ExportLayerNorm` (other axes, a mask, ...) run the layer itself.
    """

    def _normalized(self, centred: jax.Array, mean_of: jax.Array) -> tuple[jax.Array, np.ndarray]:
        del mean_of
        n = centred.shape[-1]
        # a padded column, not a concatenated constant: nothing batch-sized is baked into the file
        pad = [(0, 0)] * (centred.ndim - 1) + [(0, 1)]
        eps_column = np.asarray(np.sqrt(n * float(self.layer.epsilon)), centred.dtype)
        a = jax.numpy.pad(centred, pad, constant_values=eps_column)
        # x / sqrt(sum(square(x))) over the last axis: the pattern the converter fuses
        unit = a / jax.numpy.sqrt(jax.numpy.sum(jax.numpy.square(a), axis=-1, keepdims=True))
        return unit[..., :n], np.asarray(np.sqrt(n), centred.dtype)


#: ``layernorm=`` of :func:`export_forms`: the stand-in each name converts every ``nnx.LayerNorm``
#: and ``nnx.RMSNorm`` to.
LAYERNORM_FORMS: dict[str, type] = {"mean_column": ExportLayerNorm, "l2_normalization": L2LayerNorm}


def export_forms(model: Any, *, layernorm: str | None = None) -> Any:
    """A copy of ``model`` with layers replaced by export-friendly equivalents (same function).

    Every ``nnx.LinearGeneral`` becomes an :class:`ExportLinearGeneral` and every
    ``nnx.MultiHeadAttention`` an :class:`ExportAttention`. ``layernorm`` names a stand-in for
    every ``nnx.LayerNorm`` and ``nnx.RMSNorm`` (:data:`LAYERNORM_FORMS`): ``"mean_column"`` (:class:`ExportLayerNorm`,
    what the TFLite ``"int16x8"`` mode converts: its ``SUM`` would clip) or ``"l2_normalization"`` (:class:`L2LayerNorm`, what the full-int8 modes
    convert). Non-NNX callables and models without those layers are returned unchanged.

    Raises:
      ValueError: an unknown ``layernorm``.
    """
    if layernorm is not None and layernorm not in LAYERNORM_FORMS:
        raise ValueError(
            f"layernorm={layernorm!r}: unknown LayerNorm export form; choose from {sorted(LAYERNORM_FORMS)}"
        )
    if not isinstance(model, nnx.Module):
        return model
    from research.nn import get_module  # noqa: PLC0415
    from research.nn import replace_modules  # noqa: PLC0415

    kinds: dict[type, type] = {nnx.LinearGeneral: ExportLinearGeneral, nnx.MultiHeadAttention: ExportAttention}
    if layernorm is not None:
        kinds[nnx.LayerNorm] = kinds[nnx.RMSNorm] = LAYERNORM_FORMS[layernorm]

    def wanted(path: str, module: Any) -> bool:
        if type(module) not in kinds:
            return False
        # a fake-quant wrapper re-merges its layer's own state (kernel at the top): leave it
        return not hasattr(get_module(model, path.rpartition("/")[0]), "weight_quant")

    if not any(wanted(p, m) for p, m in _paths(model)):
        return model
    out, _ = replace_modules(model, wanted, lambda p, m: kinds[type(m)](m))
    return out


def _paths(model: nnx.Module) -> list[tuple[str, Any]]:
    return [("/".join(str(k) for k in p), m) for p, m in nnx.iter_modules(model) if p]


def module_paths_by_class(model: Any) -> dict[str, list[str]]:
    """Maps each NNX module class name to the dotted paths of its instances in ``model``."""
    out: dict[str, list[str]] = {}
    if not isinstance(model, nnx.Module):
        return out
    for path, module in nnx.iter_modules(model):
        name = "/".join(str(p) for p in path) or f"{ROOT_PREFIX}the model's own __call__ ({type(module).__name__})"
        out.setdefault(type(module).__qualname__, []).append(name)
    return out


def iter_eqns(jaxpr: Any, _outer: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Yields ``(eqn, *enclosing_eqns)`` for every equation of ``jaxpr``, nested ones included.

    A nested equation's own traceback stops at the boundary of its ``jit``; the enclosing
    equations carry the rest of the call chain (the user's code and the NNX module calls).
    """
    for eqn in jaxpr.eqns:
        chain = (eqn, *_outer)
        yield chain
        for sub in jex_core.jaxprs_in_params(eqn.params):
            yield from iter_eqns(sub, chain)


def _frames(chain: tuple[Any, ...]) -> list[Any]:
    """Frames of an equation then of its enclosing equations, innermost first."""
    out = []
    for e in chain:
        tb = getattr(e.source_info, "traceback", None)
        out += list(getattr(tb, "frames", ()) or ())
    return out


def _is_library_frame(file_name: str) -> bool:
    return any(
        f"{os.sep}{lib}{os.sep}" in file_name for lib in ("jax", "jaxlib", "flax", "_src")
    ) or file_name.endswith("source_info_util.py")


def eqn_location(chain: tuple[Any, ...]) -> str:
    """Returns ``file:line (function)`` of the innermost non-library frame of an equation."""
    for fr in _frames(chain):
        if not _is_library_frame(fr.file_name):
            return f"{fr.file_name}:{fr.line_num} ({fr.function_name})"
    frames = _frames(chain)
    if frames:
        fr = frames[0]
        return f"{fr.file_name}:{fr.line_num} ({fr.function_name})"
    return ""


def eqn_layer_paths(chain: tuple[Any, ...], paths_by_class: dict[str, list[str]]) -> list[str]:
    """Returns the module paths whose ``__call__`` (or method) frame issued an equation."""
    for fr in _frames(chain):  # innermost first
        qual = fr.function_name
        if "." not in qual:
            continue
        cls = qual.rsplit(".", 1)[0]
        if cls in paths_by_class:
            return list(paths_by_class[cls])
    return []


def _eqn_at(chain: tuple[Any, ...], file_name: str, line: int) -> bool:
    return any(
        fr.line_num == line and os.path.basename(fr.file_name) == os.path.basename(file_name) for fr in _frames(chain)
    )


def _probe_fn(eqn: Any) -> tuple[Callable[..., Any], list[jax.ShapeDtypeStruct]]:
    """Builds ``f(*non_literal_inputs) = primitive.bind(...)`` for one equation."""
    specs, slots = [], []
    for v in eqn.invars:
        if isinstance(v, jex_core.Literal):
            slots.append(("lit", v.val))
        else:
            slots.append(("arg", len(specs)))
            specs.append(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))

    def f(*args: Any) -> Any:
        vals = [args[s] if kind == "arg" else s for kind, s in slots]
        out = eqn.primitive.bind(*vals, **eqn.params)
        return tuple(out) if eqn.primitive.multiple_results else out

    return f, specs


def _converter_detail(target: str, message: str) -> str:
    """The converter's message in one line; a long one (MLIR dumps) is saved to a file it names."""
    flat = " ".join(message.split())
    if len(flat) <= 400:
        return flat
    import tempfile  # noqa: PLC0415

    fd, path = tempfile.mkstemp(prefix=f"slimjax_{target}_converter_", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(message)
    first = _LOCATION_RE.search(message.replace(" | ", "\n"))
    head = first.group(3).strip() if first else flat[:200]
    return f"{head} (the converter's full output, MLIR included, is in {path})"


def diagnose(
    target: str,
    model: Any,
    fn: Callable[[jax.Array], jax.Array],
    sample: np.ndarray,
    error: Exception,
    convert_probe: Callable[[Callable[..., Any], list[jax.ShapeDtypeStruct]], None],
    max_probes: int = 40,
) -> UnsupportedOpError:
    """Names the JAX primitive (and layer) behind a converter failure.

    Args:
      target: the format name, for the message.
      model: the original model (for layer paths).
      fn: the inference function that failed to convert.
      sample: a concrete input (fixes the shapes of the probed primitives).
      error: the converter's exception.
      convert_probe: converts a small function with the given argument specs, raising on
        failure (the same converter that failed).
      max_probes: at most this many single-primitive conversions are tried.

    Returns:
      An :class:`UnsupportedOpError` to raise (``from error``).
    """
    message = str(error)
    short = _converter_detail(target, message)
    closed = jax.make_jaxpr(fn)(sample)
    chains = [c for c in iter_eqns(closed.jaxpr) if not list(jex_core.jaxprs_in_params(c[0].params))]
    located = []
    for m in _LOCATION_RE.finditer(message.replace(" | ", "\n")):
        file_name, line = m.group(1), int(m.group(2))
        located += [c for c in chains if _eqn_at(c, file_name, line)]
    seen: set[tuple[str, str]] = set()
    ordered = []
    for c in located + chains:
        key = (c[0].primitive.name, str(sorted((k, str(v)) for k, v in c[0].params.items())))
        if key not in seen:
            seen.add(key)
            ordered.append(c)
    paths = module_paths_by_class(model)
    ordered = [c for c in ordered if not c[0].primitive.name.startswith("random_")]  # key plumbing, not ops
    for chain in ordered[:max_probes]:
        probe, specs = _probe_fn(chain[0])
        try:
            convert_probe(probe, specs)
        except Exception:  # noqa: BLE001 - any converter failure marks the culprit
            return UnsupportedOpError(
                target,
                chain[0].primitive.name,
                eqn_layer_paths(chain, paths),
                eqn_location(chain),
                short,
            )
    if located:
        chain = located[0]
        return UnsupportedOpError(target, None, eqn_layer_paths(chain, paths), eqn_location(chain), short)
    return UnsupportedOpError(target, None, (), "", short)
