"""Masks, rules, allocation, N:M and block patterns."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods.pruning as P
from research.tree import RuleError


@pytest.fixture(scope="module")
def params():
    # numpy draws: distinct, tie-free values without compiling a random kernel per shape
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    return {
        "convs": {
            0: {"kernel": normal(3, 3, 3, 8)},
            1: {"kernel": normal(3, 3, 8, 16)},
        },
        "bns": {
            0: {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
            1: {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
        },
        "head": {"kernel": normal(16, 10), "bias": jnp.zeros(10)},
    }


@pytest.mark.parametrize("allocation", ["layerwise", "global", "erk"])
def test_exact_sparsity(params, allocation):
    masks = jax.jit(lambda p: P.magnitude_masks(p, 0.75, allocation=allocation))(params)
    chex.assert_trees_all_equal_shapes(
        jax.tree.map(lambda m: m, masks, is_leaf=lambda m: m is None),
        jax.tree.map(lambda m, p: p if m is not None else None, masks, params, is_leaf=lambda m: m is None),
    )
    s = P.mask_sparsity(masks)
    total = sum(m.size for m in jax.tree.leaves(masks))
    assert abs(s["__global__"] - 0.75) <= 1.0 / total * len(jax.tree.leaves(masks))
    if allocation == "layerwise":
        for _path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
            assert int(m.size - m.sum()) == round(0.75 * m.size)


def test_default_rules_skip_biases_and_norm_scales(params):
    masks = P.magnitude_masks(params, 0.5)
    assert masks["bns"][0]["scale"] is None and masks["head"]["bias"] is None
    assert masks["head"]["kernel"] is not None and masks["convs"][0]["kernel"] is not None


def test_magnitude_keeps_largest():
    w = jnp.array([[0.1, -3.0, 0.2, 5.0]])
    m = P.magnitude_masks({"kernel": w}, 0.5)["kernel"]
    assert m.tolist() == [[False, True, False, True]]
    out = P.apply_masks({"kernel": w}, {"kernel": m})["kernel"]
    np.testing.assert_array_equal(out, [[0.0, -3.0, 0.0, 5.0]])


def test_rule_sparsities_and_exclusion(params):
    rules = [
        P.SparsityRule(pattern="^head/", sparsity=0.0),
        P.SparsityRule(pattern="kernel$", sparsity=0.5),
    ]
    masks = P.magnitude_masks(params, 0.9, rules)
    assert masks["head"]["kernel"] is None
    assert P.mask_sparsity(masks)["__global__"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_range(params, bad):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        P.magnitude_masks(params, bad)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        P.SparsityRule(pattern="kernel", sparsity=bad)


def test_rule_matching_nothing_lists_paths(params):
    with pytest.raises(RuleError, match="convs/0/kernel"):
        P.magnitude_masks(params, 0.5, [P.SparsityRule(pattern="no_such_layer")])


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm(n, m):
    w = jax.random.normal(jax.random.key(0), (16, 6))
    mask = P.nm_masks({"kernel": w}, n, m)["kernel"]
    groups = np.asarray(mask).reshape(16 // m, m, 6)
    np.testing.assert_array_equal(groups.sum(1), n)
    kept_min = np.where(groups, np.abs(np.asarray(w).reshape(16 // m, m, 6)), np.inf).min(1)
    drop_max = np.where(~groups, np.abs(np.asarray(w).reshape(16 // m, m, 6)), -np.inf).max(1)
    assert (kept_min >= drop_max).all()


def test_nm_indivisible_dimension_errors():
    with pytest.raises(ValueError, match="multiple of m=4"):
        P.nm_masks({"kernel": jnp.ones((6, 4))}, 2, 4)


def test_block_masks_remove_whole_tiles():
    w = jax.random.normal(jax.random.key(1), (8, 8))
    mask = np.asarray(P.block_masks({"kernel": w}, 0.5, (2, 4))["kernel"])
    tiles = mask.reshape(4, 2, 2, 4).transpose(0, 2, 1, 3).reshape(8, 8)
    assert set(tiles.mean(1).tolist()) <= {0.0, 1.0}
    assert mask.mean() == 0.5
    with pytest.raises(ValueError, match="does not tile"):
        P.block_masks({"kernel": jnp.ones((6, 8))}, 0.5, (4, 4))


def test_sparse_bytes():
    x = np.zeros((4, 8), np.float32)
    x[0, :2] = 1.0
    b = P.sparse_bytes({"kernel": x})
    assert b["dense_bytes"] == 128 and b["nonzeros"] == 2
    assert b["bitmask_bytes"] == 4 + 8
    assert b["csr_bytes"] == 2 * (4 + 1) + 5 * 4


def _stable_ranks_below(values, k):
    """The definition: entries whose rank in a stable ascending argsort is below ``k``."""
    return np.asarray(jnp.argsort(jnp.argsort(values, stable=True), stable=True) < k)


def _hard_values(kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    v = rng.normal(size=n).astype(np.float32)
    if kind == "ties":  # pruned weights: many exact zeros among magnitudes
        v = np.abs(v)
        v[rng.random(n) < 0.5] = 0.0
    elif kind == "signed_zeros":  # -0.0 sorts equal to 0.0 (by position)
        v = np.round(v * 2) / 2
        v[rng.random(n) < 0.3] = -0.0
    elif kind == "non_finite":  # NaN after +inf, -inf first
        v[rng.random(n) < 0.15] = np.nan
        v[rng.random(n) < 0.15] = np.inf
        v[rng.random(n) < 0.15] = -np.inf
    elif kind == "constant":
        v = np.full(n, 1.5, np.float32)
    return v


@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros", "non_finite", "constant", "bfloat16"])
def test_smallest_k_is_the_stable_sort_rank_on_both_paths(kind):
    """The selection (the CPU path) and the sort (every other platform) take exactly the entries
    a stable argsort ranks below k, for every k from 0 to the size."""
    from methods.pruning.masks import _smallest_k_by_selection
    from methods.pruning.masks import _smallest_k_by_sort

    n = 61
    v = _hard_values("normal" if kind == "bfloat16" else kind, n)
    v = jnp.asarray(v, jnp.bfloat16 if kind == "bfloat16" else jnp.float32)
    paths = [jax.jit(P.smallest_k), jax.jit(_smallest_k_by_selection), jax.jit(_smallest_k_by_sort)]
    for k in range(n + 1):
        want = _stable_ranks_below(v, k)
        assert want.sum() == k
        for path in paths:
            np.testing.assert_array_equal(np.asarray(path(v, jnp.int32(k))), want, err_msg=f"{path} k={k}")


def test_smallest_k_clips_k_and_vmaps_with_a_k_per_row():
    v = jnp.asarray(_hard_values("ties", 40))
    assert not P.smallest_k(v, -3).any() and P.smallest_k(v, 99).all()
    rows = jnp.stack([v, -v, jnp.roll(v, 7)])
    ks = jnp.array([0, 13, 40], jnp.int32)
    got = jax.jit(jax.vmap(P.smallest_k))(rows, ks)
    for row, k, g in zip(rows, ks, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), _stable_ranks_below(row, k))


def test_smallest_k_of_integers_sorts():
    v = jnp.array([5, 1, 3, 1, 2], jnp.int32)
    np.testing.assert_array_equal(np.asarray(P.smallest_k(v, 3)), [False, True, False, True, True])


def test_mask_from_scores_prunes_the_lowest_scores_by_position_among_ties():
    scores = jnp.array([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    # 3 of 6 pruned: the three zeros (ties taken by position), then nothing else
    np.testing.assert_array_equal(
        np.asarray(P.mask_from_scores(scores, 0.5)), [[False, True, False], [True, False, True]]
    )
    # 4 pruned: the zeros and the 1.0
    np.testing.assert_array_equal(
        np.asarray(P.mask_from_scores(scores, 4 / 6)), [[False, True, False], [False, False, True]]
    )
    # 2 pruned: the first two zeros by position
    np.testing.assert_array_equal(
        np.asarray(P.mask_from_scores(scores, 2 / 6)), [[False, True, False], [True, True, True]]
    )


@pytest.mark.parametrize("m", [2, 4, 8, 40])
def test_ranks_in_groups_are_the_stable_sort_ranks(m):
    """Counted (m <= 32) or sorted, each entry's rank within its group is its stable argsort rank,
    ties (signed zeros included) by position, NaNs last."""
    from methods.pruning.masks import ranks_in_groups

    rng = np.random.default_rng(m)
    v = np.round(rng.normal(size=(30, m)), 0).astype(np.float32)
    v[rng.random(v.shape) < 0.2] = -0.0
    v[rng.random(v.shape) < 0.05] = np.nan
    v[rng.random(v.shape) < 0.05] = -np.inf
    for x in (jnp.asarray(v), -jnp.asarray(v), jnp.asarray(v, jnp.bfloat16)):
        want = jnp.argsort(jnp.argsort(x, axis=-1, stable=True), axis=-1, stable=True)
        np.testing.assert_array_equal(np.asarray(jax.jit(ranks_in_groups)(x)), np.asarray(want))


def test_nm_keeps_the_n_largest_of_each_group_ties_by_position():
    w = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, -3.0, 2.0, 3.0], [5.0, 0.0, 0.0, 5.0]]).T  # groups along axis 0
    keep = P.nm_masks({"kernel": w}, 2, 4, axis=0)["kernel"].T
    np.testing.assert_array_equal(
        np.asarray(keep), [[True, True, False, False], [False, True, False, True], [True, False, False, True]]
    )
