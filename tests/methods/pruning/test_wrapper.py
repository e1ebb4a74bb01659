"""The optax mask wrapper and dynamic sparse training inside the real train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import methods.pruning as P
from research.nn import build_model
from research.train import Checkpointer
from research.train import create_train_state
from research.train import make_train_step


def _setup(tx):
    model = build_model("mlp", input_shape=(12,), num_classes=4, widths=(16,), rngs=nnx.Rngs(0))
    defs, state = create_train_state(model, tx)
    step = make_train_step(defs, tx, donate=False)
    rng = np.random.default_rng(0)
    batches = [
        {
            "x": rng.normal(size=(16, 12)).astype(np.float32),
            "y": rng.integers(0, 4, 16).astype(np.int32),
        }
        for _ in range(4)
    ]
    return state, step, batches


def _zeros_where_pruned(state):
    masks = state.opt_state.masks
    for m, p in zip(
        jax.tree.leaves(masks),
        jax.tree.leaves(
            jax.tree.map(
                lambda m, p: p if m is not None else None,
                masks,
                state.params,
                is_leaf=lambda m: m is None,
            )
        ),
        strict=False,
    ):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_masked_training_keeps_zeros_and_checkpoint(tmp_path):
    sched = P.polynomial_schedule(0.8, begin_step=0, end_step=12, frequency=4)
    tx = P.masked(optax.adam(1e-2), sched)
    state, step, batches = _setup(tx)
    for i in range(20):
        state, _ = step(state, batches[i % 4])
        if i >= 1:
            _zeros_where_pruned(state)
    s = P.mask_sparsity(state.opt_state.masks)
    assert s["layers/0/kernel"] == pytest.approx(round(0.8 * 192) / 192)
    assert s["head/kernel"] == pytest.approx(round(0.8 * 64) / 64)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(int(state.step), state)
    restored = ckpt.restore(state)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state.masks, state.opt_state.masks)
    for i in range(10):
        restored, _ = step(restored, batches[i % 4])
        _zeros_where_pruned(restored)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state.masks, state.opt_state.masks)
    assert int(restored.opt_state.count) == 30


def test_fixed_masks_and_params_required():
    params = {"kernel": jnp.arange(1.0, 5.0)}
    tx = P.masked(optax.sgd(1.0), masks={"kernel": jnp.array([True, False, True, False])})
    st = tx.init(params)
    upd, st = tx.update({"kernel": jnp.ones(4)}, st, params)
    np.testing.assert_array_equal(optax.apply_updates(params, upd)["kernel"], [0.0, 0.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"kernel": jnp.ones(4)}, st)
    with pytest.raises(ValueError, match="schedule"):
        P.masked(optax.sgd(1.0))


@pytest.mark.parametrize("method", P.list_grow_methods())  # every registered grow criterion
def test_dynamic_sparse(method):
    tx = P.dynamic_sparse(
        optax.adam(1e-2),
        0.7,
        method=method,
        update_every=3,
        end_step=12,
        drop_fraction=0.5,
        allocation="layerwise",
    )
    state, step, batches = _setup(tx)
    first = jax.tree.map(np.asarray, state.opt_state.masks)
    for i in range(10):
        prev = state
        state, _ = step(state, batches[i % 4])
        _zeros_where_pruned(state)
        s = P.mask_sparsity(state.opt_state.masks)
        assert s["layers/0/kernel"] == pytest.approx(round(0.7 * 192) / 192)
        if int(prev.step) in (
            3,
            6,
            9,
        ):  # connectivity update: grown weights had their Adam state reset
            m_old = np.asarray(prev.opt_state.masks["layers"][0]["kernel"])
            m_new = np.asarray(state.opt_state.masks["layers"][0]["kernel"])
            grown = m_new & ~m_old
            assert grown.sum() > 0
            mu = np.asarray(state.opt_state.inner_state[0].mu["layers"][0]["kernel"])
            # after the reset, one Adam step from zero gives mu = 0.1 g and nu = 0.001 g^2
            nu = np.asarray(state.opt_state.inner_state[0].nu["layers"][0]["kernel"])
            np.testing.assert_allclose(mu[grown] ** 2 * (1 - 0.999) / (1 - 0.9) ** 2, nu[grown], rtol=1e-4, atol=1e-12)
    assert not all(
        np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(state.opt_state.masks), strict=False)
    )


def test_cosine_drop_fraction():
    f = [float(P.cosine_drop_fraction(t, 0.3, 100)) for t in (0, 50, 100, 200)]
    np.testing.assert_allclose(f, [0.3, 0.15, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        (P.NM(n=2, m=4), r"N:M 2:4 needs axis -2 of 'conv1/kernel' \(shape \(5, 5, 1, 6\)\).*is 1"),
        (P.Block(block=(4, 4)), r"block \(4, 4\) does not tile .*'conv1/kernel'"),
    ],
)
def test_a_gradual_pattern_that_cannot_tile_a_leaf_names_it_at_init(pattern, match):
    params = {"conv1": {"kernel": jnp.ones((5, 5, 1, 6))}, "fc": {"kernel": jnp.ones((8, 4))}}
    tx = P.masked(optax.sgd(0.1), P.one_shot_schedule(0.5), pattern=pattern)
    with pytest.raises(ValueError, match=match):
        tx.init(params)
    # the leaf excluded by a rule, the same pattern trains the others
    rules = (P.SparsityRule(pattern="conv1", sparsity=0.0), P.SparsityRule(pattern="kernel$", sparsity=0.5))
    tx = P.masked(optax.sgd(0.1), P.one_shot_schedule(0.5), pattern=pattern, rules=rules)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = jax.jit(tx.update)(grads, state, params)
    assert state.masks["conv1"]["kernel"] is None
    assert float(jnp.mean(state.masks["fc"]["kernel"])) == 0.5


def test_one_compiled_update_serves_every_target_sparsity():
    """The targets are optimizer-state values: the update traced for one target sparsity (and one
    rule sparsity) computes, for another, exactly what that target's own wrapper does, and prunes
    round(target * size) entries of each leaf."""

    def tx_for(final, head):
        rules = (P.SparsityRule(pattern="^head/kernel$", sparsity=head), P.SparsityRule(pattern="kernel$"))
        return P.masked(optax.sgd(0.1), P.one_shot_schedule(final), rules=rules)

    model = build_model("mlp", input_shape=(12,), num_classes=4, widths=(16,), rngs=nnx.Rngs(0))
    params = create_train_state(model, optax.sgd(0.1))[1].params
    grads = jax.tree.map(jnp.ones_like, params)
    traces = []

    def update(tx):
        def fn(g, s, p):
            traces.append(1)
            return tx.update(g, s, p)

        return jax.jit(fn)

    shared = update(tx_for(0.5, 0.25))
    for final, head in [(0.5, 0.25), (0.73, 0.3), (0.9, 0.45)]:
        tx = tx_for(final, head)
        state = tx.init(params)
        _, got = shared(grads, state, params)
        _, own = jax.jit(tx.update)(grads, state, params)
        for a, b in zip(jax.tree.leaves(got.masks), jax.tree.leaves(own.masks), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for path, target in [("layers", final), ("head", head)]:
            mask = got.masks[path]["kernel"] if path == "head" else got.masks[path][0]["kernel"]
            # the float32 arithmetic of the schedule: target * (final * (1 / final)), rounded to a count
            scale = np.float32(final) * (np.float32(1) / np.float32(final))
            pruned = int(np.round(np.float32(np.float32(target) * scale) * np.float32(mask.size)))
            assert int(mask.size - np.asarray(mask).sum()) == pruned
    assert len(traces) == 1


def test_drop_and_grow_takes_the_ranked_entries_with_ties_by_position():
    """Drop the k smallest active |w| and grow the k highest-scored inactive entries, k =
    floor(fraction x active), ties (here: equal magnitudes and all-zero gradients) by position."""
    from methods.pruning.dst import drop_and_grow

    def ranks_desc(x):
        flat = jnp.ravel(x)
        return jnp.argsort(jnp.argsort(-flat, stable=True), stable=True).reshape(x.shape)

    rng = np.random.default_rng(3)
    mask = jnp.asarray(rng.random((9, 7)) < 0.4)
    weight = jnp.asarray(np.round(rng.normal(size=(9, 7)), 1).astype(np.float32))
    for grow in (jnp.asarray(np.round(rng.normal(size=(9, 7)), 1).astype(np.float32)), jnp.zeros((9, 7))):
        for fraction in (0.0, 0.25, 1.0):
            k = min(int(np.floor(fraction * int(mask.sum()))), mask.size - int(mask.sum()))
            dropped = mask & (ranks_desc(jnp.where(mask, -jnp.abs(weight), -jnp.inf)) < k)
            grown = ~mask & (ranks_desc(jnp.where(mask, -jnp.inf, grow)) < k)
            new_mask, got_grown = jax.jit(drop_and_grow)(mask, weight, grow, fraction)
            np.testing.assert_array_equal(np.asarray(got_grown), np.asarray(grown))
            np.testing.assert_array_equal(np.asarray(new_mask), np.asarray((mask & ~dropped) | grown))
            assert int(new_mask.sum()) == int(mask.sum())
