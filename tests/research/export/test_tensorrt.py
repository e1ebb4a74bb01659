"""TensorRT engines: skipped with the stated reason where there is no GPU/TensorRT; checks that need neither."""

from __future__ import annotations

import os

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


def test_tensorrt_format_plumbing_without_a_gpu(trained_mlp, digits, tmp_path, monkeypatch):
    """The ``tensorrt`` export format with the GPU parts replaced: which ONNX file and precision each
    variant's engine is built from, the .plan files in the export set, and every engine checked vs JAX.

    The stand-in "engine" names its ONNX file and runs it in onnxruntime; the real engines are checked
    by ``test_tensorrt_engines_match_jax`` on a GPU machine.
    """
    from research.export import OnnxRunner
    from research.export import export
    from research.export import get_format

    built = []

    def build_engine(onnx_path, precision="fp32", *, max_batch=64, opt_batch=32, workspace_bytes=1 << 30):
        built.append((os.path.basename(onnx_path), precision, max_batch))
        return f"{precision}|{onnx_path}".encode()

    class Runner:
        def __init__(self, engine):
            self._run = OnnxRunner(engine.decode().split("|", 1)[1])

        def __call__(self, x):
            return self._run(x)

    monkeypatch.setattr(trt_lib, "skip_reason", lambda: None)
    monkeypatch.setattr(trt_lib, "build_engine", build_engine)
    monkeypatch.setattr(trt_lib, "TensorRTRunner", Runner)
    monkeypatch.setattr(trt_lib, "gpu_name", lambda: "stand-in GPU")
    fmt = get_format("tensorrt")
    assert fmt.variants(("fp32", "int8", "int8_qdq_symmetric", "fp16")) == ("fp32", "int8_qdq_symmetric", "fp16")
    x = digits.x_test.reshape(len(digits.x_test), -1)
    xt = digits.x_train.reshape(len(digits.x_train), -1)
    rep = export(
        trained_mlp,
        x[:8],
        formats=("tensorrt", "onnx"),
        out_dir=tmp_path,
        quantize=("fp16", "int8_qdq_symmetric"),
        calibration=xt[:64],
        eval_data=x[:64],
        latency_repeats=1,
    )
    assert sorted(built) == [
        ("model_fp32.onnx", "fp16", 64),
        ("model_fp32.onnx", "fp32", 64),
        ("model_int8_qdq_symmetric.onnx", "int8", 64),
    ]
    for q in ("fp32", "fp16", "int8_qdq_symmetric"):
        a = rep[f"tensorrt_{q}"]
        assert a.path == str(tmp_path / f"model_{q}.plan") and a.runtime.endswith("on stand-in GPU"), a
        onnx_a = rep["onnx_fp32" if q != "int8_qdq_symmetric" else "onnx_int8_qdq_symmetric"]
        assert a.max_abs_diff == onnx_a.max_abs_diff  # the stand-in runs the same file
    assert rep["tensorrt_fp32"].max_rel_diff <= 1e-5
