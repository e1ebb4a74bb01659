"""Factorized layers: exactness at full rank, error vs rank, agreement with tensorly, bad ranks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from flax import nnx
from tensorly.decomposition import parafac
from tensorly.decomposition import partial_tucker

from methods.decomposition import CPConv
from methods.decomposition import LowRankLinear
from methods.decomposition import Tucker2Conv
from methods.decomposition import cp_factors
from methods.decomposition import relative_error
from methods.decomposition import tucker2_factors

CONV_CONFIGS = [
    dict(strides=2, padding="SAME"),
    dict(strides=(2, 1), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2)),
    dict(strides=1, padding="CIRCULAR"),
]


def _conv(cin=5, cout=6, k=(3, 3), seed=0, **kw):
    conv = nnx.Conv(cin, cout, k, rngs=nnx.Rngs(seed), **kw)
    conv.bias[...] = jax.random.normal(jax.random.key(seed + 1), (cout,))
    return conv


def _x(shape, seed=3):
    return jax.random.normal(jax.random.key(seed), shape)


def _run(module, x):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def test_low_rank_linear_full_rank_matches_dense():
    dense = nnx.Linear(12, 7, rngs=nnx.Rngs(0))
    low = LowRankLinear.from_dense(dense, rank=7)
    x = _x((4, 12))
    chex.assert_trees_all_close(_run(low, x), _run(dense, x), atol=1e-5)
    chex.assert_shape(low.first.kernel[...], (12, 7))


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_tucker2_full_rank_matches_dense(cfg):
    dense = _conv(**cfg)
    fact = Tucker2Conv.from_dense(dense, (5, 6))
    x = _x((2, 9, 8, 5))
    chex.assert_trees_all_close(_run(fact, x), _run(dense, x), atol=1e-4)


def test_tucker2_1d_full_rank_matches_dense():
    dense = nnx.Conv(4, 6, (5,), strides=(2,), padding=((1, 1),), rngs=nnx.Rngs(0))
    fact = Tucker2Conv.from_dense(dense, (4, 6))
    x = _x((2, 20, 4))
    chex.assert_trees_all_close(_run(fact, x), _run(dense, x), atol=1e-4)


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_cp_conv_computes_the_conv_of_its_kernel(cfg):
    """Structure: the 1x1 / depthwise / depthwise / 1x1 chain equals one conv with the CP kernel."""
    dense = _conv(**cfg)
    fact = CPConv.from_dense(dense, rank=4, n_iter_max=20)
    ref = _conv(**cfg)
    ref.kernel[...] = fact.dense_kernel()
    ref.bias[...] = dense.bias[...]
    x = _x((2, 9, 8, 5))
    chex.assert_trees_all_close(_run(fact, x), _run(ref, x), atol=1e-4)


@pytest.mark.parametrize("k", [(3, 3), (5,)])
def test_cp_conv_exact_on_a_rank_r_kernel(k):
    """At the kernel's true CP rank the CP layer reproduces the dense layer."""
    rank, cin, cout = 3, 5, 6
    keys = jax.random.split(jax.random.key(0), len(k) + 2)
    dims = (*k, cin, cout)
    factors = [np.asarray(jax.random.normal(kk, (d, rank))) for kk, d in zip(keys, dims, strict=False)]
    letters = "abcd"[: len(dims)]
    kernel = np.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)
    dense = _conv(cin, cout, k)
    dense.kernel[...] = jnp.asarray(kernel, jnp.float32)
    fact = CPConv.from_dense(dense, rank=rank, n_iter_max=500, tol=1e-12)
    x = _x((2, 10, 10, cin) if len(k) == 2 else (2, 16, cin))
    chex.assert_trees_all_close(_run(fact, x), _run(dense, x), atol=2e-3, rtol=2e-3)


def test_error_falls_with_rank():
    dense_lin = nnx.Linear(24, 20, rngs=nnx.Rngs(0))
    w = np.asarray(dense_lin.kernel[...])
    svd_err = [relative_error(w, LowRankLinear.from_dense(dense_lin, r).dense_kernel()) for r in (2, 6, 12, 20)]
    conv = _conv(8, 10)
    kern = np.asarray(conv.kernel[...])
    tucker_err = [relative_error(kern, Tucker2Conv.from_dense(conv, (r, r)).dense_kernel()) for r in (2, 4, 8)]
    cp_err = [relative_error(kern, CPConv.from_dense(conv, r, n_iter_max=50).dense_kernel()) for r in (2, 8, 32)]
    for errs in (svd_err, tucker_err, cp_err):
        assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert svd_err[-1] < 1e-5 and tucker_err[-1] > 0


def test_factors_equal_tensorlys_decomposition():
    dense_lin = nnx.Linear(10, 8, rngs=nnx.Rngs(0))
    w = np.asarray(dense_lin.kernel[...], np.float64)
    u, s, vt = tl.svd_interface(w, n_eigenvecs=3)
    low = LowRankLinear.from_dense(dense_lin, 3)
    np.testing.assert_allclose(low.first.kernel[...], u * np.sqrt(s), atol=1e-5)
    np.testing.assert_allclose(low.second.kernel[...], np.sqrt(s)[:, None] * vt, atol=1e-5)

    conv = _conv(6, 7)
    kern = np.asarray(conv.kernel[...], np.float64)
    (core, (u_in, u_out)), _ = partial_tucker(kern, rank=[3, 4], modes=[2, 3], init="svd", random_state=0)
    t2 = Tucker2Conv.from_dense(conv, (3, 4))
    np.testing.assert_allclose(t2.core.kernel[...], core, atol=1e-5)
    np.testing.assert_allclose(t2.reduce.kernel[...][0, 0], u_in, atol=1e-5)
    np.testing.assert_allclose(t2.expand.kernel[...][0, 0], u_out.T, atol=1e-5)

    weights, cp = parafac(kern, 5, n_iter_max=200, init="svd", tol=1e-8, random_state=0)
    cp_layer = CPConv.from_dense(conv, 5, balance=False)  # tensorly's own scaling
    expected = [np.asarray(f) for f in cp]
    expected[-1] = expected[-1] * weights
    for got, want in zip(cp_layer.factors(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(cp_layer.dense_kernel(), tl.cp_to_tensor((weights, cp)), atol=1e-4)
    for got, want in zip(cp_factors(kern, 5, balance=False), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-10)
    np.testing.assert_allclose(tucker2_factors(kern, (3, 4))[0], core, atol=1e-10)


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: LowRankLinear.from_dense(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=5),
            r"rank=5 is outside 1..4",
        ),
        (lambda: Tucker2Conv.from_dense(_conv(5, 6), (6, 2)), r"ranks=\(6, 2\) are outside"),
        (lambda: CPConv.from_dense(_conv(5, 6), rank=46), r"rank=46 is outside 1..45"),
        (
            lambda: Tucker2Conv.from_dense(_conv(4, 4, feature_group_count=4), (2, 2)),
            r"feature_group_count=4: grouped/depthwise",
        ),
    ],
)
def test_bad_ranks_and_layers_fail_clearly(build, match):
    with pytest.raises(ValueError, match=match):
        build()
