"""A model stored as recipe + arrays and rebuilt computes exactly what the in-memory model did.

Every zoo model (smallest widths) goes through every structural step (channel removal, Tucker-2/SVD
factorization, BatchNorm folding, LSQ fake-quant with calibrated signs) and is saved with
``research.store`` and loaded back (recipe replayed, arrays loaded): same graph, bit-identical
outputs (resnet56, resnet20's class at greater depth, replays its zoo step only). The stage
functions (prune with N:M masks, decompose with CP/Tucker-2/SVD, qat) run on LeNet-5 and each
result goes through the same round trip, and the distillation student's recipe is checked for every
student source; prune with channel removal and unstructured masks and PTQ run through
``research.run`` in tests/research/test_store.py (distill with a fresh student and teacher_run:
tests/methods/distillation/test_distill_stage.py, whose run now stores through the same check).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from methods.decomposition.stage import DecomposeStage
from methods.decomposition.stage import run_decompose
from methods.decomposition.surgery import DecompositionRule
from methods.decomposition.surgery import factorize_recipe_step
from methods.decomposition.surgery import factorize_with_report
from methods.distillation.stage import DistillStage
from methods.distillation.stage import resolve_student
from methods.distillation.stage import student_recipe
from methods.pruning.masks import SparsityRule
from methods.pruning.stage import PruneStage
from methods.pruning.stage import run_prune
from methods.pruning.structured import remove_channels
from methods.pruning.structured.channels import plan_recipe_step
from methods.quantization.folding import find_conv_bn_pairs
from methods.quantization.folding import fold_batchnorm
from methods.quantization.folding import fold_recipe_step
from methods.quantization.modules import find_quantizers
from methods.quantization.report import quant_params
from methods.quantization.stage import QATStage
from methods.quantization.stage import run_qat
from methods.quantization.surgery import QuantRule
from methods.quantization.surgery import quant_static_recipe_step
from methods.quantization.surgery import quantize_model
from methods.quantization.surgery import quantize_recipe_step
from research import recipe as recipe_lib
from research import store
from research.data import load_dataset
from research.nn import TINY_OPTIONS
from research.nn import build_model
from research.nn import list_models
from research.stages import Bundle
from research.stages import StageContext
from research.stages import TrainStage
from research.tree import map_with_paths

FLAT = {"cnn1d"}  # a 1-D model: digits are fed as length-64 signals


@pytest.fixture(scope="module")
def digits300():
    """300 digits examples: enough for every stage to run, small enough for quick compiles."""
    return load_dataset("digits", seed=0, limit=300)


def _bundle_data(name, ds):
    if name in FLAT:
        flat = {
            f"x_{s}": getattr(ds, f"x_{s}").reshape(len(getattr(ds, f"x_{s}")), -1) for s in ("train", "val", "test")
        }
        ds = dataclasses.replace(ds, **flat)
    return ds


def _bundle(name, data, seed=0):
    ds = _bundle_data(name, data)
    model, recipe = _random_model(name, ds, seed)
    return Bundle(model=model, dataset=ds, seed=seed, recipe=recipe)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _outputs(model, x):
    """Eval-mode outputs through one jitted program per graph (the rebuilt model shares it)."""
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, jnp.asarray(x)))


def _roundtrip(tmp_path, label, bundle, outputs=True):
    """Saves ``bundle``'s stage result, loads it back and checks outputs, state, extras and recipe."""
    x = bundle.dataset.x_test[:16]
    record = {"label": label, "metrics": {"test_accuracy": 0.5}}
    store.save_stage(tmp_path / label, model=bundle.model, extras=bundle.extras, record=record, recipe=bundle.recipe)
    saved = store.load_stage(tmp_path / label)
    if outputs:
        np.testing.assert_array_equal(_outputs(saved.model, x), _outputs(bundle.model, x), err_msg=label)
    _assert_same_data(nnx.to_pure_dict(nnx.state(saved.model)), nnx.to_pure_dict(nnx.state(bundle.model)), "state")
    expected = nnx.clone(bundle.model)
    expected.eval()
    assert nnx.graphdef(saved.model) == nnx.graphdef(expected)
    assert saved.recipe == tuple(bundle.recipe) and saved.record == record
    _assert_same_data(saved.extras, bundle.extras, "extras")
    return saved


