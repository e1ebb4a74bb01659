"""Quantizer functions: integer grid, exact round trip, gradients, per-channel, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from methods.quantization import check_bits
from methods.quantization import dequantize
from methods.quantization import fake_quant
from methods.quantization import fake_quant_ste
from methods.quantization import lsq_quantize
from methods.quantization import pact_quantize
from methods.quantization import qrange
from methods.quantization import quantize
from methods.quantization import round_ste
from methods.quantization import scale_zero_point

X = jax.random.normal(jax.random.key(0), (4, 5, 6)) * 2.0

# --- the shared conformance suite: every quantizer, the same checks ------------------------------
# Each entry: (fn(x, bits, key) -> y, step(bits) -> per-element grid step, offset(bits) -> grid offset,
# levels(bits) -> (qmin, qmax) of the integer grid).


def _ste_affine(x, bits, key=None):
    return fake_quant(x, bits, lo=-3.0, hi=2.0, symmetric=False, key=key)


def _ste_affine_grid(bits):
    s, z = scale_zero_point(-3.0, 2.0, bits, symmetric=False)
    return float(s), float(z), qrange(bits)


def _ste_sym_pc(x, bits, key=None):
    return fake_quant(x, bits, axis=-1, key=key)


def _ste_sym_pc_grid(bits):
    lo, hi = X.min(axis=(0, 1)), X.max(axis=(0, 1))
    s, _ = scale_zero_point(lo, hi, bits, symmetric=True)
    return np.asarray(s), 0.0, qrange(bits)


def _lsq(x, bits, key=None):
    return lsq_quantize(x, 0.3, bits, key=key)


def _lsq_grid(bits):
    return 0.3, 0.0, qrange(bits)


def _pact(x, bits, key=None):
    return pact_quantize(x, 1.5, bits, key=key)


def _pact_grid(bits):
    _, qmax = qrange(bits, signed=False)
    return 1.5 / qmax, 0.0, (0, qmax)


QUANTIZERS = {
    "ste_affine": (_ste_affine, _ste_affine_grid),
    "ste_symmetric_per_channel": (_ste_sym_pc, _ste_sym_pc_grid),
    "lsq": (_lsq, _lsq_grid),
    "pact": (_pact, _pact_grid),
}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("stochastic", [False, True])
def test_conformance(name, bits, stochastic):
    fn, grid = QUANTIZERS[name]
    key = jax.random.key(1) if stochastic else None
    y = jax.jit(lambda x: fn(x, bits, key))(X)
    chex.assert_equal_shape([y, X])
    chex.assert_tree_all_finite(y)
    # outputs lie on the integer grid, inside [qmin, qmax]
    scale, zero, (qmin, qmax) = grid(bits)
    q = np.asarray(y) / scale + zero
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    assert q.min() >= qmin - 1e-3 and q.max() <= qmax + 1e-3
    assert len(np.unique(np.round(q))) <= 2**bits
    # quantizing a quantized tensor changes nothing (deterministic rounding)
    np.testing.assert_allclose(fn(y, bits), y, atol=1e-5)
    # jit and eager agree
    np.testing.assert_allclose(fn(X, bits, key), y, atol=1e-6)
    # gradients exist, are finite and have the input's shape
    g = jax.grad(lambda x: jnp.sum(fn(x, bits, key) ** 2))(X)
    chex.assert_equal_shape([g, X])
    chex.assert_tree_all_finite(g)
    # bits outside 2..8 are refused with the value in the message
    for bad in (1, 9):
        with pytest.raises(ValueError, match=f"bits={bad}"):
            fn(X, bad)


# --- grid and round trip --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_exact(bits, signed, symmetric):
    s, z = scale_zero_point(-1.3, 2.1, bits, signed=signed, symmetric=symmetric)
    qmin, qmax = qrange(bits, signed)
    q = jnp.arange(qmin, qmax + 1)
    # every integer maps to a real value and back to itself
    np.testing.assert_array_equal(quantize(dequantize(q, s, z), s, z, bits, signed=signed), q)
    # fake quantization equals dequantize(quantize(x))
    x = jnp.linspace(-2, 3, 101)
    np.testing.assert_array_equal(
        fake_quant_ste(x, s, z, bits, signed=signed),
        dequantize(quantize(x, s, z, bits, signed=signed), s, z),
    )
    assert float(z) == round(float(z)) and qmin <= float(z) <= qmax
    # zero is exactly representable
    assert float(fake_quant_ste(0.0, s, z, bits, signed=signed)) == 0.0


def test_qrange_and_bits_errors():
    assert qrange(8) == (-128, 127)
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(2) == (-2, 1)
    assert qrange(8, narrow_range=True) == (-127, 127)
    for bad in (0, 1, 9, 16, 4.0, True):
        with pytest.raises(ValueError, match="2..8"):
            check_bits(bad)
    with pytest.raises(ValueError, match="bits=9"):
        fake_quant(X, 9)


# --- gradients ------------------------------------------------------------------------------


def test_ste_gradient_is_clipped_identity():
    s, z = jnp.float32(0.25), jnp.float32(0.0)
    x = jnp.array([-5.0, -1.0, -0.3, 0.1, 0.6, 3.0])
    g = jax.grad(lambda x: jnp.sum(fake_quant_ste(x, s, z, 3) * jnp.arange(1.0, 7.0)))(x)
    # grid [-4, 3] * 0.25 = [-1, 0.75]: gradient passes inside, zero outside
    np.testing.assert_array_equal(g, [0.0, 2.0, 3.0, 4.0, 5.0, 0.0])
    gs = jax.grad(lambda s: jnp.sum(fake_quant_ste(x, s, z, 3)))(s)
    assert float(gs) == 0.0
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(round_ste(v)))(x), jnp.ones(6))


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_gradients_closed_form(signed):
    bits = 3
    qmin, qmax = qrange(bits, signed)
    qn, qp = -qmin, qmax
    x = jnp.array([-2.0, -0.55, -0.1, 0.0, 0.26, 0.9, 5.0])
    s = 0.25
    up = jnp.arange(1.0, 8.0)
    gx, gs = jax.grad(lambda x, s: jnp.sum(up * lsq_quantize(x, s, bits, signed=signed)), (0, 1))(x, s)
    v = np.asarray(x) / s
    inside = (v > -qn) & (v < qp)
    np.testing.assert_allclose(gx, np.where(inside, up, 0.0))
    ds = np.where(v <= -qn, -qn, np.where(v >= qp, qp, np.round(v) - v))
    g = 1.0 / math.sqrt(x.size * qp)
    np.testing.assert_allclose(gs, np.sum(up * ds) * g, rtol=1e-5)


def test_lsq_per_channel_step_gradient_and_grad_scale():
    w = jax.random.normal(jax.random.key(2), (3, 3, 2, 4))
    step = jnp.array([0.1, 0.2, 0.3, 0.4])
    gs = jax.grad(lambda s: jnp.sum(lsq_quantize(w, s, 4, axis=-1)))(step)
    unscaled = jax.grad(lambda s: jnp.sum(lsq_quantize(w, s, 4, axis=-1, grad_scale=1.0)))(step)
    chex.assert_shape(gs, (4,))
    n = w.size / 4  # elements per step
    np.testing.assert_allclose(gs, unscaled / math.sqrt(n * 7), rtol=1e-5)
    # the step gradient of each channel only depends on that channel's weights
    w2 = w.at[..., 0].set(0.0)
    g2 = jax.grad(lambda s: jnp.sum(lsq_quantize(w2, s, 4, axis=-1)))(step)
    np.testing.assert_allclose(g2[1:], gs[1:], rtol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_gradients(signed):
    alpha = 1.0
    x = jnp.array([-2.0, -0.4, 0.0, 0.3, 0.99, 1.0, 3.0])
    gx, ga = jax.grad(lambda x, a: jnp.sum(pact_quantize(x, a, 4, signed=signed)), (0, 1))(x, alpha)
    xn = np.asarray(x)
    lower = -alpha if signed else 0.0
    inside = (xn < alpha) & ((xn > lower) if signed else (xn >= 0))
    np.testing.assert_array_equal(gx, inside.astype(np.float32))
    expect = np.sum(xn >= alpha) - (np.sum(xn <= -alpha) if signed else 0)
    assert float(ga) == expect


def test_pact_alpha_gradient_matches_finite_difference_of_clip():
    # with rounding removed (8 bits, x exactly on grid), d/dalpha of clip(x, 0, alpha) is the count
    # of clipped values; compare with a central finite difference of the float clip
    x = jnp.array([0.2, 0.5, 1.4, 2.0, 3.0])
    a = 1.0
    ga = jax.grad(lambda a: jnp.sum(pact_quantize(x, a, 8)))(a)
    eps = 1e-3
    fd = (jnp.sum(jnp.clip(x, 0, a + eps)) - jnp.sum(jnp.clip(x, 0, a - eps))) / (2 * eps)
    np.testing.assert_allclose(ga, fd, rtol=1e-3)


# --- per-channel ----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, -1])
def test_per_channel_scales_per_channel(axis):
    x = jax.random.normal(jax.random.key(3), (5, 6, 7)) * jnp.arange(1, 8)[None, None, :]
    y = fake_quant(x, 8, axis=axis)
    ax = axis % 3
    red = tuple(i for i in range(3) if i != ax)
    amax = np.max(np.abs(np.asarray(x)), axis=red)
    scale = amax / 127
    q = np.moveaxis(np.asarray(y), ax, 0).reshape(x.shape[ax], -1) / scale[:, None]
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    # every channel reaches its own largest level
    assert np.all(np.max(np.abs(np.round(q)), axis=1) == 127)
    with pytest.raises(ValueError, match="does not match axis"):
        fake_quant_ste(x, jnp.ones(3), jnp.zeros(3), 8, axis=axis)


def test_stochastic_rounding_is_unbiased():
    x = jnp.full((20000,), 0.3)
    y = fake_quant_ste(x, 1.0, 0.0, 4, key=jax.random.key(0))
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 1.0}
    assert abs(float(jnp.mean(y)) - 0.3) < 0.02


# --- scale_zero_point is one jitted program ---------------------------------------------------


@pytest.mark.parametrize("channels", [None, 5])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_scale_zero_point_equals_its_operations_run_one_by_one(channels, symmetric, signed):
    """Jitted, it gives what its operations give one at a time (no division by a constant grid end
    turned into a multiplication by its reciprocal), per tensor and per channel."""
    rng = np.random.default_rng(channels or 0)
    size = () if channels is None else (channels,)
    for bits in (2, 3, 5, 8):
        for _ in range(20):
            lo = jnp.asarray(-np.abs(rng.normal(size=size)) * rng.uniform(0.01, 30), jnp.float32)
            hi = jnp.asarray(np.abs(rng.normal(size=size)) * rng.uniform(0.01, 30), jnp.float32)
            got = scale_zero_point(lo, hi, bits, signed=signed, symmetric=symmetric)
            with jax.disable_jit():
                want = scale_zero_point(lo, hi, bits, signed=signed, symmetric=symmetric)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype == jnp.float32 and g.shape == w.shape == size
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_scale_zero_point_compiles_one_program_per_range_shape():
    import jax.monitoring

    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        lo, hi = -np.linspace(1.0, 2.0, 13, dtype=np.float32), np.linspace(0.5, 3.0, 13, dtype=np.float32)
        scale_zero_point(lo, hi, 8, symmetric=False)  # a shape no other test uses
        assert compiled == ["jit(_scale_zero_point)"], compiled
        scale_zero_point(lo * 2, hi * 3, 8, symmetric=False)  # new values, same shape: nothing to compile
        assert len(compiled) == 1, compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
