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