def _assert_same_data(got, want, where):
    """Equal nested data: same containers and keys, equal arrays (dtype and shape included)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for k in want:
            _assert_same_data(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same_data(g, w, f"{where}[{i}]")
    elif isinstance(want, (np.ndarray, np.generic, jax.Array)):
        g, w = np.asarray(got), np.asarray(want)
        assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), where
    else:
        assert type(got) is type(want) and got == want, where


def _ctx(tmp_path, label):
    return StageContext(index=0, label=label, workdir=tmp_path / label, seed=0, progress=False)


def _random_model(name, ds, seed=0):
    """A zoo model with random values set from numpy (no per-shape initialiser compilation)."""
    opts = TINY_OPTIONS.get(name, {})
    abstract = nnx.eval_shape(
        lambda: build_model(name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0), **opts)
    )
    model = recipe_lib.zeros_like_abstract(abstract)
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)

    def fill(path, leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        lo, hi = (0.5, 1.5) if path.endswith("var") else (-1.0, 1.0)
        return jnp.asarray(rng.uniform(lo, hi, leaf.shape).astype(leaf.dtype))

    nnx.replace_by_pure_dict(state, map_with_paths(fill, nnx.to_pure_dict(state)))
    model = nnx.merge(graphdef, state)
    return model, (recipe_lib.zoo_step(name, opts, ds.input_shape, ds.num_classes, 0),)


# resnet56 is resnet20's class (ResNetCIFAR: the same blocks, 9 instead of 3 per stage); its
# structural steps are those of resnet20, so only its own zoo_model step is replayed here (the
# full chain costs ~3x resnet20's time for no new code path).
# The searchable families (research/nn/families.py) are made of the same layers as the hand-designed
# zoo, so they too replay only their zoo_model step here (the full chain would add minutes).
SURGERY_ZOO = [n for n in list_models() if n != "resnet56" and not n.endswith("_family")]


@pytest.mark.parametrize("name", ["resnet56", *(n for n in list_models() if n.endswith("_family"))])
def test_zoo_model_rebuilds_from_its_zoo_step(name, digits300, tmp_path):
    ds = _bundle_data(name, digits300)
    model, recipe = _random_model(name, ds)
    # same graph and same arrays is the same function (no forward compilation needed here)
    _roundtrip(tmp_path, "stage", Bundle(model=model, dataset=ds, recipe=recipe), outputs=False)


@pytest.mark.parametrize("name", SURGERY_ZOO)
def test_every_zoo_model_rebuilds_after_channel_removal_factorization_and_quantization(name, digits300, tmp_path):
    ds = _bundle_data(name, digits300)
    x = jnp.asarray(ds.x_test[:8])
    model, recipe = _random_model(name, ds)
    model, plan = remove_channels(model, x, 0.5, return_plan=True)
    recipe = recipe_lib.append(recipe, plan_recipe_step(plan))
    model, report = factorize_with_report(
        model, [DecompositionRule(pattern=".*", energy=0.9, n_iter_max=2)], sample_input=x[:2], check_speed=False
    )
    recipe = recipe_lib.append(recipe, factorize_recipe_step(report.rows()))
    pairs = find_conv_bn_pairs(model, x[:2])
    model = fold_batchnorm(model, x[:2], check=False)
    recipe = recipe_lib.append(recipe, fold_recipe_step(pairs))
    rules = [QuantRule(pattern=".*", bits=4, method="lsq")]
    model = quantize_model(model, rules, sample_input=x[:2])
    recipe = recipe_lib.append(
        recipe, quantize_recipe_step(rules, input_shape=ds.input_shape, skip_first=False, skip_last=False, seed=0)
    )
    for i, (_, fq) in enumerate(find_quantizers(model)):
        if not fq.calibrated:  # input ranges as calibration would set them; the sign follows lo
            fq.set_range(np.float32(-1.0 if i % 2 else 0.0), np.float32(2.0 + i))
    recipe = recipe_lib.append(recipe, quant_static_recipe_step(model))
    assert report.factorized and find_quantizers(model)
    bundle = Bundle(model=model, dataset=ds, recipe=recipe)
    _roundtrip(tmp_path, "stage", bundle)


def test_every_stage_kind_rebuilds_identically(digits300, tmp_path):
    one = TrainStage(steps=1, batch_size=16, checkpoint_every=100, eval_every=0, log_every=1)
    teacher = _bundle("lenet5", digits300)
    bundle = _bundle("lenet5", digits300, seed=1)
    bundle.models["train"], bundle.recipes["train"] = teacher.model, teacher.recipe
    cases = [
        (
            "1_prune",
            run_prune,
            # N:M on the fc kernels (the convs' 1 and 6 input channels are not multiples of m=4)
            PruneStage(
                pattern="nm",
                n=2,
                m=4,
                rules=(
                    SparsityRule(pattern="^fc2/kernel$"),
                ),  # fc1 is factorized below: a pruned layer stays unfactorized
                schedule="one_shot",
                train=None,
            ),
        ),
        (
            "2_decompose",
            run_decompose,
            DecomposeStage(
                rules=(
                    DecompositionRule(pattern="conv1", method="cp", rank=2),
                    DecompositionRule(pattern="conv2", method="tucker2", rank=(2, 3)),
                    DecompositionRule(pattern="fc1", method="svd", rank=4),
                    DecompositionRule(pattern=".*", skip=True),
                ),
                check_speed=False,
                train=None,
            ),
        ),
        (
            "3_qat",
            run_qat,
            QATStage(bits=4, method="lsq", first_last_bits=8, skip_last=True, calibration_examples=32, train=one),
        ),
    ]
    for label, fn, cfg in cases:
        bundle = fn(bundle, cfg, _ctx(tmp_path, label)).bundle
        saved = _roundtrip(tmp_path, label, bundle)
        if label == "3_qat":  # the quantization parameters are also derivable from the rebuilt model
            _assert_same_data(quant_params(saved.model), bundle.extras["quant_params"], "quant_params")
    # Distillation adds no step: run_distill returns student_recipe's recipe with the trained student
    # (through research.run, with a fresh zoo student and a teacher_run, in test_distill_stage.py).
    # A fresh zoo student starts its own recipe, an earlier stage's model brings its recipe.
    for cfg, kinds in (
        (DistillStage(student_model="mlp", student_options={"widths": (8,)}), ["zoo_model"]),
        (DistillStage(student="train"), ["zoo_model"]),
        (DistillStage(), [s["kind"] for s in bundle.recipe]),
    ):
        recipe = student_recipe(bundle, cfg, 0)
        assert [s["kind"] for s in recipe] == kinds
        student = nnx.clone(resolve_student(bundle, cfg, 0))
        student.eval()
        assert nnx.graphdef(recipe_lib.build(recipe)) == nnx.graphdef(student)


def test_a_structure_change_without_a_recipe_step_fails_at_save(digits300, tmp_path):
    bundle = _bundle("mlp", digits300)
    pruned = run_prune(
        bundle, PruneStage(channel_ratio=0.5, sparsity=0.0, schedule="one_shot", train=None), _ctx(tmp_path, "p")
    ).bundle
    with pytest.raises(recipe_lib.RecipeError, match="only in the model|shapes differ") as e:
        store.save_stage(tmp_path / "x", model=pruned.model, extras={}, record={}, recipe=bundle.recipe)
    assert "append a recipe step" in str(e.value)
    assert not (tmp_path / "x" / "result").exists()
