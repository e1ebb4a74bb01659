"""The KD loss transforms in the training step: formulas, merging, projections, composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import methods.distillation as md
from research.nn import build_model
from research.train import compose
from research.train import create_train_state
from research.train import cross_entropy_loss
from research.train import l2_regularizer
from research.train import make_train_step

SHAPE = (8, 8, 1)


def _mlp(widths, seed):
    return build_model("mlp", input_shape=SHAPE, num_classes=10, widths=widths, rngs=nnx.Rngs(seed))


def _batch(seed=0, n=16):
    r = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(r.normal(size=(n, *SHAPE)), jnp.float32),
        "y": jnp.asarray(r.integers(0, 10, n), jnp.int32),
    }


@pytest.fixture(scope="module")
def teacher():
    t = _mlp((32, 16), 0)
    t.eval()
    return t


def test_distill_equals_its_formula(teacher):
    student = _mlp((8,), 1)
    batch = _batch()
    loss, aux = md.distill(cross_entropy_loss, teacher, temperature=3.0, alpha=0.7)(student, batch, jax.random.key(0))
    s, t = student(batch["x"]), teacher(batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(s, batch["y"]).mean()
    expected = 0.3 * ce + 0.7 * md.kd_loss(s, t, 3.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["hard_loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(aux["kd/hinton"], md.kd_loss(s, t, 3.0), rtol=1e-5)
    assert "logits" in aux and "accuracy" in aux


def test_zero_kd_gradient_when_student_is_teacher(teacher):
    student = nnx.clone(teacher)
    defs, state = create_train_state(student, optax.sgd(0.1))
    loss_fn = md.weighted_sum(
        lambda m, b, r: (jnp.zeros(()), {"logits": m(b["x"])}),
        teacher,
        [
            (1.0, md.hinton_term(4.0)),
            (1.0, md.dkd_term()),
            (1.0, md.rkd_distance_term()),
            (1.0, md.rkd_angle_term()),
        ],
    )
    step = make_train_step(defs, optax.sgd(0.1), loss_fn, donate=False, log_grad_norm=True)
    _, metrics = step(state, _batch())
    assert float(metrics["loss"]) < 1e-5
    assert float(metrics["grad_norm"]) < 1e-5


def test_stacked_kd_transforms_merge_into_one_capture(teacher):
    student = md.with_hints(
        _mlp((16, 8), 2),
        teacher,
        [("layers/1", "layers/1")],
        np.zeros((2, *SHAPE)),
        rngs=nnx.Rngs(3),
    )
    stacked = compose(
        md.distill(None, teacher, temperature=2.0, alpha=0.5),
        md.fitnets(None, teacher, [("layers/1", "layers/1")], weight=0.1),
        md.attention_transfer(None, teacher, [("layers/0", "layers/1")], weight=10.0),
    )(cross_entropy_loss)
    assert isinstance(stacked, md.KDLoss) and stacked.base is cross_entropy_loss
    assert stacked.student_paths == ("layers/1", "layers/0")
    flat = md.weighted_sum(
        cross_entropy_loss,
        teacher,
        [
            (0.5, md.hinton_term(2.0)),
            (0.1, md.fitnets_term([("layers/1", "layers/1")])),
            (10.0, md.attention_term([("layers/0", "layers/1")])),
        ],
        hard_weight=0.5,
    )
    batch, rng = _batch(), jax.random.key(0)
    (a, aux_a), (b, _) = stacked(student, batch, rng), flat(student, batch, rng)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert {"kd/hinton", "kd/fitnets", "kd/attention", "hard_loss"} <= set(aux_a)


def test_fitnets_trains_the_projection_and_unwraps(teacher):
    base = _mlp((8,), 4)
    hinted = md.with_hints(base, teacher, [("layers/0", "layers/1")], np.zeros((2, *SHAPE)), rngs=nnx.Rngs(5))
    tx = optax.adam(1e-2)
    defs, state = create_train_state(hinted, tx)
    assert set(state.params) == {"student", "projections"}
    before = state.params["projections"][0]["kernel"]
    step = make_train_step(
        defs,
        tx,
        cross_entropy_loss,
        [md.fitnets(None, teacher, [("layers/0", "layers/1")])],
        donate=False,
    )
    losses = []
    for i in range(15):
        state, m = step(state, _batch(i))
        losses.append(float(m["kd/fitnets"]))
    assert not np.allclose(state.params["projections"][0]["kernel"], before)
    assert losses[-1] < losses[0]
    student = md.unwrap_student(nnx.merge(defs.eval, state.params, state.model_state))
    assert type(student) is type(base) and student.layers[0].kernel.shape == (64, 8)


def test_fitnets_without_projection_explains_the_fix(teacher):
    with pytest.raises(TypeError, match="with_hints"):
        md.fitnets(cross_entropy_loss, teacher, [("layers/0", "layers/1")])(_mlp((8,), 1), _batch(), jax.random.key(0))


def test_kd_composes_with_other_transforms_and_nesting_is_reported(teacher):
    student = _mlp((16,), 6)
    ok = compose(
        md.distill(None, teacher),
        l2_regularizer(1e-3),
        md.attention_transfer(None, teacher, [("layers/0", "layers/1")]),
    )
    loss, aux = ok(cross_entropy_loss)(student, _batch(), jax.random.key(0))
    assert np.isfinite(loss) and "l2" in aux and "kd/attention" in aux
    # feature transforms separated by another transform nest their captures; both see the values
    nested = compose(
        md.attention_transfer(None, teacher, [("layers/0", "layers/1")]),
        l2_regularizer(1e-3),
        md.attention_transfer(None, teacher, [("layers/0", "layers/1")], weight=1.0),
    )
    loss, aux = nested(cross_entropy_loss)(student, _batch(), jax.random.key(0))
    np.testing.assert_allclose(aux["kd/attention"], aux["kd/attention_2"], rtol=1e-6)


def test_distillation_pulls_the_student_towards_the_teacher(teacher):
    student = _mlp((16,), 7)
    tx = optax.adam(3e-3)
    defs, state = create_train_state(student, tx)
    step = make_train_step(defs, tx, cross_entropy_loss, [md.distill(None, md.OnlineTeacher(teacher), alpha=1.0)])
    first = None
    for i in range(30):
        state, m = step(state, _batch(i % 4, n=32))
        first = float(m["kd/hinton"]) if first is None else first
    assert float(m["kd/hinton"]) < 0.5 * first


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alpha=1.5"):
        md.distill(cross_entropy_loss, lambda b: b["x"], alpha=1.5)
    with pytest.raises(ValueError, match="hint pair"):
        md.fitnets_term([])
