"""Fake-quant NNX modules: a tensor quantizer and quantized twins of ``nnx.Linear``/``nnx.Conv``.

A :class:`FakeQuant` module quantizes one tensor (a layer's input activations or its kernel)
with a registered quantization method (:func:`register_method`): ``"ste"`` (calibrated
range, straight-through estimator), ``"lsq"`` (learned step) or ``"pact"`` (learned clipping).
Its state:

* ``lo`` / ``hi`` (:class:`QuantRange`, not trained): the observed range. ``"ste"``
  quantizes with them; in training mode (``model.train()``) a weight quantizer re-reads the
  current kernel's min/max every step and an input quantizer follows the batch ranges with an
  exponential moving average (the behaviour of TF-MOT's QAT quantizers).
* ``step`` (LSQ) or ``alpha`` (PACT): ``nnx.Param`` leaves, trained by the ordinary optimizer.

:class:`QuantLinear` and :class:`QuantConv` wrap the original layer (``layer`` attribute, so
the kernel lives at ``<path>/layer/kernel``) and call it with the fake-quantized kernel on the
fake-quantized input; every option of the wrapped layer (strides, padding, dilation,
``feature_group_count``, masks, precision) is therefore kept exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.quantization import names as _names
from methods.quantization import quantizers as Q
from research.registry import Registry
from research.registry import same_definition


class QuantRange(nnx.Variable):
    """An observed quantization range end (not a trained parameter)."""


class QuantCapture(nnx.Variable):
    """A tensor captured during calibration."""


class QuantGrid(nnx.Variable):
    """A quantizer's integer grid ``[qmin, qmax, 1 / sqrt(qmax)]`` as a value (float32 ``(3,)``), not its spec's
    ``bits``: set only while a population trains trials of different bit widths as one program
    (:func:`lift_bits`); never trained."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
      bits: bit width in 2..8.
      method: a registered quantization method: ``"ste"``, ``"lsq"`` or ``"pact"``.
      signed: signed integer grid; ``None`` decides at calibration (signed iff the observed
        minimum is negative), which suits activations.
      symmetric: zero point 0 (required by ``"lsq"`` and ``"pact"``).
      narrow_range: drop the most negative signed level (TFLite's int8 weight grid).
      per_channel: one scale per channel along ``axis``.
      axis: channel axis (the kernel's output-channel axis is ``-1`` for Linear and Conv).
      stochastic: stochastic rounding in training mode (needs ``rngs``).
      ema_momentum: momentum of the moving-average range of ``"ste"`` input quantizers in
        training mode (1.0 freezes the calibrated range).
    """

    bits: int = 8
    method: str = "ste"
    signed: bool | None = True
    symmetric: bool = True
    narrow_range: bool = False
    per_channel: bool = False
    axis: int = -1
    stochastic: bool = False
    ema_momentum: float = 0.99

    def __post_init__(self):
        Q.check_bits(self.bits)
        if not QUANT_METHODS.get(self.method).supports_affine and not self.symmetric:
            raise ValueError(f"method {self.method!r} learns a scale with zero point 0; pass symmetric=True")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum={self.ema_momentum} must lie in [0, 1]")

    def grid(self, signed: bool | None = None) -> tuple[int, int]:
        """``(qmin, qmax)`` of this spec (``signed`` overrides an undecided ``None``)."""
        s = self.signed if signed is None else signed
        return Q.qrange(self.bits, bool(s), self.narrow_range)


class QuantMethod:
    """Interface of a quantization method used by :class:`FakeQuant`.

    A method creates its variables on the module (:meth:`init`), sets them from an observed
    range (:meth:`set_range`), quantizes (:meth:`apply`) and reports the integer mapping
    (:meth:`scale_zero_point`) for export.
    """

    name: ClassVar[str]
    supports_affine: ClassVar[bool] = False

    def init(self, fq: FakeQuant, pshape: tuple[int, ...]) -> None:
        """Creates the method's variables on ``fq``."""

    def set_range(self, fq: FakeQuant, lo: np.ndarray, hi: np.ndarray) -> None:
        """Sets the method's parameters from the range ``[lo, hi]`` (already stored on ``fq``)."""

    def apply(self, fq: FakeQuant, x: jax.Array, key: jax.Array | None) -> jax.Array:
        raise NotImplementedError

    def scale_zero_point(self, fq: FakeQuant) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError


# Created (with the built-in names declared) in the standard-library names module, so configs are checked before JAX.
QUANT_METHODS: Registry[QuantMethod] = _names.QUANT_METHODS


def register_method(name: str) -> Callable[[type[QuantMethod]], type[QuantMethod]]:
    """Class decorator registering (an instance of) a :class:`QuantMethod` under ``name``.

    Registering the same class again is a no-op.

    Raises:
      DuplicateNameError: another class is registered as ``name`` (a ``ValueError``).
    """

    def deco(cls):
        old = QUANT_METHODS.loaded(name)
        cls.name = name
        QUANT_METHODS.register(name, cls(), replace=old is not None and same_definition(type(old), cls))
        return cls

    return deco


def list_methods() -> tuple[str, ...]:
    """Names of the registered quantization methods."""
    return tuple(QUANT_METHODS.names())


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


@register_method("ste")
class SteMethod(QuantMethod):
    """Uniform affine/symmetric quantization of an observed range, straight-through gradient."""

    supports_affine = True

    def scale_zero_point(self, fq):
        s = fq.spec
        return Q.scale_zero_point(
            fq.lo[...],
            fq.hi[...],
            s.bits,
            signed=fq.signed,
            symmetric=s.symmetric,
            narrow_range=s.narrow_range,
            grid=fq.grid_values(),
        )

    def apply(self, fq, x, key):
        if not fq.deterministic:
            xs = jax.lax.stop_gradient(x)
            axes = _reduce_axes(x.ndim, fq.axis)
            lo, hi = jnp.min(xs, axis=axes), jnp.max(xs, axis=axes)
            if fq.role == "input":
                m = fq.spec.ema_momentum
                lo = m * fq.lo[...] + (1 - m) * lo
                hi = m * fq.hi[...] + (1 - m) * hi
            fq.lo.set_value(lo)
            fq.hi.set_value(hi)
        scale, zp = self.scale_zero_point(fq)
        s = fq.spec
        return Q.fake_quant_ste(
            x,
            scale,
            zp,
            s.bits,
            signed=fq.signed,
            narrow_range=s.narrow_range,
            axis=fq.axis,
            key=key,
            grid=fq.grid_values(),
        )


@register_method("lsq")
class LsqMethod(QuantMethod):
    """Learned Step Size Quantization (https://arxiv.org/abs/1902.08153); ``step`` is a Param.

    The step starts at ``max(|lo|, |hi|) / Qp`` of the calibrated range (QAT from calibrated
    ranges); :func:`methods.quantization.quantizers.lsq_init_step` gives the paper's init.
    """

    def init(self, fq, pshape):
        fq.step = nnx.Param(jnp.ones(pshape, jnp.float32))

    def set_range(self, fq, lo, hi):
        _, qmax = fq.spec.grid(fq.signed)
        bound = np.maximum(-lo, hi) if fq.signed else np.maximum(hi, 0.0)
        fq.step.set_value(jnp.asarray(np.maximum(bound / qmax, 1e-8), jnp.float32))

    def apply(self, fq, x, key):
        s = fq.spec
        step = jnp.maximum(fq.step[...], 1e-8)
        if fq.role == "weight":
            n = x.size / max(int(np.prod(step.shape)), 1)
        else:  # features per example (the paper's N_F)
            n = x.size / max(x.shape[0], 1)
        return Q.lsq_quantize(
            x,
            step,
            s.bits,
            signed=fq.signed,
            narrow_range=s.narrow_range,
            axis=fq.axis,
            grad_scale=Q.lsq_grad_scale(n, fq.inv_sqrt_qmax()),
            key=key,
            grid=fq.grid_values(),
        )

    def scale_zero_point(self, fq):
        step = jnp.maximum(fq.step[...], 1e-8)
        return step, jnp.zeros_like(step)


@register_method("pact")
class PactMethod(QuantMethod):
    """PACT (https://arxiv.org/abs/1805.06085): a learned clipping value ``alpha`` (a Param).

    Unsigned inputs are clipped to ``[0, alpha]``; inputs observed negative at calibration use
    the symmetric signed variant ``[-alpha, alpha]``.
    """

    def init(self, fq, pshape):
        fq.alpha = nnx.Param(jnp.ones(pshape, jnp.float32))

    def set_range(self, fq, lo, hi):
        bound = np.maximum(-lo, hi) if fq.signed else np.maximum(hi, 0.0)
        fq.alpha.set_value(jnp.asarray(np.maximum(bound, 1e-6), jnp.float32))

    def apply(self, fq, x, key):
        alpha = jnp.maximum(fq.alpha[...], 1e-6)
        return Q.pact_quantize(x, alpha, fq.spec.bits, signed=fq.signed, axis=fq.axis, key=key, grid=fq.grid_values())

    def scale_zero_point(self, fq):
        _, qmax = fq.levels()
        scale = jnp.maximum(fq.alpha[...], 1e-6) / qmax
        return scale, jnp.zeros_like(scale)


class FakeQuant(nnx.Module):
    """Quantizes one tensor: a layer's input activations (``role="input"``) or its kernel.

    Used on its own it is an activation quantizer: put it after any activation and calibrate.

    Args:
      spec: the :class:`QuantSpec`.
      role: ``"input"`` (activations; range from calibration) or ``"weight"``.
      shape: the tensor's shape (needed for per-channel quantization).
      rngs: PRNG streams for stochastic rounding.

    Example:
      >>> import jax.numpy as jnp
      >>> fq = FakeQuant(QuantSpec(bits=4, signed=None, symmetric=False))
      >>> fq.set_range(np.float32(0.0), np.float32(1.5))
      >>> fq(jnp.array([0.0, 0.7, 2.0])).tolist()
      [0.0, 0.699999988079071, 1.5]
    """

    def __init__(
        self,
        spec: QuantSpec,
        *,
        role: str = "input",
        shape: tuple[int, ...] | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if role not in ("input", "weight"):
            raise ValueError(f"role={role!r} must be 'input' or 'weight'")
        if spec.per_channel and shape is None:
            raise ValueError("per-channel quantization needs the tensor shape; pass shape=...")
        self.spec = spec
        self.role = role
        self.axis = Q.normalize_axis(spec.axis, len(shape)) if spec.per_channel else None
        pshape = (shape[self.axis],) if spec.per_channel else ()
        self.signed = spec.signed
        self.lo = QuantRange(jnp.zeros(pshape, jnp.float32))
        self.hi = QuantRange(jnp.zeros(pshape, jnp.float32))
        self.calibrated = False
        self.observing = False
        self.deterministic = True
        if spec.stochastic and rngs is None:
            raise ValueError("stochastic rounding needs random numbers; pass rngs=nnx.Rngs(seed)")
        self.rngs = nnx.data(rngs if spec.stochastic else None)
        QUANT_METHODS.get(spec.method).init(self, pshape)

    @property
    def method(self) -> QuantMethod:
        return QUANT_METHODS.get(self.spec.method)

    def set_range(self, lo: Any, hi: Any) -> None:
        """Sets the range (and the method's parameters from it); marks the quantizer calibrated.

        An undecided sign (``spec.signed=None``) becomes signed iff ``min(lo) < 0``.
        """
        lo = np.asarray(lo, np.float32).reshape(self.lo.shape)
        hi = np.asarray(hi, np.float32).reshape(self.hi.shape)
        if self.spec.signed is None:
            self.signed = bool(np.min(lo) < 0)
        self.lo.set_value(jnp.asarray(lo))
        self.hi.set_value(jnp.asarray(hi))
        self.method.set_range(self, lo, hi)
        self.calibrated = True

    def scale_zero_point(self) -> tuple[jax.Array, jax.Array]:
        """The current ``(scale, zero_point)`` (per channel when ``spec.per_channel``)."""
        return self.method.scale_zero_point(self)

    def grid_values(self) -> tuple[jax.Array, jax.Array] | None:
        """``(qmin, qmax)`` from the :class:`QuantGrid` value a population set (:func:`lift_bits`),
        or ``None``: the grid of ``spec.bits``."""
        grid = getattr(self, "lifted_grid", None)
        if grid is None:
            return None
        value = grid[...]
        return value[0], value[1]

    def inv_sqrt_qmax(self) -> Any:
        """``float32(1 / sqrt(qmax))`` (LSQ's gradient scale): a constant, or the lifted value."""
        grid = getattr(self, "lifted_grid", None)
        if grid is None:
            return Q.inv_sqrt(self.spec.grid(self.signed)[1])
        return grid[...][2]

    def levels(self) -> tuple[Any, Any]:
        """``(qmin, qmax)`` this quantizer rounds to: Python ints of ``spec.bits``, or values (see
        :meth:`grid_values`)."""
        grid = self.grid_values()
        return self.spec.grid(self.signed) if grid is None else grid

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.observing:
            self.captured = QuantCapture(x)
            return x
        if not self.calibrated:
            raise RuntimeError(
                "this input quantizer has no range yet; run "
                "methods.quantization.calibrate(model, batches) before using the model"
            )
        key = None
        if self.rngs is not None and not self.deterministic:
            key = self.rngs()
        return self.method.apply(self, x, key)


class QuantLayer(nnx.Module):
    """Base of the fake-quant twins: quantizes the input and the kernel, then runs ``layer``.

    Args:
      layer: the float layer (kept as ``self.layer``; its kernel is the trained weight).
      weight: spec of the kernel quantizer (``None``: kernel kept in float).
      input: spec of the input quantizer (``None``: inputs kept in float).
      rngs: PRNG streams for stochastic rounding.
    """

    wrapped: ClassVar[type]

    def __init__(
        self,
        layer: nnx.Module,
        *,
        weight: QuantSpec | None,
        input: QuantSpec | None,
        rngs: nnx.Rngs | None = None,
    ):
        if not isinstance(layer, self.wrapped):
            raise TypeError(f"{type(self).__name__} wraps {self.wrapped.__name__}, got {type(layer).__name__}")
        self.layer = layer
        kernel = np.asarray(layer.kernel[...])
        wq = None
        if weight is not None:
            wq = FakeQuant(weight, role="weight", shape=kernel.shape, rngs=rngs)
            axes = _reduce_axes(kernel.ndim, wq.axis)
            wq.set_range(kernel.min(axis=axes), kernel.max(axis=axes))
        self.weight_quant = nnx.data(wq)
        self.input_quant = nnx.data(FakeQuant(input, role="input", rngs=rngs) if input is not None else None)

    def quantized_kernel(self) -> jax.Array:
        """The kernel as the layer uses it (fake-quantized when a weight quantizer is set)."""
        kernel = self.layer.kernel[...]
        return kernel if self.weight_quant is None else self.weight_quant(kernel)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        # extra arguments (``out_sharding`` that nnx.MultiHeadAttention passes its projections,
        # an Einsum's ``einsum_str``) go to the wrapped layer unchanged
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.weight_quant is None:
            return self.layer(x, *args, **kwargs)
        kernel = self.weight_quant(self.layer.kernel[...])
        graphdef, state = nnx.split(self.layer)
        pure = nnx.to_pure_dict(state)
        pure["kernel"] = kernel
        return nnx.merge(graphdef, pure)(x, *args, **kwargs)


class QuantLinear(QuantLayer):
    """Fake-quant twin of ``nnx.Linear`` (kernel ``(in, out)``, per-channel axis -1)."""

    wrapped = nnx.Linear


class QuantConv(QuantLayer):
    """Fake-quant twin of ``nnx.Conv`` (kernel ``(*window, in/groups, out)``, per-channel axis -1).

    Strides, padding, dilation and ``feature_group_count`` (depthwise convs) are those of the
    wrapped conv.
    """

    wrapped = nnx.Conv


class QuantLinearGeneral(QuantLayer):
    """Fake-quant twin of ``nnx.LinearGeneral`` (the projections of ``nnx.MultiHeadAttention``).

    The kernel is ``(*in_features, *out_features)``; per-channel scales run along its last axis
    (``head_dim`` for a query/key/value projection with ``out_features=(heads, head_dim)``, the
    output features for the attention's output projection).
    """

    wrapped = nnx.LinearGeneral


class QuantEinsum(QuantLayer):
    """Fake-quant twin of ``nnx.Einsum`` (kernel of any shape, per-channel scales on its last axis)."""

    wrapped = nnx.Einsum


class Identity(nnx.Module):
    """Returns its input; stands where a folded BatchNorm was."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def find_quantizers(model: nnx.Module) -> list[tuple[str, FakeQuant]]:
    """All ``(path, FakeQuant)`` pairs of a model."""
    from research.nn import find_modules

    return find_modules(model, FakeQuant)


LIFTED_BITS = 8
"""The ``spec.bits`` of a lifted quantizer (:func:`lift_bits`): one graph for every bit width."""


def lift_bits(fq: FakeQuant) -> None:
    """In place: ``fq`` rounds to its grid read from a :class:`QuantGrid` value (``lifted_grid``)
    and its spec says :data:`LIFTED_BITS`, so quantizers of any bit width share one graph (a
    population trains trials of different bit widths as one program; each trial's model is
    rebuilt at its own bits afterwards). The function it computes is unchanged."""
    qmin, qmax = fq.spec.grid(fq.signed)
    fq.lifted_grid = QuantGrid(jnp.asarray([qmin, qmax, Q.inv_sqrt(qmax)], jnp.float32))
    fq.spec = dataclasses.replace(fq.spec, bits=LIFTED_BITS)


def _register_liftable() -> None:
    from research.population.padding import register_liftable  # pylint: disable=import-outside-toplevel

    register_liftable(FakeQuant, values=lambda fq: (fq.spec.bits,), lift=lift_bits)


_register_liftable()


# A model with fake-quant layers exports through the deploy hook; registering it here (not only
# through ``methods.register_stages``) keeps ``export(quantize_model(...))`` working when only
# these layers were imported (the package loads lazily).
from methods.quantization import deploy as _deploy  # noqa: E402,F401
