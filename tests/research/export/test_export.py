"""End-to-end export tests: every artifact is run in its real runtime against JAX."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib

import chex
import jax
import numpy as np
import pytest
from export_test_models import SmallMLP
from export_test_models import Unsupported
from flax import nnx

from research.export import OnnxRunner
from research.export import TFLiteRunner
from research.export import UnsupportedOpError
from research.export import export
from research.export import inference_fn
from research.export import load_stablehlo
from research.export import qdq_summary
from research.export import to_tflite
from research.export._io import check_export_set
from research.export.onnx_export import check_onnx
from research.export.onnx_export import fused_int8_saturates

ALL_Q = ("fp16", "dynamic_int8", "int8")


@pytest.fixture(scope="module")
def cnn_report(convnet, tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    cal = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    out = tmp_path_factory.mktemp("cnn")
    report = export(
        convnet,
        x,
        out_dir=out,
        quantize=ALL_Q,
        calibration=cal,
        eval_data=cal[:32],
        activation_ranges={r"^max": (0.0, 4.0)},
        latency_repeats=5,
    )
    return report, x


@pytest.fixture(scope="module")
def mlp_report(trained_mlp, digits, tmp_path_factory):
    x_test = digits.x_test.reshape(len(digits.x_test), -1)
    report = export(
        trained_mlp,
        x_test[:16],
        formats=("tflite", "onnx"),
        out_dir=tmp_path_factory.mktemp("mlp"),
        quantize=("int8", "int8_dense_per_tensor", "int8_qdq_reduce_range"),
        calibration=digits.x_train.reshape(len(digits.x_train), -1)[:256],
        eval_data=x_test,
        latency_repeats=5,
    )
    return report, x_test


def test_writes_every_artifact(cnn_report):
    report, _ = cnn_report
    names = {a.name for a in report.artifacts}
    assert names == {
        "stablehlo",
        "tflite_fp32",
        "tflite_fp16",
        "tflite_dynamic_int8",
        "tflite_int8",
        "onnx_fp32",
        "onnx_int8",
    }
    for a in report.artifacts:
        assert os.path.getsize(a.path) == a.size_bytes > 0
        assert 0 < a.gzip_bytes
        assert a.latency_ms > 0
    assert report.jax_latency_ms > 0
    assert not [f for f in os.listdir(report.out_dir) if f.endswith(".tmp")]


@pytest.mark.parametrize("name", ["stablehlo", "tflite_fp32", "onnx_fp32"])
def test_fp32_artifacts_match_jax(cnn_report, name):
    report, _ = cnn_report
    a = report[name]
    # Float32 runtimes reorder sums (XNNPACK, MLAS); 1e-5 of the output scale is the bound.
    assert a.max_rel_diff <= 1e-5, a
    assert a.top1_agreement == 1.0


@pytest.mark.parametrize(
    "name,rel_bound", [("tflite_fp16", 5e-3), ("tflite_dynamic_int8", 5e-2), ("tflite_int8", 1e-1)]
)
def test_quantized_artifacts_are_close(cnn_report, name, rel_bound):
    report, _ = cnn_report
    assert report[name].max_rel_diff <= rel_bound, report[name]
    assert report[name].size_bytes < report["tflite_fp32"].size_bytes


def test_onnx_int8_has_qdq_nodes_and_passes_checker(cnn_report):
    report, _ = cnn_report
    a = report["onnx_int8"]
    check_onnx(a.path)
    import onnx

    summary = qdq_summary(onnx.load(a.path))
    assert summary == a.extra["qdq"]
    assert summary["quantize_linear"] >= 1
    assert summary["dequantize_linear"] >= 3  # input, conv weights, dense weights at least
    assert qdq_summary(onnx.load(report["onnx_fp32"].path))["quantize_linear"] == 0
    # The ONNX graph reproduces the int8 TFLite numerics, not the float ones: executed as written
    # on any CPU, and in onnxruntime's fused int8 kernels where they do not saturate (VNNI, ARM).
    tfl = report["tflite_int8"].max_abs_diff
    assert a.reference.max_abs_diff == pytest.approx(tfl, rel=0.1, abs=1e-3)
    if not fused_int8_saturates():
        assert a.max_abs_diff == pytest.approx(tfl, rel=0.1, abs=1e-3)


def test_stablehlo_manifest(cnn_report):
    report, _ = cnn_report
    a = report["stablehlo"]
    with open(a.path + ".json") as f:
        info = json.load(f)
    assert info == a.extra["manifest"]
    assert info["jax_version"] == jax.__version__
    assert info["inputs"] == [{"shape": ["b", 8, 8, 1], "dtype": "float32"}]
    assert info["outputs"] == [{"shape": ["b", 10], "dtype": "float32"}]
    exported = dt.date.fromisoformat(info["exported_on"])
    assert dt.date.fromisoformat(info["loadable_until"]) - exported == dt.timedelta(days=182)


@pytest.mark.parametrize("batch", [2, 7])
@pytest.mark.parametrize("name", ["stablehlo", "tflite_fp32", "onnx_fp32", "tflite_int8"])
def test_variable_batch(cnn_report, convnet, batch, name):
    report, _ = cnn_report
    path = report[name].path
    runners = {
        "stablehlo": lambda p: lambda x: np.asarray(load_stablehlo(p)(x)),
        "tflite": TFLiteRunner,
        "onnx": OnnxRunner,
    }
    run = runners[report[name].format](path)
    x = np.random.default_rng(batch).normal(size=(batch, 8, 8, 1)).astype(np.float32)
    convnet_eval = nnx.clone(convnet)
    convnet_eval.eval()
    ref = np.asarray(convnet_eval(x))
    y = run(x)
    chex.assert_shape(y, (batch, 10))
    tol = 1e-4 if report[name].quantize == "fp32" else 0.2
    np.testing.assert_allclose(y, ref, atol=tol * np.abs(ref).max())


def test_export_leaves_model_in_train_mode(cnn_report, convnet):
    assert convnet.bn.use_running_average is False


def test_report_table_and_dict(cnn_report):
    report, _ = cnn_report
    table = report.table()
    for a in report.artifacts:
        assert a.name in table
    assert "jax (jit)" in table
    d = json.loads(json.dumps(report.to_dict(), default=str))
    assert len(d["artifacts"]) == len(report.artifacts)
    assert report.num_checked == 4 + 32 + 1  # sample, eval data, second batch size
    assert report["tflite_fp32"].batch_sizes == (1, 4)


def test_activation_range_agreement(cnn_report):
    report, _ = cnn_report
    agreement = report["tflite_int8"].extra["range_agreement"][r"^max"]
    assert agreement["learned"] == [0.0, 4.0]
    assert agreement["matches"], "the ReLU output tensors should match '^max'"
    for m in agreement["matches"]:
        lo, hi = m["deployed"]
        assert lo == pytest.approx(0.0, abs=1e-6)  # ReLU output: calibrated range starts at 0
        assert m["rel_err"] == pytest.approx(abs(hi - 4.0) / 4.0)


def test_int8_top1_agreement_on_digits(mlp_report, trained_mlp, digits):
    report, x_test = mlp_report
    acc = float(np.mean(np.asarray(trained_mlp(x_test)).argmax(-1) == digits.y_test))
    assert acc > 0.9, f"test MLP only reached {acc:.3f}"
    for name in ("tflite_int8", "tflite_int8_dense_per_tensor"):
        assert report[name].top1_agreement >= 0.99, report[name]
    for name in ("onnx_int8", "onnx_int8_dense_per_tensor"):  # Q/DQ executed as written: any CPU
        assert report[name].reference.top1_agreement >= 0.99, report[name]
        if not fused_int8_saturates():  # onnxruntime's fused int8 kernels: VNNI, ARM
            assert report[name].top1_agreement >= 0.99, report[name]
    assert report["tflite_fp32"].top1_agreement == 1.0
    # 4.7k weights: int8 is 12.3 KB vs 24.9 KB fp32; ~7 KB is graph (shape ops for the variable
    # batch), so the ratio only approaches 0.25 for larger models (see the benchmark).
    assert report["tflite_int8"].size_bytes <= 0.55 * report["tflite_fp32"].size_bytes


def test_reduce_range_file_has_7bit_weights(mlp_report):
    import onnx
    from onnx import numpy_helper

    report, _ = mlp_report
    a = report["onnx_int8_qdq_reduce_range"]
    proto = onnx.load(a.path)
    kernels = [
        numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    ]
    assert len(kernels) == 2 and max(int(np.abs(k.astype(np.int32)).max()) for k in kernels) <= 64
    assert a.extra["qdq"]["tensorrt_symmetric"] and a.extra["from"] == "model_fp32.onnx"
    assert a.reference is not None and a.reference.top1_agreement >= 0.99, a


def test_agreement_below_threshold_warns_on_the_console(tmp_path, trained_mlp):
    from research.export.report import ExportAgreementWarning

    x = np.ones((2, 64), np.float32)
    with pytest.warns(
        ExportAgreementWarning, match=r"tflite_fp32: top-1 agreement with JAX 1.000 < 1.01; likely cause"
    ):
        rep = export(trained_mlp, x, formats=("tflite",), out_dir=tmp_path, latency_repeats=1, min_top1_agreement=1.01)
    assert len(rep.warnings) == 1 and f"WARNING: {rep.warnings[0]}" in rep.table()


def _kernel_scales(path) -> dict[int, list[int]]:
    """Number of quantization scales of each int8 constant kernel, by rank (2: dense, 4: conv)."""
    from tensorflow.lite.tools import flatbuffer_utils

    m = flatbuffer_utils.read_model(str(path))
    out: dict[int, list[int]] = {}
    for t in m.subgraphs[0].tensors:
        data = m.buffers[t.buffer].data
        # INT8 (type 9) constants of rank 2 or 4 that are not per-channel vectors (biases and
        # BatchNorm constants have shape (1, ..., 1, C)).
        kernel = len(t.shape) in (2, 4) and int(np.prod(t.shape[:-1])) > 1
        if data is not None and len(data) and t.type == 9 and kernel:
            out.setdefault(len(t.shape), []).append(len(t.quantization.scale))
    return out


def test_dense_per_tensor_mode_has_one_scale_per_dense_kernel(mlp_report):
    report, _ = mlp_report
    per_channel = _kernel_scales(report["tflite_int8"].path)
    per_tensor = _kernel_scales(report["tflite_int8_dense_per_tensor"].path)
    assert sorted(per_channel[2]) == [10, 64], per_channel  # one scale per output channel
    assert per_tensor[2] == [1, 1], per_tensor
    # Per channel, each of the 74 output channels has a float32 scale and an int64 zero point for
    # its kernel and again for its fused int32 bias; per tensor, each kernel and bias has one.
    a = report["tflite_int8"].extra["size_breakdown"]
    b = report["tflite_int8_dense_per_tensor"].extra["size_breakdown"]
    assert a["quant_vectors"] - b["quant_vectors"] == (74 - 2) * 24
    assert report["tflite_int8_dense_per_tensor"].size_bytes < report["tflite_int8"].size_bytes - 800


def test_dense_per_tensor_mode_keeps_convolutions_per_channel(convnet, tmp_path):
    rng = np.random.default_rng(0)
    cal = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    blob = to_tflite(inference_fn(convnet), cal[:1], quantize="int8_dense_per_tensor", calibration=cal)
    path = tmp_path / "m.tflite"
    path.write_bytes(blob)
    scales = _kernel_scales(path)
    assert scales == {4: [8], 2: [1]}, scales


def test_per_tensor_mode_has_one_scale_per_kernel(convnet, tmp_path):
    cal = np.random.default_rng(1).normal(size=(64, 8, 8, 1)).astype(np.float32)
    sizes = {}
    for q in ("int8", "int8_per_tensor"):
        path = tmp_path / f"{q}.tflite"
        path.write_bytes(to_tflite(inference_fn(convnet), cal[:2], quantize=q, calibration=cal))
        sizes[q] = path.stat().st_size
        scales = _kernel_scales(path)
        # per output channel: conv 8, head 10; per tensor: one each
        assert scales == ({4: [8], 2: [10]} if q == "int8" else {4: [1], 2: [1]}), (q, scales)
    assert sizes["int8_per_tensor"] < sizes["int8"]


def test_size_breakdown_adds_up(mlp_report, trained_mlp):
    report, _ = mlp_report
    params = sum(np.asarray(v).size for v in jax.tree.leaves(nnx.state(trained_mlp, nnx.Param)))
    f32 = report["tflite_fp32"].extra["size_breakdown"]
    i8 = report["tflite_int8"].extra["size_breakdown"]
    for parts, art in ((f32, "tflite_fp32"), (i8, "tflite_int8")):
        assert parts["total"] == report[art].size_bytes
        assert parts["constants"] + parts["quant_vectors"] + parts["other"] == parts["total"]
    assert f32["quant_vectors"] == 0 and f32["quant_entries"] == 0
    assert 4 * params <= f32["constants"] < 4 * params + 512  # the weights plus shape constants
    assert params <= i8["constants"] < 2 * params  # int8 kernels, int32 biases
    assert i8["quant_entries"] >= 64 + 10  # per-channel kernels, plus per-tensor activations


def test_masked_model_reports_compressed_size(tmp_path):
    model = SmallMLP(128, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    for layer in (model.fc1, model.fc2):
        w = np.asarray(layer.kernel[...])
        layer.kernel[...] = np.where(rng.uniform(size=w.shape) < 0.9, 0.0, w).astype(w.dtype)
    x = rng.normal(size=(2, 64)).astype(np.float32)
    report = export(model, x, formats=("tflite",), out_dir=tmp_path, latency_repeats=2)
    assert report.param_zero_fraction == pytest.approx(0.9, abs=0.02)
    a = report["tflite_fp32"]
    assert a.gzip_bytes < 0.45 * a.size_bytes, a
    assert "gzip" in report.table()


def test_unsupported_op_names_primitive_and_layer(tmp_path, trained_mlp):
    x = np.ones((2, 64), np.float32)
    good = export(trained_mlp, x, formats=("tflite",), out_dir=tmp_path, latency_repeats=2)
    path = good["tflite_fp32"].path
    before = pathlib.Path(path).read_bytes()
    with pytest.raises(UnsupportedOpError) as err:
        export(Unsupported(rngs=nnx.Rngs(0)), x, formats=("tflite",), out_dir=tmp_path)
    e = err.value
    assert e.primitive == "sort"
    assert e.layer_paths == ("block",)
    assert "'sort'" in str(e) and "'block'" in str(e)
    assert e.location.startswith(os.path.join(os.path.dirname(__file__), "export_test_models.py"))
    assert pathlib.Path(path).read_bytes() == before  # the good artifact survives
    assert sorted(os.listdir(tmp_path)) == ["model.export.json", "model_fp32.tflite"]
    assert "drop 'tflite' from formats" in str(e)


def _snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(directory).iterdir())}


def test_failed_export_leaves_the_previous_set_intact(tmp_path, trained_mlp):
    x = np.ones((2, 64), np.float32)
    export(trained_mlp, x, out_dir=tmp_path, latency_repeats=1)
    before = _snapshot(tmp_path)
    assert set(before) == {
        "model.export.json",
        "model.stablehlo",
        "model.stablehlo.json",
        "model_fp32.tflite",
        "model_fp32.onnx",
    }
    # StableHLO converts the sort, TFLite does not: the new model.stablehlo must not replace the old one.
    with pytest.raises(UnsupportedOpError) as err:
        export(Unsupported(rngs=nnx.Rngs(0)), x, out_dir=tmp_path, latency_repeats=1)
    assert "drop 'tflite' and 'onnx' from formats" in str(err.value)
    assert any("fp32 TFLite conversion" in n and "previous export set" in n for n in err.value.__notes__)
    assert _snapshot(tmp_path) == before  # same files, same bytes; no staging directory left
    assert set(check_export_set(tmp_path)["files"]) == set(before) - {"model.export.json"}


def test_onnx_only_failure_names_onnx(tmp_path):
    with pytest.raises(UnsupportedOpError) as err:
        export(Unsupported(rngs=nnx.Rngs(0)), np.ones((2, 64), np.float32), formats=("onnx",), out_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith("onnx export failed: JAX primitive 'sort' in layer 'block'"), msg
    assert "not supported by the tflite converter, which the onnx export goes through" in msg
    assert "drop 'onnx' from formats" in msg and "'tflite' from" not in msg
    assert err.value.target == "onnx" and err.value.drop == ("onnx",)
    assert os.listdir(tmp_path) == []


def test_failing_artifact_is_named_and_nothing_moves(tmp_path, trained_mlp, monkeypatch):
    from research.export import onnx_export

    x = np.ones((2, 64), np.float32)
    export(trained_mlp, x, formats=("stablehlo", "tflite"), out_dir=tmp_path, latency_repeats=1)
    before = _snapshot(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("tf2onnx crashed")

    monkeypatch.setattr(onnx_export, "tflite_to_onnx", broken)
    with pytest.raises(RuntimeError, match="tf2onnx crashed") as err:
        export(trained_mlp, x, out_dir=tmp_path, latency_repeats=1)
    assert any("model_fp32.onnx (onnx_fp32" in n for n in err.value.__notes__), err.value.__notes__
    assert _snapshot(tmp_path) == before


def test_a_new_set_replaces_the_old_one_and_keeps_other_files(tmp_path, trained_mlp):
    x = np.ones((2, 64), np.float32)
    export(trained_mlp, x, formats=("stablehlo", "tflite"), out_dir=tmp_path, latency_repeats=1)
    (tmp_path / "notes.txt").write_text("mine")
    rep = export(trained_mlp, x, formats=("stablehlo",), out_dir=tmp_path, latency_repeats=1)
    # The old TFLite file belonged to the previous set: a mixed set would pair it with the new StableHLO.
    assert sorted(os.listdir(tmp_path)) == ["model.export.json", "model.stablehlo", "model.stablehlo.json", "notes.txt"]
    assert rep["stablehlo"].path == str(tmp_path / "model.stablehlo")
    manifest = check_export_set(tmp_path)
    assert manifest["formats"] == ["stablehlo"] and set(manifest["files"]) == {
        "model.stablehlo",
        "model.stablehlo.json",
    }
    (tmp_path / "model.stablehlo").write_bytes(b"changed")
    with pytest.raises(ValueError, match="model.stablehlo is not the file the export"):
        check_export_set(tmp_path)


def test_int8_without_calibration_fails_with_fix(tmp_path, trained_mlp):
    with pytest.raises(ValueError, match="calibration="):
        export(trained_mlp, np.ones((2, 64), np.float32), out_dir=tmp_path, quantize="int8")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"formats": ("tflite", "coreml")}, "coreml"),
        ({"quantize": "int4"}, "int4"),
    ],
)
def test_bad_arguments(tmp_path, trained_mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export(trained_mlp, np.ones((2, 64), np.float32), out_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("preprocess", [True, False])
def test_symmetric_qdq_runs_onnxruntime_preprocessing(cnn_report, tmp_path, caplog, preprocess):
    from research.export.onnx_export import quantize_qdq_symmetric

    report, x = cnn_report
    cal = np.random.default_rng(3).normal(size=(32, *x.shape[1:])).astype(np.float32)
    with caplog.at_level("WARNING"):
        proto = quantize_qdq_symmetric(report["onnx_fp32"].path, tmp_path / "q.onnx", cal, preprocess=preprocess)
    # onnxruntime logs this advice when a model was not pre-processed (shape inference + optimisation).
    advised = any("pre-processing before quantization" in r.getMessage() for r in caplog.records)
    assert advised is not preprocess
    assert qdq_summary(proto)["tensorrt_symmetric"]
    # The int8 file still computes the float model's function (coarsely: int8 weights and activations),
    # executed as written on any CPU, and in onnxruntime's fused int8 kernels where they do not saturate.
    ref = OnnxRunner(report["onnx_fp32"].path)(x)
    atol = 0.2 * float(np.abs(ref).max())
    np.testing.assert_allclose(OnnxRunner(tmp_path / "q.onnx", optimization="none")(x), ref, atol=atol)
    if not fused_int8_saturates():
        np.testing.assert_allclose(OnnxRunner(tmp_path / "q.onnx")(x), ref, atol=atol)


def _spy(fn):
    """``fn`` that records the batch size of every call."""
    seen = []

    def run(x):
        seen.append(int(np.shape(x)[0]))
        return fn(x)

    return run, seen


def test_jax_references_run_at_the_sample_batch_only_and_equal_direct_calls(convnet):
    from research.export.api import _jax_outputs

    rng = np.random.default_rng(1)
    sample = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    inputs = [sample, rng.normal(size=(4, 8, 8, 1)).astype(np.float32), sample[:3], sample[:1]]
    fn = jax.jit(inference_fn(convnet))
    run, seen = _spy(fn)
    got = _jax_outputs(run, inputs, sample, row_independent=True)
    assert set(seen) == {4}  # the remainder (3) and the batch of one ran in sample-sized pieces
    for x, y in zip(inputs, got, strict=True):
        assert y.shape == (len(x), 10)
        np.testing.assert_allclose(y, np.asarray(fn(x)), rtol=1e-5, atol=1e-6)


def test_jax_references_of_a_plain_callable_or_a_non_batch_output_are_direct_calls():
    from research.export.api import _jax_outputs

    sample = np.ones((4, 3), np.float32)
    inputs = [sample, sample[:1]]
    run, seen = _spy(lambda x: x.sum(0))  # mixes rows: only a direct call is right
    got = _jax_outputs(run, inputs, sample, row_independent=False)
    assert seen == [4, 1] and [g.tolist() for g in got] == [[4.0] * 3, [1.0] * 3]
    run, seen = _spy(lambda x: x.sum())  # scalar output: no batch axis to cut pieces from
    got = _jax_outputs(run, inputs, sample, row_independent=True)
    assert [float(g) for g in got] == [12.0, 3.0] and seen[-2:] == [4, 1]
