"""TensorRT engines: skipped with the stated reason where there is no GPU/TensorRT; checks that need neither."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from research.export import tensorrt as trt_lib

REASON = trt_lib.skip_reason()


def test_skip_reason_names_what_is_missing():
    if REASON is None:
        assert trt_lib.gpu_name()  # a GPU with TensorRT: it has a name
    else:
        assert "tensorrt" in REASON or "GPU" in REASON, REASON
        with pytest.raises(ImportError, match="TensorRT cannot run here"):
            trt_lib.build_engine(__file__, "fp32")


def _qdq_file(path, zero_point):
    """x -> QuantizeLinear -> DequantizeLinear -> y with the given zero point (its dtype decides int8/uint8)."""
    zp = numpy_helper.from_array(np.asarray(zero_point), "zp")
    scale = numpy_helper.from_array(np.asarray(0.1, np.float32), "scale")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [scale, zp],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_int8_engine_refuses_asymmetric_qdq(tmp_path):
    asym = _qdq_file(tmp_path / "asym.onnx", np.uint8(128))  # TFLite-style activations: uint8/zero point
    with pytest.raises(ValueError, match="quantize='int8_qdq_symmetric'"):
        trt_lib.check_precision_file("int8", asym)
    with pytest.raises(ValueError, match="choose from"):
        trt_lib.check_precision_file("int4", asym)
    trt_lib.check_precision_file("int8", _qdq_file(tmp_path / "sym.onnx", np.int8(0)))
    trt_lib.check_precision_file("fp16", asym)  # fp16 builds take the float file; not checked for Q/DQ


def test_engine_parity_measures_relative_difference_and_agreement():
    ref = np.array([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]])
    flipped = ref.copy()
    flipped[2] = [0.0, 0.5]  # one argmax changes; largest change 0.5 of scale 4
    rel, top1 = trt_lib.engine_parity(lambda x: flipped[x[:, 0].astype(int)], np.arange(3)[:, None], ref, batch=2)
    assert rel == pytest.approx(0.5 / 4.0)
    assert top1 == pytest.approx(2 / 3)


@pytest.mark.skipif(REASON is not None, reason=f"TensorRT not runnable: {REASON}")
def test_tensorrt_engines_match_jax(trained_mlp, digits, tmp_path):
    from research.export import export

    x = digits.x_test.reshape(len(digits.x_test), -1)
    xt = digits.x_train.reshape(len(digits.x_train), -1)
    rep = export(
        trained_mlp, x[:32], formats=("onnx",), out_dir=tmp_path, quantize=("int8_qdq_symmetric",), calibration=xt[:256]
    )
    ref = np.asarray(trained_mlp(x))
    files = {"fp32": rep["onnx_fp32"].path, "fp16": rep["onnx_fp32"].path, "int8": rep["onnx_int8_qdq_symmetric"].path}
    results = {r.precision: r for r in trt_lib.build_and_check(files, x, ref, repeats=5, out_dir=str(tmp_path))}
    assert results["fp32"].max_rel_diff <= 1e-5 and results["fp32"].top1_agreement == 1.0
    assert results["fp16"].max_rel_diff <= 1e-2
    assert results["int8"].top1_agreement >= 0.97
    assert (tmp_path / "model_int8.plan").stat().st_size == results["int8"].engine_bytes
