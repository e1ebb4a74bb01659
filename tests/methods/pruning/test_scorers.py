"""Shared conformance test run over every registered scorer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods.pruning as P


def _tree():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "a": {"kernel": jax.random.normal(k[0], (12, 10)), "bias": jnp.zeros(10)},
        "b": {"kernel": jax.random.normal(k[1], (3, 3, 4, 5))},
    }
    grads = {
        "a": {"kernel": jax.random.normal(k[2], (12, 10)), "bias": jnp.ones(10)},
        "b": {"kernel": jax.random.normal(k[3], (3, 3, 4, 5))},
    }
    return params, grads


@pytest.mark.parametrize("name", P.list_scorers())
@pytest.mark.parametrize("allocation", ["layerwise", "global"])
def test_scorer_conformance(name, allocation):
    params, grads = _tree()
    paths = ["a/kernel", "b/kernel"]
    scores = P.compute_scores(name, params, paths, grads, jax.random.key(3))
    for p in paths:
        chex.assert_shape(scores[p], params[p.split("/")[0]]["kernel"].shape)
        assert jnp.all(jnp.isfinite(scores[p]))
    again = P.compute_scores(name, params, paths, grads, jax.random.key(3))
    chex.assert_trees_all_close(scores, again)  # deterministic for a key

    @jax.jit
    def masks_at(s):
        return P.allocate(scores, {p: s for p in paths}, allocation)

    for s in (0.0, 0.3, 0.8):
        masks = masks_at(jnp.float32(s))  # traced sparsity, one compilation
        total = sum(m.size for m in masks.values())
        pruned = sum(int(m.size - m.sum()) for m in masks.values())
        assert pruned == pytest.approx(s * total, abs=len(paths))
        kept = np.concatenate([np.asarray(scores[p])[np.asarray(masks[p])] for p in paths])
        dropped = np.concatenate([np.asarray(scores[p])[~np.asarray(masks[p])] for p in paths])
        if allocation == "global" and len(dropped) and len(kept):
            assert kept.min() >= dropped.max()
    assert masks_at._cache_size() == 1


def test_gradient_scorer_needs_grads():
    params, _ = _tree()
    with pytest.raises(ValueError, match="needs gradients"):
        P.compute_scores("saliency", params, ["a/kernel"])


def test_unknown_scorer_lists_registered():
    with pytest.raises(KeyError, match="magnitude"):
        P.compute_scores("nope", {}, [])


def test_duplicate_scorer_refused():
    with pytest.raises(ValueError, match="already registered"):
        P.register_scorer("magnitude")(lambda w, g, k: w)


def test_snip_masks_exact_global():
    from flax import nnx

    from research.nn import build_model

    m = build_model("mlp", input_shape=(6,), num_classes=3, widths=(8,), rngs=nnx.Rngs(0))
    batch = {"x": jnp.ones((4, 6)), "y": jnp.array([0, 1, 2, 0])}
    masks = P.snip_masks(m, batch, 0.5)
    assert P.mask_sparsity(masks)["__global__"] == pytest.approx(0.5, abs=0.02)


def test_erk_densities_total():
    shapes = {"a": (3, 3, 4, 8), "b": (100, 10), "c": (8, 2)}
    d = P.erk_densities(shapes, 0.2)
    n = {k: np.prod(v) for k, v in shapes.items()}
    kept = sum(float(d[k]) * n[k] for k in shapes)
    assert kept == pytest.approx(0.2 * sum(n.values()), rel=1e-4)
    assert float(d["c"]) > float(d["b"])  # small layers are denser
