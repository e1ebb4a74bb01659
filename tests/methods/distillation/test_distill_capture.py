"""Intermediate capture by path: values equal the layer outputs, under jit, grad and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import methods.distillation as md
from research.nn import build_model
from research.train import merge_model
from research.train import split_model


@pytest.fixture(scope="module")
def mlp():
    return build_model("mlp", input_shape=(8, 8, 1), num_classes=10, widths=(16, 8), rngs=nnx.Rngs(0))


def test_captured_mlp_outputs_equal_layer_outputs(mlp):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
    out, feats = md.intermediates(mlp, x, ["layers/0", "layers/1", "head", ""])
    h0 = mlp.layers[0](x.reshape(3, -1))
    h1 = mlp.layers[1](jax.nn.relu(h0))
    logits = mlp.head(jax.nn.relu(h1))
    np.testing.assert_allclose(feats["layers/0"], h0, rtol=1e-6)
    np.testing.assert_allclose(feats["layers/1"], h1, rtol=1e-6)
    np.testing.assert_allclose(feats["head"], logits, rtol=1e-6)
    np.testing.assert_allclose(feats[""], out, rtol=1e-6)
    np.testing.assert_allclose(out, mlp(x), rtol=1e-6)


def test_captured_conv_map_equals_conv_output():
    model = build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)), jnp.float32)
    _, feats = md.intermediates(model, x, ["conv1"])
    np.testing.assert_allclose(feats["conv1"], model.conv1(x), rtol=1e-6)
    assert feats["conv1"].shape == (2, 8, 8, 6)


class _Sower(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        h = self.lin(x)
        self.sow(nnx.Intermediate, "pre", h * 2.0)
        return jnp.tanh(h)


def test_sowed_values_are_captured_by_name():
    model = _Sower(nnx.Rngs(0))
    x = jnp.ones((2, 3))
    _, feats = md.intermediates(model, x, ["pre", "lin"])
    np.testing.assert_allclose(feats["pre"], 2.0 * model.lin(x), rtol=1e-6)
    np.testing.assert_allclose(feats["lin"], model.lin(x), rtol=1e-6)


def test_capture_under_jit_grad_and_vmap(mlp):
    defs, params, state = split_model(nnx.clone(mlp))
    x = jnp.ones((4, 8, 8, 1))

    def feature_sum(p, x):
        model = merge_model(defs.eval, p, state)
        _, feats = md.intermediates(model, x, ["layers/1"])
        return jnp.sum(feats["layers/1"])

    value = jax.jit(feature_sum)(params, x)
    grads = jax.jit(jax.grad(feature_sum))(params, x)
    np.testing.assert_allclose(grads["layers"][1]["bias"], np.full(8, 4.0), rtol=1e-6)
    assert float(jnp.sum(jnp.abs(grads["head"]["kernel"]))) == 0.0  # the head is after the feature
    # a population of two parameter sets, vmapped
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    pop = jax.jit(jax.vmap(feature_sum, in_axes=(0, None)))(stacked, x)
    doubled = jax.tree.map(lambda a: 2 * a, params)
    np.testing.assert_allclose(pop, [value, feature_sum(doubled, x)], rtol=1e-5)


def test_missing_path_raises_and_captures_nest(mlp):
    x = jnp.ones((1, 8, 8, 1))
    with pytest.raises(md.CaptureError, match="layers/7"):
        md.intermediates(mlp, x, ["layers/7"])
    teacher = build_model("mlp", input_shape=(8, 8, 1), num_classes=10, widths=(4,), rngs=nnx.Rngs(9))
    inner = md.capture_intermediates(lambda m, v: (m(v), teacher(v)), ["head"])
    outer = md.capture_intermediates(lambda m, v: inner(m, v), ["layers/0", "head"])
    ((out, t_out), inner_feats), outer_feats = outer(mlp, x)
    np.testing.assert_allclose(inner_feats["head"], out, rtol=1e-6)
    np.testing.assert_allclose(outer_feats["head"], out, rtol=1e-6)
    np.testing.assert_allclose(outer_feats["layers/0"], mlp.layers[0](x.reshape(1, -1)), rtol=1e-6)
    np.testing.assert_allclose(t_out, teacher(x), rtol=1e-6)
    # every class is restored afterwards
    assert "__wrapped__" not in vars(type(mlp.head).__call__)


class _Child(nnx.Linear):
    """Inherits ``__call__`` (like a fake-quant subclass)."""


def test_subclass_that_inherits_call_is_captured():
    model = build_model("mlp", input_shape=(3,), num_classes=2, widths=(4,), rngs=nnx.Rngs(0))
    child = _Child(3, 4, rngs=nnx.Rngs(1))
    model.layers[0] = child
    x = jnp.ones((2, 3))
    _, feats = md.intermediates(model, x, ["layers/0", "head"])
    np.testing.assert_allclose(feats["layers/0"], child(x), rtol=1e-6)
    assert "__call__" not in vars(_Child)
