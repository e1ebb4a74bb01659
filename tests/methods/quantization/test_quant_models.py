"""Fake-quant layers, observers, BN folding, rules/surgery, calibration, export params, QAT step."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from methods.quantization import FakeQuant
from methods.quantization import QuantConv
from methods.quantization import QuantLinear
from methods.quantization import QuantRule
from methods.quantization import QuantSpec
from methods.quantization import calibrate
from methods.quantization import find_conv_bn_pairs
from methods.quantization import find_quantizers
from methods.quantization import float_layers
from methods.quantization import fold_batchnorm
from methods.quantization import layer_order
from methods.quantization import layer_table
from methods.quantization import list_methods
from methods.quantization import list_observers
from methods.quantization import make_observer
from methods.quantization import quant_layers
from methods.quantization import quant_params
from methods.quantization import quantize
from methods.quantization import quantize_model
from methods.quantization import quantized_bytes
from methods.quantization.folding import apply_jit
from research.nn import build_model
from research.nn import get_module as nnx_get
from research.nn import list_models
from research.train import create_train_state
from research.train import make_train_step
from research.tree import RuleError

SHAPES = {"cnn1d": (40,), "mlp": (8, 8, 1), "lenet300": (8, 8, 1)}


@functools.cache
def _built(name, seed):
    shape = SHAPES.get(name, (8, 8, 1))
    return build_model(name, input_shape=shape, num_classes=5, rngs=nnx.Rngs(seed)), shape


def _model(name, seed=0):
    """A fresh copy of a zoo model (building one runs many eager init ops; build each once)."""
    model, shape = _built(name, seed)
    return nnx.clone(model), shape


def _batches(shape, n=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 1.0, (size, *shape)).astype(np.float32) for _ in range(n)]


# --- layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        ({"kernel_size": (3, 3), "strides": (2, 2), "padding": "SAME"}, (2, 7, 7, 4)),
        ({"kernel_size": (3, 3), "feature_group_count": 4, "padding": "VALID"}, (2, 6, 6, 4)),
        ({"kernel_size": (5,), "strides": (2,), "padding": ((1, 1),)}, (2, 20, 4)),
    ],
)
def test_quant_conv_keeps_conv_options(kwargs, shape):
    conv = nnx.Conv(4, 8, rngs=nnx.Rngs(0), **kwargs)
    x = jax.random.uniform(jax.random.key(1), shape)
    q = QuantConv(nnx.clone(conv), weight=QuantSpec(bits=8, per_channel=True), input=None)
    y, ref = q(x), conv(x)
    chex.assert_equal_shape([y, ref])
    # identical to the float conv run on the fake-quantized kernel
    wq = q.quantized_kernel()
    float_on_wq = nnx.clone(conv)
    float_on_wq.kernel.set_value(wq)
    np.testing.assert_allclose(y, float_on_wq(x), atol=1e-6)
    np.testing.assert_allclose(y, ref, atol=0.02 * float(jnp.max(jnp.abs(ref))))


def test_per_channel_kernel_scales_per_output_channel():
    lin = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    lin.kernel.set_value(lin.kernel[...] * jnp.array([1.0, 10.0, 0.1, 3.0]))
    q = QuantLinear(lin, weight=QuantSpec(bits=4, per_channel=True), input=None)
    scale, zp = q.weight_quant.scale_zero_point()
    chex.assert_shape(scale, (4,))
    np.testing.assert_allclose(scale, np.abs(np.asarray(lin.kernel[...])).max(axis=0) / 7, rtol=1e-6)
    np.testing.assert_array_equal(zp, 0)
    k = np.asarray(q.quantized_kernel()) / np.asarray(scale)
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)


def test_input_quantizer_needs_calibration():
    q = QuantLinear(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), weight=None, input=QuantSpec(signed=None))
    with pytest.raises(RuntimeError, match="calibrate"):
        q(jnp.ones((1, 3)))


def test_train_mode_ranges_follow_data():
    fq = FakeQuant(QuantSpec(bits=8, signed=None, symmetric=False, ema_momentum=0.5))
    fq.set_range(0.0, 1.0)
    fq.train()
    fq(jnp.array([0.0, 3.0]))
    assert float(fq.hi[...]) == pytest.approx(2.0)
    fq.eval()
    fq(jnp.array([0.0, 9.0]))
    assert float(fq.hi[...]) == pytest.approx(2.0)


# --- quantization methods (shared checks) ---------------------------------------------------


@pytest.mark.parametrize("name", list_methods())
def test_quant_method_conformance(name):
    check_quant_method(name)


def check_quant_method(name):
    """Shared checks for a registered QuantMethod (also used by tests/test_extension_points.py)."""
    x = jnp.linspace(-3.0, 3.0, 61)
    for bits in (2, 8):
        fq = FakeQuant(QuantSpec(bits=bits, method=name, signed=True, symmetric=True))
        fq.set_range(np.float32(-2.0), np.float32(2.0))
        y = fq(x)
        chex.assert_equal_shape([y, x])
        chex.assert_tree_all_finite(y)
        scale, zero = (np.asarray(a, np.float64) for a in fq.scale_zero_point())
        q = np.asarray(y, np.float64) / scale + zero
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)  # on the integer grid it reports
        qmin, qmax = QuantSpec(bits=bits, method=name).grid(True)
        assert q.min() >= qmin - 1e-3 and q.max() <= qmax + 1e-3
        np.testing.assert_allclose(fq(y), y, atol=1e-5)  # quantizing twice changes nothing
        g = jax.grad(lambda v, fq=fq: jnp.sum(fq(v) ** 2))(x)  # straight-through: gradients exist
        chex.assert_tree_all_finite(g)
        assert float(jnp.sum(jnp.abs(g))) > 0


# --- observers (shared checks) --------------------------------------------------------------


@pytest.mark.parametrize("name", list_observers())
@pytest.mark.parametrize("axis", [None, -1])
def test_observer_conformance(name, axis):
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(64, 3)) * np.array([1.0, 2.0, 4.0]) for _ in range(3)]
    obs = make_observer(name, axis=axis, bits=4)
    with pytest.raises(RuntimeError, match="no data"):
        obs.range()
    for d in data:
        obs.update(d)
    lo, hi = obs.range()
    all_ = np.concatenate(data)
    red = None if axis is None else 0
    chex.assert_shape([lo, hi], () if axis is None else (3,))
    assert np.all(lo <= 0) and np.all(hi >= 0)
    assert np.all(lo >= all_.min(axis=red) - 1e-6) and np.all(hi <= all_.max(axis=red) + 1e-6)


def test_observer_specifics():
    x = np.concatenate([np.linspace(-1, 1, 10000), [50.0]])
    mm = make_observer("minmax")
    pc = make_observer("percentile", percentile=99.9)
    mse = make_observer("mse", bits=4)
    for o in (mm, pc, mse):
        o.update(x)
    assert mm.range()[1] == pytest.approx(50.0)
    assert pc.range()[1] < 1.01
    assert mse.range()[1] < 10.0  # the outlier is clipped at 4 bits
    ma = make_observer("moving_average", momentum=0.5)
    ma.update(np.array([0.0, 1.0]))
    ma.update(np.array([0.0, 3.0]))
    assert ma.range()[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown observer 'nope'; registered"):
        make_observer("nope")


# --- BN folding -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected_pairs", [("resnet20", 21), ("mobilenetv2", 22), ("vgg_small", 6)])
def test_find_conv_bn_pairs(name, expected_pairs):
    model, _ = _model(name)
    pairs = find_conv_bn_pairs(model)
    assert len(pairs) == expected_pairs
    assert all(isinstance(nnx_get(model, b), nnx.BatchNorm) for _, b in pairs)


@pytest.mark.parametrize("name,expected_pairs", [("mobilenetv2", 22)])  # depthwise + residual
def test_fold_batchnorm_keeps_outputs(name, expected_pairs):
    model, shape = _model(name)
    x = jnp.asarray(_batches(shape, 1, 16)[0])
    model.eval()
    rng = np.random.default_rng(0)
    for _, bn in [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]:
        n = bn.mean.shape  # non-trivial statistics and affine parameters
        bn.mean.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
        bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, size=n), jnp.float32))
        bn.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, size=n), jnp.float32))
        bn.bias.set_value(jnp.asarray(rng.normal(size=n) * 0.3, jnp.float32))
    pairs = find_conv_bn_pairs(model)
    assert len(pairs) == expected_pairs
    folded = fold_batchnorm(model, check=False)
    assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(folded))
    ref = apply_jit(model, x)
    np.testing.assert_allclose(apply_jit(folded, x), ref, atol=1e-4 * float(jnp.max(jnp.abs(ref))) + 1e-5)


def test_fold_batchnorm_refuses_quantized_models():
    model, shape = _model("resnet20")
    q = quantize_model(model, [QuantRule(bits=8)])
    with pytest.raises(ValueError, match="before quantize_model"):
        fold_batchnorm(q)


# --- rules and surgery ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_quantizes(name):
    model, shape = _model(name)
    batches = _batches(shape)
    sample = batches[0]
    folded = fold_batchnorm(model, sample, check=False)
    q = quantize_model(folded, [QuantRule(pattern=".*", bits=4)])
    assert float_layers(q) == []
    q = calibrate(q, batches)
    if name in ("lenet5", "mlp", "cnn1d"):  # running every deep model costs a compile each
        y = apply_jit(q, sample)
        chex.assert_shape(y, (len(sample), 5))
        chex.assert_tree_all_finite(y)
    for _, fq in find_quantizers(q):
        assert fq.calibrated and np.all(np.isfinite(np.asarray(fq.scale_zero_point()[0])))
    for _, layer in quant_layers(q):  # really quantized: at most 16 levels per output channel
        k = np.asarray(layer.quantized_kernel()).reshape(-1, layer.layer.kernel.shape[-1])
        assert max(len(np.unique(k[:, c])) for c in range(k.shape[1])) <= 16
    params = quant_params(q)
    assert set(params["layers"]) == {p for p, _ in quant_layers(q)}


def test_mixed_precision_rules_and_skips():
    model, shape = _model("lenet5")
    order = layer_order(model)
    assert order == ["conv1", "conv2", "fc1", "fc2", "head"]
    rules = [QuantRule(pattern=r"^(conv1|head)$", bits=8), QuantRule(pattern=".*", bits=4, method="lsq")]
    q = calibrate(quantize_model(model, rules), _batches(shape))
    bits = {r["path"]: r["weight_bits"] for r in layer_table(q)}
    assert bits == {"conv1": 8, "conv2": 4, "fc1": 4, "fc2": 4, "head": 8}
    q2 = quantize_model(model, [QuantRule(bits=4)], skip_first=True, skip_last=True)
    assert float_layers(q2) == ["conv1", "head"]
    q3 = quantize_model(model, [QuantRule(pattern="^fc", bits=4), QuantRule(pattern="head", keep_float=True)])
    assert float_layers(q3) == ["conv1", "conv2", "head"]
    rows = {r["path"]: r for r in layer_table(q3)}
    assert rows["head"]["weight_bits"] == 32 and rows["fc1"]["weight_bits"] == 4


def test_rule_errors():
    model, _ = _model("lenet5")
    with pytest.raises(RuleError, match="nonexistent"):
        quantize_model(model, [QuantRule(pattern="nonexistent", bits=8)])
    with pytest.raises(ValueError, match="bits=9"):
        QuantRule(bits=9)
    with pytest.raises(ValueError, match="bits=1"):
        QuantRule(act_bits=1)
    with pytest.raises(ValueError, match="not registered"):
        QuantRule(method="magic")
    with pytest.raises(ValueError, match="no rules"):
        quantize_model(model, [])
    with pytest.raises(ValueError, match="already has fake-quant"):
        quantize_model(quantize_model(model, [QuantRule()]), [QuantRule()])


def test_quantize_model_copies_and_leaves_original():
    model, shape = _model("mlp")
    before = np.asarray(model.head.kernel[...]).copy()
    q = quantize_model(model, [QuantRule(bits=8)])
    np.testing.assert_array_equal(q.head.layer.kernel[...], before)
    assert isinstance(model.head, nnx.Linear) and isinstance(q.head, QuantLinear)


# --- export numerics and size ---------------------------------------------------------------


def test_quant_params_reproduce_the_fake_quant_kernel_and_bytes():
    model, shape = _model("lenet5")
    q = calibrate(quantize_model(model, [QuantRule(bits=4, method="lsq")]), _batches(shape))
    params = quant_params(q, integer_weights=True)
    assert params["version"] == 1 and params["float_layers"] == []
    conv1 = params["layers"]["conv1"]
    w = conv1["weight"]
    assert w["axis"] == 3 and w["bits"] == 4 and w["scale"].shape == (6,)
    assert conv1["kernel_int"].dtype == np.int8
    assert conv1["input"]["signed"] is True  # calibration data has negative values
    # integer kernel * scale is exactly what the fake-quant layer computes with
    deq = (conv1["kernel_int"].astype(np.float32) - w["zero_point"]) * w["scale"]
    np.testing.assert_allclose(deq, q.conv1.quantized_kernel(), rtol=1e-6, atol=1e-7)
    inp = conv1["input"]
    x = _batches(shape)[0]
    qx = quantize(x, inp["scale"], inp["zero_point"], inp["bits"], signed=inp["signed"])
    assert int(qx.min()) >= inp["qmin"] and int(qx.max()) <= inp["qmax"]
    # bytes: kernels at 4 bits are about 8x smaller than float
    fp32 = 4 * sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert quantized_bytes(q) < fp32 / 5


# --- QAT step -------------------------------------------------------------------------------


@pytest.mark.parametrize("method,act", [("lsq", "lsq"), ("ste", "pact"), ("ste", "ste")])
def test_qat_train_step_updates_quantizer_parameters(method, act):
    model, shape = _model("mlp")
    q = calibrate(quantize_model(model, [QuantRule(bits=4, method=method, act_method=act)]), _batches(shape))
    tx = optax.adam(1e-2)
    defs, state = create_train_state(q, tx)
    step = make_train_step(defs, tx, donate=False)
    rng = np.random.default_rng(0)
    batch = {"x": rng.uniform(0, 1, (16, *shape)).astype(np.float32), "y": rng.integers(0, 5, 16)}
    new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    p0, p1 = state.params, new.params
    if method == "lsq":
        assert not np.allclose(p0["head"]["weight_quant"]["step"], p1["head"]["weight_quant"]["step"])
    if act == "pact":
        assert not np.allclose(p0["layers"][1]["input_quant"]["alpha"], p1["layers"][1]["input_quant"]["alpha"])
    if act == "ste":  # training mode moves the moving-average range
        before = state.model_state["layers"][0]["input_quant"]["hi"]
        assert float(before) != float(new.model_state["layers"][0]["input_quant"]["hi"])


def test_bitmask_bytes_of_a_pruned_quantized_model():
    model, shape = _model("lenet5")
    fc1 = model.fc1.kernel[...]
    model.fc1.kernel[...] = fc1 * (np.arange(fc1.size).reshape(fc1.shape) % 4 == 0)  # 75% zeros
    q = calibrate(
        quantize_model(model, [QuantRule(pattern="^fc1$", bits=8), QuantRule(keep_float=True)]), _batches(shape)
    )
    rows = {r["path"]: r for r in layer_table(q)}
    n, nnz = fc1.size, int(np.count_nonzero(q.fc1.layer.kernel[...]))
    assert nnz <= n // 4
    # fc1: one bit per entry plus the non-zeros at 8 bits, instead of n bytes; bias and scales as before
    assert rows["fc1"]["bytes"] - rows["fc1"]["bitmask_bytes"] == n - (-(-n // 8) + nnz)
    # dense layers: the bitmask is never chosen when it is larger
    for path in ("conv1", "conv2", "fc2", "head"):
        assert rows[path]["bitmask_bytes"] == rows[path]["bytes"], path
    assert quantized_bytes(q, bitmask=True) == quantized_bytes(q) - (n - (-(-n // 8) + nnz))
