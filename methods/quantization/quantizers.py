"""Quantizers as pure functions with custom gradients.

Three families, all jittable and differentiable:

* **Uniform affine / symmetric with a straight-through estimator** (:func:`fake_quant_ste`,
  :func:`fake_quant`): ``q = clip(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``. The
  backward pass is the clipped straight-through estimator: ``d x_hat / d x = 1`` where ``x`` lies
  inside the representable range and ``0`` outside; the scale and zero point receive no gradient
  (they come from observers).
* **LSQ** (:func:`lsq_quantize`): the step ``s`` is a learned parameter with the gradient of
  Esser et al., scaled by ``g = 1 / sqrt(N * Qp)``.
* **PACT** (:func:`pact_quantize`): a learned clipping value ``alpha``; ``d y / d alpha = 1`` where
  ``x >= alpha`` (and ``-1`` where ``x <= -alpha`` in the signed variant), else ``0``.

Every quantizer supports per-tensor or per-channel parameters: a per-channel scale has shape
``(C,)`` and ``axis`` names the channel axis of ``x`` (any axis, negative allowed). Rounding is
round-half-to-even, or stochastic (``floor(v + u)``, ``u ~ U[0, 1)``) when a PRNG key is given.

The integer grid of ``bits`` bits is ``[-2**(bits-1), 2**(bits-1) - 1]`` when signed and
``[0, 2**bits - 1]`` when unsigned; ``narrow_range`` drops the most negative signed level so
the grid is symmetric (what TFLite uses for int8 weights).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from methods.quantization.rules import check_bits

_EPS = 1e-8


def qrange(bits: int, signed: bool = True, narrow_range: bool = False) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)`` of a bit width.

    Example:
      >>> qrange(8), qrange(8, signed=False), qrange(4, narrow_range=True)
      ((-128, 127), (0, 255), (-7, 7))
    """
    bits = check_bits(bits)
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow_range else -qmax - 1), qmax
    return 0, 2**bits - 1


def channel_shape(ndim: int, axis: int | None, size: int) -> tuple[int, ...]:
    """Shape that broadcasts a ``(size,)`` per-channel vector along ``axis`` of an ``ndim`` array."""
    if axis is None:
        return ()
    axis = normalize_axis(axis, ndim)
    return tuple(size if i == axis else 1 for i in range(ndim))


def normalize_axis(axis: int, ndim: int) -> int:
    """``axis`` as a non-negative index into an ``ndim``-dimensional array.

    Raises:
      ValueError: when ``axis`` is out of range.
    """
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a {ndim}-d array; pass -{ndim}..{ndim - 1}")
    return axis % ndim


def _bcast(p: jax.Array, x: jax.Array, axis: int | None) -> jax.Array:
    p = jnp.asarray(p, x.dtype if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating) else None)
    if p.ndim == 0:
        return p
    if axis is None:
        raise ValueError(f"a per-channel parameter of shape {p.shape} needs the channel axis; pass axis=...")
    if p.ndim != 1 or p.shape[0] != x.shape[normalize_axis(axis, x.ndim)]:
        raise ValueError(
            f"per-channel parameter of shape {p.shape} does not match axis {axis} of an input of "
            f"shape {x.shape}; pass one value per channel"
        )
    return p.reshape(channel_shape(x.ndim, axis, p.shape[0]))


