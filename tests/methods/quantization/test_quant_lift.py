"""Quantizers with their bit widths lifted into the state (``lift_bits``): the same function and
gradients as at their own bits, one graph for every bit width, and a population of mixed bit
widths trained lifted equal to populations of one bit width each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from methods.quantization import QuantRule
from methods.quantization import calibrate
from methods.quantization import quantize_model
from methods.quantization.modules import LIFTED_BITS
from methods.quantization.modules import FakeQuant
from methods.quantization.modules import QuantSpec
from methods.quantization.modules import find_quantizers
from methods.quantization.modules import lift_bits
from research.nn import build_model
from research.population.padding import canonical_graphdef
from research.population.padding import lift_models
from research.population.padding import liftable_modules
from research.population.padding import unpad_tree
from research.population.trainer import Member
from research.population.trainer import PopulationTrainer
from research.train import create_train_state
from research.train import make_optimizer
from research.train import split_model

BITS = (3, 4, 6, 8)


@pytest.mark.parametrize("method", ["ste", "lsq", "pact"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lifted_quantizer_computes_the_same_values_and_gradients(method, bits):
    spec = QuantSpec(bits=bits, method=method, signed=None if method == "pact" else True)
    fq = FakeQuant(spec)
    fq.set_range(np.float32(0.0 if method == "pact" else -0.7), np.float32(1.3))
    lifted = nnx.clone(fq)
    lift_bits(lifted)
    assert lifted.spec.bits == LIFTED_BITS and lifted.levels()[1] == fq.levels()[1]
    x = jnp.linspace(-1.5, 2.0, 301)

    @nnx.jit
    def value_and_grads(m, x):
        def f(m, x):
            return jnp.sum(jnp.sin(3 * m(x)))

        return f(m, x), nnx.grad(f, argnums=(0, 1))(m, x)

    for m in (fq, lifted):
        m.train()  # an ste weight quantizer would re-read the range; an input one follows an EMA
    (va, (ga_m, ga_x)), (vb, (gb_m, gb_x)) = value_and_grads(fq, x), value_and_grads(lifted, x)
    # Exactly equal: the grid enters only through comparisons, clipping and multiplications by its
    # reciprocal, which a compiled program computes alike for a constant and a value.
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(ga_x, gb_x)
    grads = [jax.tree.leaves(nnx.state(g, nnx.Param)) for g in (ga_m, gb_m)]
    assert len(grads[0]) == (0 if method == "ste" else 1)  # lsq's step, pact's alpha
    for a, b in zip(*grads, strict=True):
        np.testing.assert_array_equal(a, b)
    # and eagerly
    np.testing.assert_array_equal(fq(x), lifted(x))


def _quantized(bits, x, method="ste"):
    model = build_model("mlp", input_shape=(8,), num_classes=3, widths=(12,), rngs=nnx.Rngs(0))
    q = quantize_model(model, [QuantRule(pattern=".*", bits=bits, method=method)])
    return calibrate(q, [x])


def test_one_graph_for_every_bit_width_and_cut_back_to_each_own():
    x = np.random.RandomState(0).randn(32, 8).astype(np.float32)
    models = [_quantized(b, x) for b in BITS]
    assert len({str(nnx.graphdef(m)) for m in models}) == len(BITS)  # the bits are in the graph
    assert len({canonical_graphdef(m) for m in models}) == 1  # not in the lifted one
    assert canonical_graphdef(_quantized(4, x, method="lsq")) != canonical_graphdef(models[0])
    paths = liftable_modules(models[0])
    assert paths and all(v == (3,) for v in paths.values())
    same, differ = lift_models([models[1], _quantized(4, x)])
    assert differ == {} and same[0] is models[1]
    lifted, differ = lift_models(models)
    assert set(differ) == set(paths) and all(v == [(b,) for b in BITS] for v in differ.values())
    for own, up in zip(models, lifted, strict=True):
        assert all(q.spec.bits == LIFTED_BITS for _, q in find_quantizers(up))
        np.testing.assert_array_equal(own(jnp.asarray(x)), up(jnp.asarray(x)))
        # a lifted train state cut to the trial's own: its grids dropped, every other leaf kept
        tx = make_optimizer(steps=2, learning_rate=1e-3)
        (_, mine), (_, theirs) = (create_train_state(nnx.clone(m), tx) for m in (own, up))
        cut = unpad_tree(theirs, mine)
        assert jax.tree.structure(cut) == jax.tree.structure(mine)
        for a, b in zip(jax.tree.leaves(cut), jax.tree.leaves(mine), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["ste", "lsq", "pact"])
def test_population_of_mixed_bit_widths_trains_as_populations_of_one_bit_width(method):
    """Trial i of a lifted population of 3, 4, 6 and 8 bits ends where trial 0 of an unlifted
    population of four copies of bit width i ends (the same program shape, its grid a constant)."""
    rng = np.random.RandomState(0)
    x = rng.randn(64, 8).astype(np.float32)
    y = rng.randint(0, 3, 64).astype(np.int32)
    models = [_quantized(b, x, method) for b in BITS]

    def train(ms):
        members = [
            Member(model=m, tx=make_optimizer(steps=6, learning_rate=3e-3), seed=0, x_train=x, y_train=y) for m in ms
        ]
        key = ("lift-test", canonical_graphdef(ms[0]), str(nnx.graphdef(ms[0])))
        trainer = PopulationTrainer.for_members(members, steps=6, batch_size=16, program_key=key, block_steps=6)
        return trainer.train(list(range(len(ms))))

    lifted, _ = lift_models(models)
    mixed = train(lifted)
    for i, model in enumerate(models):
        (alone, *_) = train([model] * 4)
        got, want = (jax.tree.leaves(split_model(r.model)[1]) for r in (mixed[i], alone))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(mixed[i].losses, alone.losses)
    assert len({float(r.losses[-1]) for r in mixed}) == len(BITS)
