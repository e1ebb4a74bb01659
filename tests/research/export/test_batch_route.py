"""The variable-batch routes of the TFLite export and the per-tensor int8 mode."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from export_test_models import BatchMixer
from export_test_models import Clamps
from flax import nnx

from research.export import OnnxRunner
from research.export import TFLiteRunner
from research.export import export
from research.export import inference_fn
from research.export import to_tflite
from research.export.onnx_export import fused_int8_saturates
from research.export.tflite import STATIC_TRACE_BATCH
from research.export.tflite import batch_route
from research.export.tflite import free_batch_dim
from research.export.tflite import op_counts


@pytest.fixture(scope="module")
def conv_inputs():
    rng = np.random.default_rng(1)
    return rng.normal(size=(64, 8, 8, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def routes(convnet, conv_inputs):
    fn = inference_fn(convnet)
    out = {r: to_tflite(fn, conv_inputs[:4], batch_route=r) for r in ("auto", "jax2tf")}
    out["fixed"] = to_tflite(fn, conv_inputs[:4], batch_polymorphic=False)
    return out


def test_batch_route_is_recorded_in_the_file(routes):
    assert batch_route(routes["auto"]) == f"static trace at batch {STATIC_TRACE_BATCH}, batch dimension freed"
    assert batch_route(routes["jax2tf"]) == "jax2tf shape polymorphism"
    assert batch_route(routes["fixed"]) == "fixed batch 4"


def test_static_route_folds_batchnorm_that_jax2tf_route_leaves(routes):
    static, poly = op_counts(routes["auto"]), op_counts(routes["jax2tf"])
    # Conv (one input channel: depthwise) + BatchNorm + ReLU becomes one op; the flatten a RESHAPE.
    assert static == collections.Counter({"DEPTHWISE_CONV_2D": 1, "RESHAPE": 1, "FULLY_CONNECTED": 1}), static
    assert poly["BROADCAST_TO"] > 0 and sum(poly.values()) > sum(static.values()), poly
    assert len(routes["auto"]) < len(routes["jax2tf"])


@pytest.mark.parametrize("batch", [1, 3, STATIC_TRACE_BATCH, 20])
def test_static_route_matches_jax_at_any_batch(routes, convnet, conv_inputs, batch):
    x = conv_inputs[:batch]
    ref = np.asarray(jax.jit(inference_fn(convnet))(x))
    np.testing.assert_allclose(TFLiteRunner(routes["auto"])(x), ref, rtol=1e-5, atol=1e-5)


def test_static_route_onnx_has_a_variable_batch(convnet, conv_inputs, tmp_path):
    rep = export(convnet, conv_inputs[:4], formats=("tflite", "onnx"), out_dir=tmp_path, latency_repeats=2)
    assert rep["tflite_fp32"].extra["batch_route"].startswith("static trace")
    runner = OnnxRunner(rep["onnx_fp32"].path)
    ref = np.asarray(jax.jit(inference_fn(convnet))(conv_inputs[:11]))
    np.testing.assert_allclose(runner(conv_inputs[:11]), ref, rtol=1e-5, atol=1e-5)


def test_batch_mixing_model_falls_back_to_jax2tf():
    model = BatchMixer(rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"batch_route='static'.*batch_route='jax2tf'"):
        to_tflite(model, x, batch_route="static")
    with pytest.warns(UserWarning, match="jax2tf shape polymorphism instead"):
        blob = to_tflite(model, x)
    assert batch_route(blob) == "jax2tf shape polymorphism"
    for b in (1, 5):
        np.testing.assert_allclose(TFLiteRunner(blob)(x[:b]), np.asarray(model(x[:b])), rtol=1e-5, atol=1e-6)


def test_free_batch_dim_rewrites_reshape_targets_and_signatures(routes):
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(routes["fixed"]))
    freed = flatbuffer_utils.convert_bytearray_to_object(bytearray(free_batch_dim(routes["fixed"], 4)))
    sg = freed.subgraphs[0]
    assert list(sg.tensors[sg.inputs[0]].shapeSignature) == [-1, 8, 8, 1]
    assert list(sg.tensors[sg.outputs[0]].shapeSignature) == [-1, 10]
    assert list(m.subgraphs[0].tensors[m.subgraphs[0].inputs[0]].shape) == [4, 8, 8, 1]
    reshape_targets = [
        np.frombuffer(bytes(bytearray(freed.buffers[t.buffer].data)), np.int32).tolist()
        for t in sg.tensors
        if freed.buffers[t.buffer].data is not None and t.type == 2 and list(t.shape) == [2]  # int32 (2,)
    ]
    assert [-1, 512] in reshape_targets, reshape_targets


def test_bad_batch_route(convnet, conv_inputs):
    with pytest.raises(ValueError, match="batch_route='sideways' is not one of"):
        to_tflite(inference_fn(convnet), conv_inputs[:2], batch_route="sideways")


def test_tflite_clamps_convert_to_onnx_clip(tmp_path):
    model = Clamps(rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(0, 2, size=(64, 8)).astype(np.float32)
    rep = export(
        model,
        x[:4],
        formats=("tflite", "onnx"),
        out_dir=tmp_path,
        quantize="int8",
        calibration=x,
        eval_data=x,
        latency_repeats=2,
    )
    ops = op_counts(open(rep["tflite_fp32"].path, "rb").read())
    assert ops["RELU_0_TO_1"] == 1 and ops["RELU_N1_TO_1"] == 1, ops
    assert rep["onnx_fp32"].max_abs_diff < 1e-5
    # The int8 ONNX file computes what the int8 TFLite file does, to one output step (2/255):
    # executed as written on any CPU, and in onnxruntime's fused int8 kernels where they do not
    # saturate (VNNI, ARM; research.export.cpu).
    y_tfl = TFLiteRunner(rep["tflite_int8"].path)(x)
    y_onnx = OnnxRunner(rep["onnx_int8"].path, optimization="none")(x)
    assert np.max(np.abs(y_onnx - y_tfl)) <= 2 / 255 + 1e-6
    if not fused_int8_saturates():
        assert np.max(np.abs(OnnxRunner(rep["onnx_int8"].path)(x) - y_tfl)) <= 2 / 255 + 1e-6
    assert y_onnx[:, :3].min() >= 0 and y_onnx.max() <= 1 + 1e-6 and y_onnx.min() >= -1 - 1e-6
    import onnx  # noqa: PLC0415

    types = {n.op_type for n in onnx.load(rep["onnx_fp32"].path).graph.node}
    assert "Clip" in types and not any(t.startswith("TFL_") for t in types), types


def test_unconverted_tflite_op_is_refused_by_name():
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    from research.export import UnsupportedOpError  # noqa: PLC0415
    from research.export.onnx_export import _refuse_unconverted  # noqa: PLC0415

    vi = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    node = helper.make_node("TFL_SIGN_BIT", ["x"], ["y"], name="jit(fn)/block/sign")
    proto = helper.make_model(helper.make_graph([node], "g", [vi[0]], [vi[1]]))
    with pytest.raises(UnsupportedOpError, match=r"TFLite op 'SIGN_BIT' \(node 'jit\(fn\)/block/sign'"):
        _refuse_unconverted(proto)