def _reduce_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``g`` over the axes where ``shape`` (same rank, or scalar) broadcasts."""
    if shape == ():
        return jnp.sum(g)
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape, strict=True)) if b == 1 and a != 1)
    return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


def _noise(key: jax.Array | None, shape, dtype) -> jax.Array | None:
    if key is None:
        return None
    return jax.random.uniform(key, shape, dtype)


# ----------------------------------------------------------------------------------------------
# Range -> scale / zero point
# ----------------------------------------------------------------------------------------------


def scale_zero_point(
    lo: jax.typing.ArrayLike,
    hi: jax.typing.ArrayLike,
    bits: int,
    *,
    signed: bool = True,
    symmetric: bool = True,
    narrow_range: bool = False,
    grid: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point mapping the real range ``[lo, hi]`` onto the integer grid.

    The range is first widened to contain 0 so that zero is exactly representable (padding
    and ReLU zeros stay exact). Symmetric quantization has zero point 0 and scale
    ``max(|lo|, |hi|) / qmax`` (``hi / qmax`` when unsigned); affine quantization spreads
    ``[lo, hi]`` over the whole grid and rounds the zero point to an integer.

    Args:
      lo: lower end of the range, scalar or per channel.
      hi: upper end, same shape as ``lo``.
      bits: bit width in 2..8.
      signed: signed (``[-2**(b-1), 2**(b-1)-1]``) or unsigned (``[0, 2**b-1]``) grid.
      symmetric: zero point fixed at 0.
      narrow_range: drop the most negative signed level.
      grid: ``(qmin, qmax)`` as (traced) values instead of ``bits``' grid (see :func:`levels`).

    Returns:
      ``(scale, zero_point)``: float32 scale > 0 and an integer-valued float32 zero point.
    """
    qmin, qmax = levels(bits, signed, narrow_range, grid)
    return _scale_zero_point(lo, hi, _f32(qmin), _f32(qmax), _f32(qmax - qmin), signed, symmetric)


def levels(bits: int, signed: bool = True, narrow_range: bool = False, grid=None) -> tuple[Any, Any]:
    """``(qmin, qmax)``: ``grid`` when given (values, possibly traced: a population trains trials
    of different bit widths as one program with each trial's grid in its model state), else
    :func:`qrange` of ``bits`` (Python ints)."""
    if grid is None:
        return qrange(bits, signed, narrow_range)
    qmin, qmax = grid
    return qmin, qmax


def _f32(v):
    """``v`` as a float32 scalar: a NumPy constant for a Python number, a JAX value otherwise."""
    return np.float32(v) if isinstance(v, (int, float, np.number)) else jnp.asarray(v, jnp.float32)


# Jitted: one compiled program per range shape instead of one per operation and shape when called
# eagerly (calibration); inlined inside a jit. The range is multiplied by the grid's reciprocal,
# not divided by the grid: compiled, a division by a constant grid end becomes a multiplication by
# its reciprocal (one ulp away from the division), so a grid given as a value (a lifted quantizer,
# :func:`levels`) and one given as a constant round alike only in this form.
@functools.partial(jax.jit, static_argnums=(5, 6))
def _scale_zero_point(lo, hi, qmin, qmax, span, signed: bool, symmetric: bool):
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    if symmetric:
        bound = jnp.maximum(-lo, hi) if signed else hi
        scale = jnp.maximum(bound * (1.0 / qmax), _EPS)
        return scale, jnp.zeros_like(scale)
    scale = jnp.maximum((hi - lo) * (1.0 / span), _EPS)
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


# ----------------------------------------------------------------------------------------------
# Integer quantize / dequantize (what export uses)
# ----------------------------------------------------------------------------------------------


