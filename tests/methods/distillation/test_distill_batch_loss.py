"""KD with its values in the batches (``kd_batch_loss``): the same loss as the closure form, one
program key for trials that differ in temperatures, weights and teachers, and a population of
such trials trained as one program equal to their sequential runs."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from methods.distillation import IndexedBatchSampler
from methods.distillation import TeacherCache
from methods.distillation import build_teacher_cache
from methods.distillation import hinton_term
from methods.distillation import kd_batch_loss
from methods.distillation import make_kd_term
from methods.distillation import register_kd_term
from methods.distillation import traced_options
from methods.distillation import weighted_sum
from research import config as C
from research import run as run_lib
from research.nn import build_model
from research.population.trainer import Member
from research.population.trainer import PopulationTrainer
from research.stages import TrainStage
from research.train import BatchLoss
from research.train import cross_entropy_loss
from research.train import finetune
from research.train import make_optimizer
from research.train import split_model

TERMS = [(0.7, "hinton", {"temperature": 3.3}), (0.5, "dkd", {"beta": 2.0})]


def _models_and_cache(n=24):
    teacher = build_model("mlp", input_shape=(4,), num_classes=3, widths=(8,), rngs=nnx.Rngs(0))
    student = build_model("mlp", input_shape=(4,), num_classes=3, widths=(5,), rngs=nnx.Rngs(1))
    x = np.random.RandomState(0).randn(n, 4).astype(np.float32)
    y = (np.arange(n) % 3).astype(np.int32)
    return teacher, student, x, y, build_teacher_cache(teacher, x)


def test_batch_loss_equals_the_closure_loss_and_its_gradients():
    _, student, x, y, cache = _models_and_cache()
    closure = weighted_sum(cross_entropy_loss, cache, [(w, make_kd_term(n, **o)) for w, n, o in TERMS], hard_weight=0.3)
    batch_loss = kd_batch_loss(cache, TERMS, hard_weight=0.3)
    loss = batch_loss.transforms[0](cross_entropy_loss)
    idx = np.array([3, 5, 7, 1, 20], np.int32)
    batch = {"x": x[idx], "y": y[idx], "index": idx}
    (la, aux_a), ga = nnx.value_and_grad(closure, has_aux=True)(student, batch, jax.random.key(0))
    (lb, aux_b), gb = nnx.value_and_grad(loss, has_aux=True)(student, batch_loss.extend(batch), jax.random.key(0))
    assert float(lb) == pytest.approx(float(la), rel=1e-6)
    for key in ("hard_loss", "kd/hinton", "kd/dkd"):
        assert float(aux_b[key]) == pytest.approx(float(aux_a[key]), rel=1e-6), key
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the values are data: the constants hold them, defaults of traced options included
    kd = batch_loss.constants["kd"]
    assert float(kd["hard_weight"]) == pytest.approx(0.3) and kd["weights"].tolist() == pytest.approx([0.7, 0.5])
    assert kd["options"][0] == {"temperature": pytest.approx(3.3)}
    assert kd["options"][1] == {"alpha": 1.0, "beta": 2.0, "temperature": 4.0}
    assert batch_loss.rows["teacher"]["logits"].shape == (24, 3)


def test_key_is_shared_by_values_and_split_by_structure():
    _, _, x, _, cache = _models_and_cache()
    other = TeacherCache(np.asarray(cache.logits) * 2.0)
    key = kd_batch_loss(cache, TERMS, hard_weight=0.3).key
    # other temperatures, weights, hard weight and teacher: one program
    assert kd_batch_loss(other, [(0.1, "hinton", {"temperature": 9.0}), (2.0, "dkd", {})], 0.9).key == key
    assert kd_batch_loss(cache, TERMS[:1], hard_weight=0.3).key != key  # another set of terms
    assert kd_batch_loss(TeacherCache(np.zeros((24, 5), np.float32)), TERMS, 0.3).key != key  # other logits' shape


def test_traced_options_are_declared_and_checked():
    assert traced_options("hinton") == ("temperature",)
    assert traced_options("dkd") == ("alpha", "beta", "temperature")
    assert traced_options("rkd_distance") == ()
    register_kd_term("hinton")(hinton_term)  # registered again (a config loaded twice): declaration kept
    assert traced_options("hinton") == ("temperature",)
    with pytest.raises(ValueError, match=r"traced options \['tau'\] are not parameters"):

        @register_kd_term("test_traced_typo", traced=("tau",))
        def _factory(temperature: float = 1.0):
            return make_kd_term("hinton", temperature=temperature)

    with pytest.raises(ValueError, match="temperature=-1.0 must be positive"):
        kd_batch_loss(TeacherCache(np.zeros((4, 3), np.float32)), [(1.0, "hinton", {"temperature": -1.0})])


def test_extend_needs_the_batch_rows():
    batch_loss = kd_batch_loss(TeacherCache(np.zeros((4, 3), np.float32)), TERMS[:1])
    assert isinstance(batch_loss, BatchLoss)
    with pytest.raises(KeyError, match="IndexedBatchSampler"):
        batch_loss.extend({"x": np.zeros((2, 4)), "y": np.zeros(2)})


def test_population_of_distilled_trials_with_their_own_seeds_matches_their_runs(tmp_path):
    """Two trials with their own seeds (data order, init), teachers, temperatures and weights train
    as one program (each gathers its batches and its teacher's rows) and end as their
    ``finetune`` runs with the closure loss end; a third trial with the first's teacher shares its table."""
    base = C.Config(
        model=C.ModelConfig(name="mlp", options={"widths": (8,)}),
        data=C.DataConfig(name="digits", limit=120, val_fraction=0.0),
        stages=(TrainStage(steps=1),),
    )
    bundles = [run_lib.build_bundle(dataclasses.replace(base, seed=s)) for s in (0, 1, 0)]
    teachers = [bundles[i].model for i in (1, 0, 1)]  # trials 0 and 2 distil the same teacher
    values = [(0.3, 0.7, 2.0), (0.6, 0.4, 5.0), (0.1, 1.0, 3.0)]
    settings = {"steps": 5, "learning_rate": 1e-2, "optimizer": "adam"}
    members, runs = [], []
    for b, teacher, (hard, weight, temperature) in zip(bundles, teachers, values, strict=True):
        ds = b.dataset
        cache = build_teacher_cache(teacher, ds.x_train)
        terms = [(weight, "hinton", {"temperature": temperature})]
        members.append(
            Member(
                model=b.model,
                tx=make_optimizer(**settings),
                seed=b.seed,
                x_train=ds.x_train,
                y_train=ds.y_train,
                batch_loss=kd_batch_loss(cache, terms, hard_weight=hard),
            )
        )
        closure = weighted_sum(
            None, cache, [(weight, make_kd_term("hinton", temperature=temperature))], hard_weight=hard
        )
        sampler = IndexedBatchSampler(ds.x_train, ds.y_train, batch_size=16, seed=b.seed)
        model, records = finetune(
            b.model,
            ds,
            workdir=tmp_path / f"run{len(runs)}",
            **settings,
            seed=b.seed,
            batch_size=16,
            loss_transforms=[closure],
            sampler=sampler,
            progress=False,
            log_every=1,
        )
        runs.append((model, [r for r in records if r.get("split") == "train"]))
    trainer = PopulationTrainer.for_members(
        members, steps=5, batch_size=16, program_key=("test", members[0].batch_loss.key), block_steps=5
    )
    assert trainer.extended and not trainer.shared_batches and trainer._table_id == [0, 1, 0]
    results = trainer.train([0, 1, 2])
    for (model, rows), result in zip(runs, results, strict=True):
        leaves = (jax.tree.leaves(split_model(m)[1]) for m in (model, result.model))
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(result.metrics["kd/hinton"], [r["kd/hinton"] for r in rows], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.metrics["hard_loss"], [r["hard_loss"] for r in rows], rtol=1e-4, atol=1e-6)
    assert not np.allclose(results[0].metrics["kd/hinton"], results[2].metrics["kd/hinton"])


def test_members_with_and_without_a_batch_loss_are_refused():
    _, student, x, y, cache = _models_and_cache()
    tx = make_optimizer(steps=2, learning_rate=1e-2)
    plain = Member(model=student, tx=tx, seed=0, x_train=x, y_train=y)
    kd = dataclasses.replace(plain, batch_loss=kd_batch_loss(cache, TERMS[:1]))
    with pytest.raises(ValueError, match=r"members \[0\] have no batch loss"):
        PopulationTrainer.for_members([plain, kd], steps=2, batch_size=8, program_key="k")
