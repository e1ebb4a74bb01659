"""The ``distill`` stage inside a run: teacher from an earlier stage or a finished run."""

import numpy as np
import optax
import pytest
from flax import nnx

import methods.distillation as md
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.run import run
from research.stages import Bundle
from research.stages import StageContext
from research.stages import TrainStage
from research.stages import get_stage


def test_distill_stage_is_registered():
    cls, fn = get_stage("distill")
    assert cls is md.DistillStage and fn is md.run_distill


def test_run_with_teacher_from_earlier_stage_and_from_run_dir(tmp_path):
    config = Config(
        name="kd",
        seed=0,
        model=ModelConfig(name="mlp", options={"widths": (32,)}),
        data=DataConfig(name="digits"),
        stages=(
            TrainStage(steps=80, learning_rate=1e-2, eval_every=0, checkpoint_every=0),
            md.DistillStage(
                teacher="0_train",
                student_model="mlp",
                student_options={"widths": (16,)},
                terms=(md.KDTermConfig(name="hinton", weight=0.5, options={"temperature": 2.0}),),
                hard_weight=0.5,
                train=TrainStage(steps=60, learning_rate=1e-2, eval_every=0, checkpoint_every=0),
            ),
        ),
    )
    report = run(config, str(tmp_path / "a"), progress=False, echo=False)
    teacher_m, student_m = (s["metrics"] for s in report["stages"])
    assert student_m["params"] < teacher_m["params"]
    assert student_m["teacher_test_accuracy"] == teacher_m["test_accuracy"]
    assert student_m["test_accuracy"] > 0.5 and "kd_hinton" in student_m

    # distil from the finished run's final model (the student above), online, with a FitNets hint
    from research.run import build_bundle

    bundle = build_bundle(config)
    cfg_b = md.DistillStage(
        teacher_run=str(tmp_path / "a"),
        cache_teacher=False,
        terms=(
            md.KDTermConfig(name="hinton", weight=0.9, options={"temperature": 4.0}),
            md.KDTermConfig(name="fitnets", weight=0.01, options={"hints": [["layers/0", "layers/0"]]}),
        ),
        train=TrainStage(steps=5, eval_every=0, checkpoint_every=0),
    )
    ctx = StageContext(index=0, label="0_distill", workdir=tmp_path / "b", progress=False)
    result = md.run_distill(bundle, cfg_b, ctx)
    assert abs(result.metrics["teacher_test_accuracy"] - student_m["test_accuracy"]) < 1e-9
    assert "kd_fitnets" in result.metrics and type(result.bundle.model) is type(bundle.model)


def test_pruned_student_keeps_its_zeros(tmp_path):
    from research.data import load_dataset
    from research.nn import build_model

    ds = load_dataset("digits", seed=0)
    teacher = build_model("mlp", input_shape=ds.input_shape, num_classes=10, widths=(16,), rngs=nnx.Rngs(0))
    student = nnx.clone(teacher)
    kernel = student.layers[0].kernel
    before = np.asarray(kernel.get_value())
    kernel.set_value(kernel.get_value() * (np.arange(before.size).reshape(before.shape) % 2))
    bundle = Bundle(model=student, dataset=ds, models={"train": teacher})
    cfg = md.DistillStage(train=TrainStage(steps=5, eval_every=0, checkpoint_every=0))
    ctx = StageContext(index=1, label="1_distill", workdir=tmp_path, progress=False)
    out = md.run_distill(bundle, cfg, ctx).bundle.model
    new = np.asarray(out.layers[0].kernel.get_value())
    old = np.asarray(kernel.get_value())
    was_zero = old == 0
    assert was_zero.sum() == old.size // 2
    assert np.all(new[was_zero] == 0) and np.any(new[~was_zero] != old[~was_zero])
    # the teacher, which shares arrays with the student it was cloned into, is still usable
    assert np.isfinite(np.asarray(teacher.head.kernel.get_value())).all()


def test_keep_zeros_leaves_vectors_free():
    tx = md.keep_zeros(optax.sgd(1.0))
    params = {"w": np.array([[0.0, 1.0]], np.float32), "b": np.zeros(2, np.float32)}
    state = tx.init(params)
    grads = {"w": np.ones((1, 2), np.float32), "b": np.ones(2, np.float32)}
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(updates["w"], [[0.0, -1.0]])
    np.testing.assert_array_equal(updates["b"], [-1.0, -1.0])


def test_deprecated_loss_fields_warn_and_map_to_terms():
    with pytest.warns(DeprecationWarning, match=r"\['loss', 'dkd_beta', 'hints', 'hint_weight'\] are deprecated"):
        old = md.DistillStage(loss="dkd", dkd_beta=4.0, hints=(("layers/0", "layers/0"),), hint_weight=0.01)
    terms, hard = old.kd_terms()
    assert hard == 1.0
    assert terms == (
        md.KDTermConfig(name="dkd", options={"alpha": 1.0, "beta": 4.0, "temperature": 4.0}),
        md.KDTermConfig(name="fitnets", weight=0.01, options={"hints": (("layers/0", "layers/0"),)}),
    )
    with pytest.warns(DeprecationWarning):
        hinton = md.DistillStage(alpha=0.7, temperature=2.0)
    terms, hard = hinton.kd_terms()
    assert terms == (md.KDTermConfig(name="hinton", weight=0.7, options={"temperature": 2.0}),)
    assert hard == pytest.approx(0.3)
    with pytest.warns(DeprecationWarning):
        spelled_old = md.DistillStage(alpha=0.9, temperature=4.0).kd_terms()
    assert md.DistillStage().kd_terms()[0] == spelled_old[0]
    assert md.DistillStage().kd_terms()[1] == pytest.approx(spelled_old[1])
