"""Searchable model families: every member builds and runs, the space round-trips, methods accept members."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import nn
from research.automl import Space
from research.config import Config
from research.config import ModelConfig
from research.config import apply_overrides

SHAPES = {"mlp_family": (8, 8), "conv1d_family": (40,), "resnet_family": (8, 8), "mobilenet_family": (8, 8)}


def test_every_family_is_registered_in_the_zoo():
    assert nn.list_families() == sorted(SHAPES)
    for name in SHAPES:
        assert name in nn.list_models()
        assert set(nn.model_kwargs(name)) == set(nn.get_family(name).choices)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_members_build_and_run(name):
    fam = nn.get_family(name)
    rng = np.random.default_rng(0)
    x = jnp.ones((2, *SHAPES[name]))
    sizes = []
    for options in [fam.smallest(), fam.sample(rng)]:
        model = nn.build_model(name, input_shape=SHAPES[name], num_classes=10, rngs=nnx.Rngs(0), **options)
        y = nnx.jit(lambda m, x: m(x))(model, x)
        assert y.shape == (2, 10) and bool(jnp.all(jnp.isfinite(y)))
        sizes.append(nn.param_count(model))
    assert sizes[0] <= sizes[1]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_space_round_trips_through_get_space_and_set_keys(name):
    fam = nn.get_family(name)
    space = fam.get_space()
    assert isinstance(space, Space)
    assert set(space.names) == {f"model.options.{k}" for k in fam.choices}
    rng = np.random.default_rng(1)
    for _ in range(5):
        params = space.decode(rng.uniform(size=len(space.names)))
        options = fam.from_params(params)
        # every point is a member, and its --set keys select exactly that member in a config
        config = apply_overrides(Config(model=ModelConfig(name="mlp")), fam.overrides(options))
        assert config.model.name == name and dict(config.model.options) == options
        u, _ = space.encode(params)
        assert fam.from_params(space.decode(u)) == options


def test_conditional_widths_and_bad_options():
    fam = nn.get_family("mlp_family")
    assert fam.canonical({"depth": 1, "width_0": 16, "width_2": 16}) == fam.canonical({"depth": 1, "width_0": 16})
    assert fam.key({"depth": 1, "width_1": 32}) == fam.key({"depth": 1, "width_1": 64})
    with pytest.raises(ValueError, match="width_0=17 is not one of"):
        fam.canonical({"width_0": 17})
    with pytest.raises(ValueError, match="no option"):
        fam.canonical({"height": 3})
    with pytest.raises(KeyError, match="unknown searchable model family .lenet5.; registered"):
        nn.get_family("lenet5")


def test_conv1d_max_head_reads_each_channels_maximum_over_positions():
    kw = dict(input_shape=(40,), num_classes=10, rngs=nnx.Rngs(0), width_2=8)
    pooled = nn.build_model("conv1d_family", head="max", **kw)
    flat = nn.build_model("conv1d_family", **kw)
    assert flat.head_kind == "flatten" and flat.head.in_features == 8 * 5  # the default: the supernet's head
    assert pooled.head.in_features == 8
    x = jax.random.normal(jax.random.key(0), (3, 40))
    features = x[..., None]
    for stage in pooled.stages:
        features = stage(features)
    np.testing.assert_allclose(pooled(x), pooled.head(features.max(axis=1)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"head='mean' is not one of \['max', 'flatten'\]"):
        nn.build_model("conv1d_family", head="mean", **kw)


@pytest.mark.slow  # every method and export on one family member
def test_smallest_member_goes_through_every_method(tmp_path):
    name = "conv1d_family"
    from methods import decomposition
    from methods import distillation
    from methods import pruning
    from methods import quantization
    from research import export

    shape = SHAPES[name]
    fam = nn.get_family(name)
    model = nn.build_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0), **fam.smallest())
    model.eval()
    x = jax.random.normal(jax.random.key(0), (16, *shape))
    small = pruning.remove_channels(model, x[:4], ratio=0.5)
    assert nn.param_count(small) < nn.param_count(model)
    assert small(x).shape == (16, 10)
    q = quantization.calibrate(quantization.quantize_model(model, [quantization.QuantRule(bits=8)]), [x])
    assert float(jnp.mean(jnp.argmax(q(x), -1) == jnp.argmax(model(x), -1))) > 0.8
    low = decomposition.factorize(
        model, [decomposition.DecompositionRule(pattern="^head", method="svd", rank=4)], check_speed=False
    )
    assert low(x).shape == (16, 10)
    loss_fn = distillation.distill(lambda m, b, r: (jnp.mean(m(b["x"]) ** 2), {"logits": m(b["x"])}), model)
    loss, _ = loss_fn(model, {"x": x, "y": jnp.zeros(16, jnp.int32)}, jax.random.key(0))
    assert bool(jnp.isfinite(loss))
    report = export.export(model, np.asarray(x[:2]), formats=("stablehlo",), out_dir=str(tmp_path))
    assert report.artifacts


def test_restrict_frees_only_the_named_dimensions():
    fam = nn.get_family("mobilenet_family")
    assert fam.dimensions() == ("width", "expand", "kernel", "depth")
    sub = fam.restrict(("kernel",))
    assert sub.size() == 2**3  # three stages, kernel 3 or 5; everything else at its largest
    assert sub.smallest() == {**fam.largest(), "kernel_0": 3, "kernel_1": 3, "kernel_2": 3}
    assert sub.largest() == fam.largest() and sub.name == fam.name
    assert fam.restrict(()).size() == 1
    with pytest.raises(ValueError, match="colour"):
        fam.restrict(("colour",))