def quantize(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike,
    zero_point: jax.typing.ArrayLike,
    bits: int,
    *,
    signed: bool = True,
    narrow_range: bool = False,
    axis: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """Real values to integers on the grid: ``clip(round(x / scale) + zero_point, qmin, qmax)``.

    Returns:
      int32 array of the shape of ``x`` (values fit in int8/uint8 for ``bits <= 8``).
    """
    x = jnp.asarray(x, jnp.float32)
    qmin, qmax = qrange(bits, signed, narrow_range)
    s, z = _bcast(scale, x, axis), _bcast(zero_point, x, axis)
    noise = _noise(key, x.shape, x.dtype)
    q = jnp.clip(_rnd(x / s, noise, noise is not None) + z, qmin, qmax)
    return q.astype(jnp.int32)


def dequantize(
    q: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike,
    zero_point: jax.typing.ArrayLike,
    *,
    axis: int | None = None,
) -> jax.Array:
    """Integers back to real values: ``(q - zero_point) * scale`` (float32)."""
    q = jnp.asarray(q).astype(jnp.float32)
    return (q - _bcast(zero_point, q, axis)) * _bcast(scale, q, axis)


# ----------------------------------------------------------------------------------------------
# STE fake quantization
# ----------------------------------------------------------------------------------------------


def _rnd(v, noise, stochastic: bool):
    return jnp.floor(v + noise) if stochastic else jnp.round(v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fq_ste(stochastic, x, s, z, qmin, qmax, noise):
    q = jnp.clip(_rnd(x / s, noise, stochastic) + z, qmin, qmax)
    return (q - z) * s


def _fq_ste_fwd(stochastic, x, s, z, qmin, qmax, noise):
    y = _fq_ste(stochastic, x, s, z, qmin, qmax, noise)
    v = x / s + z
    inside = (v >= qmin) & (v <= qmax)
    return y, (inside, s, z, qmin, qmax, noise)


def _fq_ste_bwd(stochastic, res, g):
    inside, s, z, qmin, qmax, noise = res
    zeros = jax.tree.map(jnp.zeros_like, (s, z, qmin, qmax, noise))
    return (jnp.where(inside, g, 0.0), *zeros)


_fq_ste.defvjp(_fq_ste_fwd, _fq_ste_bwd)


def fake_quant_ste(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike,
    zero_point: jax.typing.ArrayLike,
    bits: int,
    *,
    signed: bool = True,
    narrow_range: bool = False,
    axis: int | None = None,
    key: jax.Array | None = None,
    grid: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
) -> jax.Array:
    """Quantize-dequantize with the clipped straight-through estimator.

    Forward: ``(clip(round(x / s) + z, qmin, qmax) - z) * s``, equal to
    ``dequantize(quantize(x, ...), ...)``. Backward: the incoming gradient passes unchanged
    where ``x / s + z`` lies in ``[qmin, qmax]`` (TensorFlow's convention) and is zero elsewhere; the
    scale and zero point get no gradient.

    Args:
      x: input (any shape).
      scale: scalar, or ``(C,)`` per channel along ``axis``.
      zero_point: integer-valued, same shape as ``scale``.
      bits: bit width in 2..8.
      signed: signed or unsigned integer grid.
      narrow_range: symmetric signed grid without the most negative level.
      axis: channel axis of ``x`` for per-channel parameters.
      key: PRNG key for stochastic rounding (``None``: round to nearest).
      grid: ``(qmin, qmax)`` values instead of ``bits``' grid (:func:`levels`).

    Returns:
      The fake-quantized array (float, shape of ``x``).
    """
    x = jnp.asarray(x)
    qmin, qmax = levels(bits, signed, narrow_range, grid)
    s, z = _bcast(scale, x, axis), _bcast(zero_point, x, axis)
    noise = _noise(key, x.shape, x.dtype)
    stochastic = noise is not None
    noise = jnp.zeros((), x.dtype) if noise is None else noise
    f = jnp.float32
    return _fq_ste(stochastic, x, s, z, f(qmin), f(qmax), noise)


def fake_quant(
    x: jax.typing.ArrayLike,
    bits: int,
    *,
    scale: jax.typing.ArrayLike | None = None,
    zero_point: jax.typing.ArrayLike | None = None,
    lo: jax.typing.ArrayLike | None = None,
    hi: jax.typing.ArrayLike | None = None,
    signed: bool = True,
    symmetric: bool = True,
    narrow_range: bool = False,
    axis: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """Uniform fake quantization with a straight-through estimator.

    The quantization parameters come from, in order of precedence: ``scale``/``zero_point``;
    the range ``lo``/``hi``; or the min/max of ``x`` itself (per channel along ``axis`` when
    ``axis`` is given, held constant in the backward pass).

    Args:
      x: input array.
      bits: bit width in 2..8.
      scale: explicit scale (scalar or per channel).
      zero_point: explicit zero point (defaults to 0 with an explicit scale).
      lo: lower end of the range to quantize.
      hi: upper end of the range.
      signed: signed or unsigned integer grid.
      symmetric: zero point 0 (else affine).
      narrow_range: drop the most negative signed level.
      axis: channel axis for per-channel quantization (``None``: per tensor).
      key: PRNG key for stochastic rounding.

    Returns:
      The fake-quantized array.

    Raises:
      ValueError: bits outside 2..8, or mismatched per-channel shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> fake_quant(jnp.array([0.0, 0.26, 1.0]), 2, signed=False, symmetric=True).tolist()
      [0.0, 0.3333333432674408, 1.0]
    """
    check_bits(bits)
    x = jnp.asarray(x)
    if scale is None:
        if lo is None or hi is None:
            if axis is None:
                lo, hi = jnp.min(x), jnp.max(x)
            else:
                ax = normalize_axis(axis, x.ndim)
                red = tuple(i for i in range(x.ndim) if i != ax)
                lo, hi = jnp.min(x, axis=red), jnp.max(x, axis=red)
            lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
        scale, zero_point = scale_zero_point(
            lo, hi, bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range
        )
    elif zero_point is None:
        zero_point = jnp.zeros_like(jnp.asarray(scale, jnp.float32))
    return fake_quant_ste(x, scale, zero_point, bits, signed=signed, narrow_range=narrow_range, axis=axis, key=key)


def round_ste(x: jax.typing.ArrayLike) -> jax.Array:
    """``round(x)`` forward, identity gradient backward."""
    x = jnp.asarray(x)
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


# ----------------------------------------------------------------------------------------------
# LSQ
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lsq(stochastic, x, s, qn, qp, g, noise):
    return jnp.clip(_rnd(x / s, noise, stochastic), -qn, qp) * s


def _lsq_fwd(stochastic, x, s, qn, qp, g, noise):
    v = x / s
    return _lsq(stochastic, x, s, qn, qp, g, noise), (v, s, qn, qp, g, noise)


def _lsq_bwd(stochastic, res, ct):
    v, s, qn, qp, g, noise = res
    below, above = v <= -qn, v >= qp
    inside = ~(below | above)
    dx = jnp.where(inside, ct, 0.0)
    ds_local = jnp.where(below, -qn, jnp.where(above, qp, _rnd(v, noise, stochastic) - v))
    ds = _reduce_to(ct * ds_local, s.shape) * g
    return dx, ds, jnp.zeros_like(qn), jnp.zeros_like(qp), jnp.zeros_like(g), jnp.zeros_like(noise)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quantize(
    x: jax.typing.ArrayLike,
    step: jax.typing.ArrayLike,
    bits: int,
    *,
    signed: bool = True,
    narrow_range: bool = False,
    axis: int | None = None,
    grad_scale: float | None = None,
    key: jax.Array | None = None,
    grid: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
) -> jax.Array:
    """Learned Step Size Quantization: ``round(clip(x / s, -Qn, Qp)) * s`` with a learned ``s``.

    Gradients (Esser et al., eq. 3): ``d/dx = 1`` for ``-Qn < x/s < Qp`` and 0 outside;
    ``d/ds = -x/s + round(x/s)`` inside, ``-Qn`` below and ``Qp`` above, multiplied by the
    gradient scale ``g = 1 / sqrt(N * Qp)`` where ``N`` is the number of elements sharing one
    step (the paper's number of weights, or features for activations).

    Args:
      x: input array.
      step: step size ``s > 0``, scalar or per channel along ``axis``.
      bits: bit width in 2..8.
      signed: ``Qn = 2**(b-1)`` (or ``2**(b-1) - 1`` with ``narrow_range``), ``Qp = 2**(b-1) - 1``;
        unsigned: ``Qn = 0``, ``Qp = 2**b - 1``.
      narrow_range: symmetric signed grid.
      axis: channel axis for a per-channel step.
      grad_scale: overrides ``g`` (pass 1.0 to disable the scaling).
      key: PRNG key for stochastic rounding.
      grid: ``(qmin, qmax)`` values instead of ``bits``' grid (:func:`levels`).

    Returns:
      The quantized array (values ``k * s`` with integer ``k`` in ``[-Qn, Qp]``).

    References:
      Esser et al., "Learned Step Size Quantization", ICLR 2020, https://arxiv.org/abs/1902.08153
    """
    x = jnp.asarray(x)
    qmin, qmax = levels(bits, signed, narrow_range, grid)
    s = _bcast(step, x, axis)
    if grad_scale is None:
        n = x.size / max(int(np.prod(np.shape(step))), 1)
        grad_scale = 1.0 / math.sqrt(n * qmax) if grid is None else jax.lax.rsqrt(jnp.float32(n) * qmax)
    noise = _noise(key, x.shape, x.dtype)
    stochastic = noise is not None
    noise = jnp.zeros((), x.dtype) if noise is None else noise
    f = jnp.float32
    return _lsq(stochastic, x, s, f(-qmin), f(qmax), f(grad_scale), noise)


def lsq_grad_scale(n: float, inv_sqrt_qmax) -> Any:
    """LSQ's gradient scale ``1 / sqrt(n * Qp)`` as ``float32(1 / sqrt(n)) * inv_sqrt_qmax``, with
    ``inv_sqrt_qmax = float32(1 / sqrt(Qp))`` a constant or a value (:func:`inv_sqrt`): the same
    product of two float32 numbers either way."""
    return np.float32(1.0 / math.sqrt(n)) * inv_sqrt_qmax


def inv_sqrt(qmax: int) -> np.float32:
    """``float32(1 / sqrt(qmax))`` (LSQ's gradient scale factor of the grid)."""
    return np.float32(1.0 / math.sqrt(qmax))


def lsq_init_step(x: jax.typing.ArrayLike, bits: int, *, signed: bool = True, axis=None) -> jax.Array:
    """The LSQ paper's initial step ``2 * mean(|x|) / sqrt(Qp)`` (per channel along ``axis``)."""
    x = jnp.asarray(x)
    _, qmax = qrange(bits, signed)
    if axis is None:
        m = jnp.mean(jnp.abs(x))
    else:
        ax = normalize_axis(axis, x.ndim)
        m = jnp.mean(jnp.abs(x), axis=tuple(i for i in range(x.ndim) if i != ax))
    return jnp.maximum(2.0 * m / math.sqrt(qmax), _EPS)


# ----------------------------------------------------------------------------------------------
# PACT
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pact(stochastic, x, alpha, levels, lower, noise):
    s = alpha * (1.0 / levels)  # the grid's reciprocal, constant or not (see _scale_zero_point)
    return _rnd(jnp.clip(x, lower * alpha, alpha) / s, noise, stochastic) * s


def _pact_fwd(stochastic, x, alpha, levels, lower, noise):
    return _pact(stochastic, x, alpha, levels, lower, noise), (x, alpha, levels, lower, noise)


def _pact_bwd(stochastic, res, ct):
    x, alpha, levels, lower, noise = res
    signed = lower < 0
    above = x >= alpha
    below = signed & (x <= lower * alpha)
    inside = (x < alpha) & jnp.where(signed, x > lower * alpha, x >= 0)
    dx = jnp.where(inside, ct, 0.0)
    dalpha = _reduce_to(jnp.where(above, ct, 0.0) - jnp.where(below, ct, 0.0), alpha.shape)
    return dx, dalpha, jnp.zeros_like(levels), jnp.zeros_like(lower), jnp.zeros_like(noise)


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact_quantize(
    x: jax.typing.ArrayLike,
    alpha: jax.typing.ArrayLike,
    bits: int,
    *,
    signed: bool = False,
    axis: int | None = None,
    key: jax.Array | None = None,
    grid: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
) -> jax.Array:
    """PACT: clip to ``[0, alpha]`` (``[-alpha, alpha]`` when signed), then quantize uniformly.

    Forward: ``y = clip(x, 0, alpha)``, ``y_q = round(y / s) * s`` with ``s = alpha / (2**b - 1)``
    (signed: ``s = alpha / (2**(b-1) - 1)``). Backward (straight-through for the rounding):
    ``d y_q / d x = 1`` for ``0 <= x < alpha`` (``-alpha < x < alpha`` signed), else 0;
    ``d y_q / d alpha = 1`` where ``x >= alpha``, ``-1`` where ``x <= -alpha`` (signed), else 0.

    Args:
      x: input array (activations).
      alpha: clipping value ``> 0``, scalar or per channel along ``axis``.
      bits: bit width in 2..8.
      signed: symmetric signed variant for inputs that can be negative.
      axis: channel axis for a per-channel ``alpha``.
      key: PRNG key for stochastic rounding.
      grid: ``(qmin, qmax)`` values instead of ``bits``' grid (:func:`levels`; PACT uses ``qmax``).

    Returns:
      The quantized array.

    References:
      Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks",
      https://arxiv.org/abs/1805.06085
    """
    x = jnp.asarray(x)
    _, qmax = levels(bits, signed, False, grid)
    a = _bcast(alpha, x, axis)
    noise = _noise(key, x.shape, x.dtype)
    stochastic = noise is not None
    noise = jnp.zeros((), x.dtype) if noise is None else noise
    lower = jnp.float32(-1.0 if signed else 0.0)
    return _pact(stochastic, x, a, jnp.asarray(qmax, jnp.float32), lower, noise)
