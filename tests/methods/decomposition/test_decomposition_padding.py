"""Factorized layers padded to a larger rank (population training): same function, zero components
stay zero under training, and cutting back gives the trial's own layer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from methods.decomposition import CPConv
from methods.decomposition import LowRankLinear
from methods.decomposition import Tucker2Conv
from methods.decomposition.layers import LowRankLinearGeneral
from research.population import padding

X_FLAT = jnp.linspace(-1.0, 1.0, 4 * 12).reshape(4, 12)
X_IMAGE = jax.random.normal(jax.random.key(0), (4, 7, 7, 5))


class Net(nnx.Module):
    """A factorized layer followed by a dense head, so the loss reaches every factor."""

    def __init__(self, layer):
        self.layer = layer
        self.head = nnx.Linear(8, 3, rngs=nnx.Rngs(5))

    def __call__(self, x):
        y = self.layer(x)
        return self.head(y.reshape(y.shape[0], -1)[:, :8])


def _layer(kind, rank):
    if kind == "low_rank":
        return LowRankLinear.from_dense(nnx.Linear(12, 8, rngs=nnx.Rngs(1)), rank), X_FLAT
    if kind == "low_rank_general":
        return LowRankLinearGeneral.from_dense(nnx.LinearGeneral(12, (2, 4), rngs=nnx.Rngs(1)), rank), X_FLAT
    if kind == "tucker2":
        return Tucker2Conv.from_dense(nnx.Conv(5, 8, (3, 3), padding=1, rngs=nnx.Rngs(1)), rank), X_IMAGE
    return CPConv.from_dense(nnx.Conv(5, 8, (3, 3), strides=2, kernel_dilation=1, rngs=nnx.Rngs(1)), rank), X_IMAGE


KINDS = [("low_rank", 2, 6), ("low_rank_general", 3, 7), ("tucker2", (2, 3), (4, 6)), ("cp", 2, 5)]


def _train(model, x, steps=6):
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)

    def loss(m):
        return jnp.mean((m(x) - 1.0) ** 2)

    for _ in range(steps):
        opt.update(model, nnx.grad(loss)(model))
    return model


def _sizes(rank):
    return tuple(rank) if isinstance(rank, tuple) else (rank,)


@pytest.mark.parametrize("kind, small, large", KINDS)
def test_a_padded_layer_computes_the_same_and_cuts_back_exactly(kind, small, large):
    (a, x), (b, _) = _layer(kind, small), _layer(kind, large)
    a, b = Net(a), Net(b)
    assert padding.canonical_graphdef(a) == padding.canonical_graphdef(b)
    assert nnx.graphdef(a) != nnx.graphdef(b)
    (pa, pb), padded = padding.pad_models([a, b])
    assert padded and nnx.graphdef(pa) == nnx.graphdef(pb)
    assert padding.resizable_layers(pa) == padding.resizable_layers(b) == {"layer": _sizes(large)}
    np.testing.assert_allclose(pa(x), a(x), atol=1e-6)
    back = padding.unpad_model(pa, a)
    assert nnx.graphdef(back) == nnx.graphdef(a)
    for u, v in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(a)), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("kind, small, large", KINDS)
def test_zero_components_stay_zero_so_padded_training_is_the_trial_s_own(kind, small, large):
    (a, x), (b, _) = _layer(kind, small), _layer(kind, large)
    a = Net(a)
    (pa, _), _ = padding.pad_models([a, Net(b)])
    own = _train(nnx.clone(a), x)
    together = _train(pa, x)
    back = padding.unpad_model(together, own)
    for u, v in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(own)), strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5)
    # what lies beyond the trial's own ranks is exactly zero after training
    for big, mine in zip(jax.tree.leaves(nnx.state(together)), jax.tree.leaves(nnx.state(own)), strict=True):
        rest = np.array(big, copy=True)
        rest[tuple(slice(0, n) for n in np.shape(mine))] = 0
        assert not np.any(rest)


def test_optimizer_states_cut_back_to_the_trial_s_shapes():
    (a, _), (b, _) = _layer("low_rank", 2), _layer("low_rank", 6)
    a, b = Net(a), Net(b)
    (pa, _), _ = padding.pad_models([a, b])
    tx = optax.adam(1e-3)
    padded_state = tx.init(nnx.state(pa, nnx.Param))
    own_state = tx.init(nnx.state(a, nnx.Param))
    cut = padding.unpad_tree(padded_state, own_state)
    assert jax.tree.structure(cut) == jax.tree.structure(own_state)
    assert [np.shape(u) for u in jax.tree.leaves(cut)] == [np.shape(v) for v in jax.tree.leaves(own_state)]


def test_models_without_resizable_layers_or_with_them_elsewhere():
    dense = [nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1))]
    assert padding.pad_models(dense) == (dense, False)
    (a, _), (b, _) = _layer("low_rank", 2), _layer("low_rank", 6)
    same = [Net(a), Net(nnx.clone(a))]
    assert padding.pad_models(same) == (same, False)  # equal ranks: nothing to pad

    class Elsewhere(nnx.Module):
        def __init__(self, layer):
            self.other = layer
            self.head = nnx.Linear(8, 3, rngs=nnx.Rngs(5))

    with pytest.raises(ValueError, match="different paths"):
        padding.pad_models([Net(a), Elsewhere(b)])


def test_a_layer_with_a_wrapped_sub_layer_keeps_its_own_graph():
    class Wrapped(nnx.Linear):  # e.g. a fake-quant twin: resizing would drop what it adds
        pass

    (a, _), (b, _) = _layer("low_rank", 2), _layer("low_rank", 6)
    for layer in (a, b):
        first = layer.first
        layer.first = Wrapped(first.in_features, first.out_features, use_bias=False, rngs=nnx.Rngs(0))
    a, b = Net(a), Net(b)
    assert padding.canonical_graphdef(a) == nnx.graphdef(a) != padding.canonical_graphdef(b)
    with pytest.raises(TypeError, match="not resizable"):
        padding.pad_models([a, b])
