"""The suite's shared random programs (tests/shared_random_programs.py) give JAX's own values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared_random_programs as S
from flax import nnx

from research.nn import TINY_OPTIONS
from research.nn.registry import get_model_fn

# Sizes below, at and above the smallest bucket (64), a conv kernel and a dense kernel. Each shape
# compiles JAX's own five programs for the comparison (1-9 s of CPU per shape here), so the list is
# no longer than the cases it separates.
SHAPES = [(1,), (7,), (64,), (65,), (3, 3, 1, 6), (64, 10)]


@pytest.fixture
def patched():
    """The suite installs the shared programs once per process (conftest); these tests need them."""
    if not S.ORIGINAL:
        pytest.fail(
            "tests/conftest.py did not install the shared random programs: this JAX lays out jax.random differently"
        )
    return S.ORIGINAL


def _draws(fns, key, shape, dtype):
    return [
        fns["truncated_normal"](key, -2, 2, shape, dtype),
        fns["truncated_normal"](key, -0.5, 1.5, shape, dtype),
        fns["normal"](key, shape, dtype),
        fns["uniform"](key, shape, dtype),
        fns["uniform"](key, shape, dtype, -3.0, 0.25),
    ]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_every_patched_draw_is_bit_identical_to_jax(patched, shape, make_key):
    key = make_key(11)
    before = S.shared_draws
    ours = _draws({n: getattr(jax.random, n) for n in S.NAMES}, key, shape, jnp.float32)
    assert S.shared_draws == before + 5, "a draw went to JAX's own function"
    theirs = _draws(patched, key, shape, jnp.float32)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape == shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape", [(7,), (4, 6)])
def test_float64_draws_are_bit_identical(patched, x64, shape):
    key = jax.random.key(5)
    before = S.shared_draws
    for a, b in zip(
        _draws({n: getattr(jax.random, n) for n in S.NAMES}, key, shape, jnp.float64),
        _draws(patched, key, shape, jnp.float64),
        strict=True,
    ):
        assert a.dtype == b.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert S.shared_draws == before + 5


def test_calls_it_cannot_share_go_to_jax(patched):
    key = jax.random.key(0)
    before = S.shared_draws
    # under a trace, batched keys, array bounds, a scalar shape: JAX's own function, same values
    traced = jax.jit(lambda k: jax.random.normal(k, (3, 4)))(key)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(patched["normal"](key, (3, 4))))
    closed_over = jax.jit(lambda x: x + jax.random.uniform(key, (4, 5, 6)))(jnp.zeros((4, 5, 6)))
    np.testing.assert_array_equal(np.asarray(closed_over), np.asarray(patched["uniform"](key, (4, 5, 6))))
    keys = jax.random.split(key, 3)
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (5,)))(keys)),
        np.asarray(jax.vmap(lambda k: patched["uniform"](k, (5,)))(keys)),
    )
    lower = jnp.full((2, 3), -1.0)
    np.testing.assert_array_equal(
        np.asarray(jax.random.truncated_normal(key, lower, 1.0, (2, 3))),
        np.asarray(patched["truncated_normal"](key, lower, 1.0, (2, 3))),
    )
    assert jax.random.normal(key).shape == ()
    assert S.shared_draws == before
    assert not S._shareable(jax.random.key(0, impl="rbg"), (4,), None, (), None)
    assert not S._shareable(key, (4,), jnp.bfloat16, (), None)


# A conv net, attention and a GRU: every initialiser the zoo uses (ResNet-20 and MobileNetV2 add no
# other kind of draw, only 10-16 s of CPU compiling JAX's own per-shape programs). Built op by op,
# by the constructor: research.nn.build_model traces it into one program, where nothing is shared.
@pytest.mark.parametrize("name", ["lenet5", "vit", "attn_gru"])
def test_a_zoo_model_built_with_the_shared_programs_equals_one_built_without(patched, name):
    def build():
        fn = get_model_fn(name)
        return fn((8, 8, 1), 10, rngs=nnx.Rngs(3), **TINY_OPTIONS.get(name, {}))

    before = S.shared_draws
    ours = nnx.state(build())
    assert S.shared_draws > before
    S.uninstall()
    try:
        theirs = nnx.state(build())
    finally:
        assert S.install()
    leaves = jax.tree.leaves(ours)
    assert len(leaves) == len(jax.tree.leaves(theirs)) >= 10
    for a, b in zip(leaves, jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(_raw(a), _raw(b))


def _raw(a):
    return np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
