"""Structured pruning: traced channel groups, physical removal equals the masked model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import methods.pruning as P
from methods.pruning.structured import list_channel_scores
from research.nn import build_model
from research.nn import list_models
from research.nn import param_count
from research.train import merge_model
from research.train import split_model
from research.tree import RuleError
from research.tree import path_to_str


def _input(name):
    shape = (40,) if name == "cnn1d" else (8, 8, 3)
    return shape, jax.random.normal(jax.random.key(1), (3, *shape))


# Module-level jits with the graph as a static argument: models with the same structure (the
# same net pruned with different channel scores) share one compilation.
@functools.partial(jax.jit, static_argnums=0)
def _apply_pure(graphdef, params, state, x):
    return merge_model(graphdef, params, state)(x)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _check_equal(model, x, ratio, score="l1", **kw):
    small, plan = P.remove_channels(model, x, ratio, score, return_plan=True, **kw)
    masks = P.channel_masks(model, plan)
    defs, p, s = split_model(nnx.clone(model))
    ref = _apply_pure(defs.eval, P.apply_masks(p, masks), s, x)
    out = _apply(*nnx.split(small), x)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(np.asarray(ref))) and float(jnp.std(ref)) > 0
    scale = float(jnp.max(jnp.abs(ref))) + 1e-6
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * scale, rtol=1e-4)
    assert param_count(small) < param_count(model)
    return small, plan


def _randomized(make):
    """Builds the model abstractly and fills every variable from numpy (no per-op XLA compiles).

    BatchNorm statistics and scales are random too, so the test is not fooled by identity BN.
    """
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)

    def fill(path, x):
        name = path_to_str(path).rpartition("/")[2]
        shape = x.shape
        if name == "var":
            v = rng.uniform(0.5, 1.5, shape)
        elif name == "kernel":
            v = rng.normal(size=shape) / np.sqrt(max(np.prod(shape[:-1]), 1))
        else:
            v = 0.3 * rng.normal(size=shape) + (1.0 if name == "scale" else 0.0)
        return jnp.asarray(v.astype(np.float32))

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    model.eval()
    return model


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model(name):
    shape, x = _input(name)
    opts = {"resnet56": {"width": 4}}.get(name, {})
    model = _randomized(lambda: build_model(name, input_shape=shape, num_classes=5, rngs=nnx.Rngs(0), **opts))
    small, plan = _check_equal(model, x, 0.5)
    assert all(len(g.keep) == g.group.size - g.group.size // 2 for g in plan.groups)


def test_resnet_residual_groups_span_blocks():
    _, x = _input("resnet20")
    model = _randomized(lambda: build_model("resnet20", input_shape=(8, 8, 3), num_classes=5, rngs=nnx.Rngs(0)))
    groups = {g.name: g for g in P.trace_groups(model, x)}
    stage1 = next(g for g in groups.values() if "stem_conv" in g.producers)
    assert {"blocks/0/conv2", "blocks/1/conv2", "blocks/2/conv2"} <= set(stage1.producers)
    assert any(m.path == "blocks/3/proj_conv/kernel" and m.role == "in" for m in stage1.members)
    assert len(groups) == 3 + 9  # three residual streams + one group inside each block


def test_mobilenet_depthwise_rebuilt():
    shape, x = _input("mobilenetv2")
    model = _randomized(lambda: build_model("mobilenetv2", input_shape=shape, num_classes=5, rngs=nnx.Rngs(0)))
    small = P.remove_channels(model, x, 0.5)
    dw = small.blocks[1].dw_conv
    assert dw.feature_group_count == dw.in_features == dw.out_features == 48


class UserNet(nnx.Module):
    """Conv-BN-relu-Conv, a residual add, a depthwise conv and a flatten into Linear."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 12, (3, 3), rngs=rngs)
        self.b1 = nnx.BatchNorm(12, rngs=rngs)
        self.c2 = nnx.Conv(12, 12, (3, 3), use_bias=False, rngs=rngs)
        self.dw = nnx.Conv(12, 12, (3, 3), feature_group_count=12, rngs=rngs)
        self.c3 = nnx.Conv(12, 10, (1, 1), strides=(2, 2), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 10, 16, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.b1(self.c1(x)))
        h = h + self.c2(h)
        h = jax.nn.gelu(self.dw(h))
        h = jax.nn.relu(self.c3(h))
        return self.out(jax.nn.tanh(self.fc(h.reshape(h.shape[0], -1))))


@pytest.mark.parametrize("score", list_channel_scores())
def test_user_model_every_channel_score(score):
    model = _randomized(lambda: UserNet(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
    batch = {"x": x, "y": jnp.array([0, 1, 2])}
    small, plan = _check_equal(model, x, 0.25, score, batch=batch)
    names = {g.group.name: len(g.keep) for g in plan.groups}
    assert names == {"c1": 9, "c3": 8, "fc": 12}  # c1, c2, dw share channels; flatten follows c3
    assert small.fc.in_features == 4 * 4 * 8 and small.dw.feature_group_count == 9
    assert np.all(np.isfinite(plan.groups[0].scores))


def test_rules_and_errors():
    model = _randomized(lambda: build_model("lenet5", input_shape=(8, 8, 1), num_classes=5, rngs=nnx.Rngs(0)))
    x = jnp.ones((2, 8, 8, 1))
    small = P.remove_channels(model, x, 0.5, rules=[P.ChannelRule(pattern="^conv2$")])
    assert small.conv1.out_features == 6 and small.conv2.out_features == 8
    with pytest.raises(RuleError, match="conv1"):
        P.remove_channels(model, x, 0.5, rules=[P.ChannelRule(pattern="nothing")])
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        P.remove_channels(model, x, 1.0)
    with pytest.raises(ValueError, match="needs gradients"):
        P.remove_channels(model, x, 0.5, "taylor")
