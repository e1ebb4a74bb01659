import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import nn

SHAPES = {"cnn1d": (40,), "mlp": (8, 8, 1), "lenet300": (28, 28, 1)}


@pytest.mark.parametrize("name", nn.list_models())
def test_zoo_forward_shapes_and_modes(name):
    shape = SHAPES.get(name, (8, 8, 1))
    model = nn.build_model(name, input_shape=shape, num_classes=7, rngs=nnx.Rngs(0))
    x = jnp.ones((3, *shape))
    forward = nnx.jit(lambda m, x: m(x))
    model.train()
    y_train = forward(model, x)
    model.eval()
    y_eval = forward(model, x)
    assert y_train.shape == (3, 7) and y_eval.shape == (3, 7)
    assert np.isfinite(np.asarray(y_eval)).all()
    assert nn.param_count(model) == sum(nn.params_per_module(model).values())


@pytest.mark.parametrize(
    "name,shape",
    [("lenet5", (28, 28, 1)), ("resnet20", (32, 32, 3)), ("vgg_small", (32, 32, 3)), ("mobilenetv2", (32, 32, 3))],
)
def test_image_models_take_dataset_shapes(name, shape):
    model = nn.build_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(1))
    model.eval()
    assert model(jnp.zeros((2, *shape))).shape == (2, 10)


def test_known_parameter_counts():
    r20 = nn.build_model("resnet20", input_shape=(32, 32, 3), num_classes=10, rngs=nnx.Rngs(0))
    r56 = nn.build_model("resnet56", input_shape=(32, 32, 3), num_classes=10, rngs=nnx.Rngs(0))
    # He et al.: 0.27M and 0.85M (ours uses 1x1 projection shortcuts: +~2.6k params).
    assert 0.26e6 < nn.param_count(r20) < 0.28e6
    assert 0.84e6 < nn.param_count(r56) < 0.87e6
    lenet = nn.build_model("lenet300", input_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(0))
    assert nn.param_count(lenet) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_mlp_any_widths():
    m = nn.build_model("mlp", input_shape=(5,), num_classes=2, widths=(7, 6, 5, 4), rngs=nnx.Rngs(0))
    assert [layer.out_features for layer in m.layers] == [7, 6, 5, 4]


def test_bad_model_name_and_option():
    with pytest.raises(KeyError, match=r"unknown model .resnet1000.; did you mean .resnet\d+.\? registered: \["):
        nn.build_model("resnet1000", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="valid options"):
        nn.build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0), widths=(3,))
    with pytest.raises(ValueError, match="register"):
        nn.register_model("mlp")(lambda *a, **k: None)


def test_iter_get_and_replace_module_by_path():
    model = nn.build_model("resnet20", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    paths = [p for p, _ in nn.iter_modules(model)]
    assert "blocks/0/conv1" in paths and "head" in paths
    assert isinstance(nn.get_module(model, "blocks/3/proj_conv"), nnx.Conv)
    new_head = nnx.Linear(64, 3, rngs=nnx.Rngs(1))
    model2 = nn.replace_module(model, "head", new_head)
    assert model2.head is new_head and model.head.out_features == 10  # original untouched
    model2.eval()
    assert model2(jnp.ones((1, 8, 8, 1))).shape == (1, 3)
    with pytest.raises(KeyError, match="module paths"):
        nn.get_module(model, "blocks/0/conv9")


def test_replace_by_type_and_in_list():
    model = nn.build_model("mlp", input_shape=(4,), num_classes=3, widths=(8, 8), rngs=nnx.Rngs(0))

    class Scaled(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            return 2.0 * self.inner(x)

    x = jnp.ones((2, 4))
    out, paths = nn.replace_by_type(model, nnx.Linear, lambda p, m: Scaled(m) if p.startswith("layers") else m)
    assert paths == ["layers/0", "layers/1"]
    assert isinstance(out.layers[0], Scaled) and isinstance(out.head, nnx.Linear)
    assert not np.allclose(out(x), model(x))
    assert len(nn.find_modules(out, Scaled)) == 2


def test_summary_lists_modules_and_total():
    model = nn.build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    text = nn.summary(model)
    assert "conv1" in text and f"{nn.param_count(model):,}" in text


@pytest.mark.parametrize("name,shape", [("lenet5", (8, 8, 1)), ("mlp", (64,)), ("attn_gru", (16, 8))])
def test_models_initialize_as_one_program_with_the_weights_built_op_by_op(name, shape):
    from research.nn import registry

    fn = registry.get_model_fn(name)
    rngs_one, rngs_eager = nnx.Rngs(3), nnx.Rngs(3)
    model = nn.build_model(name, input_shape=shape, num_classes=10, rngs=rngs_one)
    eager = fn(shape, 10, rngs=rngs_eager)
    assert nnx.graphdef(model) == nnx.graphdef(eager)
    # the same draws within float rounding (a fused program may round a few weights differently)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(eager)), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # the caller's Rngs advanced as the constructor advanced it
    for a, b in zip(jax.tree.leaves(nnx.state(rngs_one)), jax.tree.leaves(nnx.state(rngs_eager)), strict=True):
        a, b = (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in (a, b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # another seed runs the same program (its keys are arguments), with that seed's weights
    programs = len(registry._INIT_PROGRAMS)
    other = nn.build_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(4))
    assert len(registry._INIT_PROGRAMS) == programs
    (drawn, mine) = (max(jax.tree.leaves(nnx.state(m, nnx.Param)), key=np.size) for m in (other, model))
    assert not np.array_equal(np.asarray(drawn), np.asarray(mine))


def test_constructors_that_cannot_be_traced_are_built_op_by_op():
    from research.nn import registry

    class Picky(nnx.Module):
        def __init__(self, *, rngs):
            w = jax.random.normal(rngs.params(), (3,))
            self.w = nnx.Param(w if float(w.sum()) > -100 else -w)  # Python control flow on a value

    model = registry.initialize(Picky, rngs=nnx.Rngs(0))
    assert model.w.get_value().shape == (3,)
    assert any(v is registry._EAGER for v in registry._INIT_PROGRAMS.values())

    # unhashable arguments, and a build inside a transformation, take the same path
    class Scaled(nnx.Module):
        def __init__(self, scale, *, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (2,)) * np.asarray(scale).sum())

    assert registry.initialize(Scaled, np.ones(2), rngs=nnx.Rngs(0)).w.get_value().shape == (2,)
    shapes = nnx.eval_shape(lambda: nn.build_model("mlp", input_shape=(4,), num_classes=3, rngs=nnx.Rngs(0)))
    assert nnx.graphdef(shapes) == nnx.graphdef(
        nn.build_model("mlp", input_shape=(4,), num_classes=3, rngs=nnx.Rngs(0))
    )
