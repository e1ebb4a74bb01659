"""Fusion report: counts on models whose fusions are known, and the latency-objective hook."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from research.export import export
from research.export.fusion import fusion_report
from research.export.fusion import ort_fusion
from research.export.latency import artifact_latency


@pytest.fixture(scope="module")
def conv_report(convnet):
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
    runtimes = ("xla", "tflite", "onnxruntime")
    try:
        import tvm  # noqa: F401

        runtimes += ("tvm",)
    except ImportError:
        pass
    return fusion_report(convnet, x, runtimes=runtimes, latency_repeats=2)


def test_tflite_fuses_conv_bn_relu_into_one_op(conv_report):
    r = conv_report["tflite"]
    assert r.error is None, r.error
    # conv + BatchNorm (mean, variance, scale, shift) + ReLU + dense: BN folded, ReLU fused.
    convs = {k: v for k, v in r.patterns.items() if "CONV_2D+RELU" in k}
    assert sum(convs.values()) == 1, r.patterns
    assert r.patterns["MUL/ADD/SUB folded into weights or bias (BatchNorm, bias add)"] >= 2, r.patterns
    assert r.ops_after <= 3 < r.ops_before, (r.ops_before, r.ops_after)
    assert r.latency_on_ms > 0 and r.latency_off_ms > 0


def test_xla_fuses_elementwise_ops(conv_report):
    r = conv_report["xla"]
    assert r.error is None, r.error
    assert r.ops_after < r.ops_before
    assert any("maximum" in k for k in r.patterns), r.patterns  # the ReLU rides in a fusion


def test_tvm_fuses_conv_bias_relu(conv_report):
    if "tvm" not in [r.runtime for r in conv_report.runtimes]:
        pytest.skip("TVM not installed: pip install 'slimjax[tvm]'")
    r = conv_report["tvm"]
    assert r.error is None, r.error
    assert r.patterns.get("conv2d+add+relu") == 1, r.patterns
    assert r.ops_after < r.ops_before


def test_table_lists_every_runtime(conv_report):
    text = conv_report.table()
    for r in conv_report.runtimes:
        assert text.count(f"\n{r.runtime} ") >= 1, text


def test_ort_folds_batchnorm_and_fuses_relu(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "W": rng.normal(size=(4, 1, 3, 3)),
        "B": np.zeros(4),
        "scale": rng.uniform(0.5, 2, size=4),
        "bias": rng.normal(size=4),
        "mean": rng.normal(size=4),
        "var": rng.uniform(0.5, 2, size=4),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    import onnx

    path = tmp_path / "cbr.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    before, after, patterns, _, _ = ort_fusion(path)
    assert before == 3 and after < before, (before, after, patterns)
    assert patterns["BatchNormalization removed"] == 1, patterns
    assert patterns["Relu removed"] == 1, patterns
    assert any(k.endswith("(Relu)") for k in patterns), patterns  # the conv carries the activation


def test_export_report_has_a_fusion_section(trained_mlp, digits, tmp_path):
    x = digits.x_test.reshape(len(digits.x_test), -1)[:4]
    rep = export(trained_mlp, x, formats=("tflite", "onnx"), out_dir=tmp_path, fusion=True, latency_repeats=1)
    assert [r["runtime"] for r in rep.fusion["runtimes"]] == ["xla", "tflite", "onnxruntime"]
    assert "fusion at batch 4" in rep.table()


def test_artifact_latency_for_tune(trained_mlp, digits, tmp_path):
    x = digits.x_test.reshape(len(digits.x_test), -1)
    ms = artifact_latency(trained_mlp, "tflite", sample=x[:1], batch=4, threads=1, repeats=3)
    assert ms > 0
    rep = export(trained_mlp, x[:2], formats=("onnx",), out_dir=tmp_path, latency_repeats=1)
    assert artifact_latency(rep["onnx_fp32"].path, "onnxruntime", sample=x[:1], batch=2, repeats=3) > 0
    with pytest.raises(ValueError, match="choose from"):
        artifact_latency(trained_mlp, "coreml", sample=x[:1])
    with pytest.raises(ValueError, match="needs sample="):
        artifact_latency(trained_mlp, "tflite")
