"""Teacher cache: indexed batches, look-ups, and the same training as the online teacher."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import methods.distillation as md
from research.data import BatchSampler
from research.nn import build_model
from research.train import create_train_state
from research.train import cross_entropy_loss
from research.train import make_train_step


@pytest.fixture(scope="module")
def teacher(digits):
    return build_model("mlp", input_shape=digits.input_shape, num_classes=10, widths=(32,), rngs=nnx.Rngs(0))


def test_indexed_sampler_matches_batch_sampler(digits):
    plain = BatchSampler(digits.x_train, digits.y_train, batch_size=64, seed=3)
    indexed = md.IndexedBatchSampler(digits.x_train, digits.y_train, batch_size=64, seed=3)
    for step in (0, 5, plain.steps_per_epoch + 1):
        a, b = plain.batch(step), indexed.batch(step)
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
        np.testing.assert_array_equal(digits.x_train[b["index"]], b["x"])
        assert b["index"].dtype == np.int32


def test_cache_rows_equal_online_outputs(digits, teacher, tmp_path):
    cache = md.build_teacher_cache(teacher, digits.x_train, batch_size=500, feature_paths=["layers/0"])
    assert len(cache) == len(digits.x_train)
    batch = md.IndexedBatchSampler(digits.x_train, digits.y_train, batch_size=32, seed=0).batch(3)
    online = md.OnlineTeacher(teacher, feature_paths=["layers/0"])(batch)
    cached = cache(batch)
    np.testing.assert_allclose(cached["logits"], online["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached["features"]["layers/0"], online["features"]["layers/0"], rtol=1e-5, atol=1e-5)
    cache.save(tmp_path / "cache.npz")
    loaded = md.TeacherCache.load(tmp_path / "cache.npz")
    np.testing.assert_array_equal(loaded.logits, cache.logits)
    np.testing.assert_array_equal(loaded.features["layers/0"], cache.features["layers/0"])
    with pytest.raises(KeyError, match="IndexedBatchSampler"):
        cache({"x": batch["x"], "y": batch["y"]})


def test_cached_teacher_gives_the_same_training_as_the_online_teacher(digits, teacher):
    sampler = md.IndexedBatchSampler(digits.x_train, digits.y_train, batch_size=64, seed=1)
    cache = md.build_teacher_cache(teacher, digits.x_train)

    def train(teacher_fn):
        student = build_model("mlp", input_shape=digits.input_shape, num_classes=10, widths=(8,), rngs=nnx.Rngs(1))
        tx = optax.adam(1e-2)
        defs, state = create_train_state(student, tx)
        step = make_train_step(defs, tx, cross_entropy_loss, [md.distill(None, teacher_fn, temperature=4.0)])
        losses = []
        for i in range(12):
            state, m = step(state, sampler.batch(i))
            losses.append(float(m["kd/hinton"]))
        return state.params, losses

    p_online, l_online = train(teacher)
    p_cached, l_cached = train(cache)
    np.testing.assert_allclose(l_cached, l_online, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_cached, p_online)
    assert l_online[-1] < l_online[0]
