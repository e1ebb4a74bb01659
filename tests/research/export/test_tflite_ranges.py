"""Activation ranges of int8 TFLite files chosen from the calibration distribution (percentile, MSE).

A per-token MLP over 64 tokens sees, in its calibration data, one token 40 times larger than the
rest: with the converter's min/max the whole int8 grid stretches to it and every ordinary input
gets a coarse grid; the 99.99th percentile ignores those few values (under 0.01 % of each tensor).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from research.export import TFLiteRunner
from research.export import export
from research.export import inference_fn
from research.export import to_tflite
from research.export.tflite_ranges import activation_calibrations
from research.export.tflite_ranges import mse_range
from research.export.tflite_ranges import percentile_range

TOKENS = 64


def _model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(6, 32, rngs=rngs)
            self.fc2 = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):  # (B, TOKENS, 6) -> (B, TOKENS, 4)
            return self.fc2(nnx.relu(self.fc1(x)))

    model = Net(nnx.Rngs(0))
    model.eval()
    return model


def _data():
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(256, TOKENS, 6)).astype(np.float32)
    calibration[5, 3] *= 40.0  # one token stretches every min/max range
    test = rng.normal(size=(64, TOKENS, 6)).astype(np.float32)
    return calibration, test


def _scales(blob):
    return {
        d["name"]: d["quantization"][0]
        for d in TFLiteRunner(blob).tensor_details()
        if d["dtype"] == np.int8 and d["quantization"][0] > 1e-6 and d["shape"].size == 3
    }


def test_range_rules_clip_a_rare_outlier_and_never_widen():
    v = np.random.default_rng(1).normal(size=100_000)
    v[0] = 60.0
    lo, hi = float(v.min()), float(v.max())
    p_lo, p_hi = percentile_range(v, lo, hi)
    assert lo <= p_lo < -3.0 and 3.0 < p_hi < 5.0  # 99.99 % of a normal: about +-3.9
    t = np.random.default_rng(2).standard_t(3, size=100_000)  # heavy tails: clipping pays
    lo, hi = float(t.min()), float(t.max())
    m_lo, m_hi = mse_range(t, lo, hi)
    assert lo < m_lo < 0.0 < m_hi < hi

    def rounding_mse(a, b):
        step = (b - a) / 255
        return np.mean((np.clip(np.round((t - a) / step), 0, 255) * step + a - t) ** 2)

    assert rounding_mse(m_lo, m_hi) < 0.9 * rounding_mse(lo, hi)  # measured 0.81
    u = np.linspace(-1.0, 1.0, 10_001)  # uniform: the full range has the least error
    assert mse_range(u, -1.0, 1.0) == pytest.approx((-1.0, 1.0))
    assert activation_calibrations() == ("minmax", "mse", "percentile")


def test_int8_file_with_percentile_and_mse_ranges_is_finer_and_closer_to_jax():
    model, (calibration, test) = _model(), _data()
    ref = np.asarray(model(test))
    errors, scales = {}, {}
    for rule in ("minmax", "percentile", "mse"):
        blob = to_tflite(
            inference_fn(model), test[:8], quantize="int8", calibration=calibration, activation_calibration=rule
        )
        errors[rule] = float(np.sqrt(np.mean((TFLiteRunner(blob)(test) - ref) ** 2)))
        scales[rule] = _scales(blob)
    for rule in ("percentile", "mse"):  # never wider than the converter's range
        shared = set(scales[rule]) & set(scales["minmax"])
        assert len(shared) >= 3, scales
        assert all(scales[rule][n] <= scales["minmax"][n] * (1 + 1e-6) for n in shared), (rule, scales)
    # the percentile ignores the outlier token: every activation's grid at least 4x finer
    shared = set(scales["percentile"]) & set(scales["minmax"])
    assert max(scales["percentile"][n] / scales["minmax"][n] for n in shared) < 0.25, scales
    assert errors["percentile"] < 0.5 * errors["minmax"], errors


def test_export_reports_the_rule_and_refuses_bad_requests(tmp_path):
    model, (calibration, test) = _model(), _data()
    rep = export(
        model,
        test[:8],
        formats=("tflite",),
        out_dir=tmp_path,
        quantize=("int8", "int8_per_tensor"),
        calibration=calibration,
        eval_data=test,
        activation_calibration="percentile",
        latency_repeats=1,
    )
    assert rep["tflite_int8"].extra["activation_calibration"] == "percentile"
    assert rep["tflite_int8_per_tensor"].extra["activation_calibration"] == "percentile"
    assert "activation_calibration" not in rep["tflite_fp32"].extra
    plain = export(
        model,
        test[:8],
        formats=("tflite",),
        out_dir=tmp_path / "minmax",
        quantize="int8",
        calibration=calibration,
        eval_data=test,
        latency_repeats=1,
    )
    assert plain["tflite_int8"].extra["activation_calibration"] == "minmax"
    assert rep["tflite_int8"].max_abs_diff < plain["tflite_int8"].max_abs_diff
    with pytest.raises(ValueError, match=r"activation_calibration='percentil'.*percentile"):
        export(
            model,
            test[:8],
            formats=("tflite",),
            out_dir=tmp_path,
            quantize="int8",
            calibration=calibration,
            activation_calibration="percentil",
        )
    with pytest.raises(ValueError, match=r"activation_calibration='mse'.*has none.*quantize='int8'"):
        export(model, test[:8], formats=("tflite",), out_dir=tmp_path, quantize="fp16", activation_calibration="mse")


def test_export_stage_validates_the_rule_before_training():
    from research import config as C
    from research.export.stage import ExportStage

    base = C.Config(name="ranges", model=C.ModelConfig(name="mlp"), data=C.DataConfig(name="digits"))
    tflite = {"formats": ("tflite",)}
    C.validate(
        dataclasses.replace(
            base, stages=(ExportStage(**tflite, quantize=("int8",), activation_calibration="percentile"),)
        )
    )
    for quantize, rule, match in [
        (("int8",), "mes", r"activation_calibration.*'mse'"),
        (("fp16",), "mse", r"quantize=\['fp16'\] has none; add one to quantize \(e.g. quantize='int8'\)"),
    ]:
        stage = ExportStage(**tflite, quantize=quantize, activation_calibration=rule)
        with pytest.raises(C.ConfigError, match=match):
            C.validate(dataclasses.replace(base, stages=(stage,)))


def test_export_stage_validates_the_int8_layernorm_form_before_training():
    from research import config as C
    from research.export.stage import ExportStage

    base = C.Config(name="forms", model=C.ModelConfig(name="mlp"), data=C.DataConfig(name="digits"))
    for formats in (("tflite",), ("onnx",)):  # the ONNX files are the TFLite conversion's: it applies
        C.validate(
            dataclasses.replace(
                base, stages=(ExportStage(formats=formats, quantize=("int8",), int8_layernorm="as_is"),)
            )
        )
    for stage, match in [
        (ExportStage(formats=("tflite",), int8_layernorm="l2"), r"int8_layernorm.*'l2'.*l2_normalization"),
        (
            ExportStage(formats=("stablehlo",), int8_layernorm="as_is"),
            r"formats=\['stablehlo'\] neither has 'tflite' nor is converted through it; add 'tflite' or 'onnx'",
        ),
    ]:
        with pytest.raises(C.ConfigError, match=match):
            C.validate(dataclasses.replace(base, stages=(stage,)))


@pytest.mark.parametrize(
    "formats, passed", [(("onnx",), {"tflite": {"int8_layernorm": "as_is"}}), (("stablehlo",), None)]
)
def test_export_stage_passes_the_int8_layernorm_form_to_the_tflite_conversion(formats, passed, monkeypatch, digits):
    from research.export import stage

    seen = {}
    monkeypatch.setattr(stage, "export", lambda *a, **kw: seen.update(kw))
    stage.export_bundle(None, digits, "unused", formats=formats, int8_layernorm="as_is")
    assert seen["format_options"] == passed  # ONNX alone is converted through TFLite: the form applies


def test_symmetric_qdq_onnx_files_take_the_percentile_rule_through_onnxruntime(tmp_path):
    from research import config as C
    from research.export.onnx_export import quantize_qdq_symmetric
    from research.export.stage import ExportStage

    model, (calibration, test) = _model(), _data()
    kw = dict(formats=("onnx",), calibration=calibration, eval_data=test, latency_repeats=1)
    reports = {
        rule: export(
            model, test[:8], out_dir=tmp_path / rule, quantize="int8_qdq_symmetric", activation_calibration=rule, **kw
        )
        for rule in ("minmax", "percentile")
    }
    reps = {rule: report["onnx_int8_qdq_symmetric"] for rule, report in reports.items()}
    assert {r: a.extra["activation_calibration"] for r, a in reps.items()} == {r: r for r in reps}
    # The outlier token stretches every min/max range; the files executed as written (any CPU) show it
    # (here max abs differences 0.343 against 1.058).
    assert reps["percentile"].reference.max_abs_diff < 0.5 * reps["minmax"].reference.max_abs_diff, reps
    # MSE has no onnxruntime calibrator: refused when only these modes would use it, min/max beside int8.
    with pytest.raises(ValueError, match=r"activation_calibration='mse'.*has none"):
        export(
            model, test[:8], out_dir=tmp_path / "x", quantize="int8_qdq_symmetric", activation_calibration="mse", **kw
        )
    both = export(
        model,
        test[:8],
        out_dir=tmp_path / "mse",
        quantize=("int8", "int8_qdq_symmetric"),
        activation_calibration="mse",
        **kw,
    )
    assert (
        both["onnx_int8"].extra.get("opset")
        and both["onnx_int8_qdq_symmetric"].extra["activation_calibration"] == "minmax"
    )
    with pytest.raises(ValueError, match=r"activation_calibration='mse'.*calibrates with \['minmax', 'percentile'\]"):
        fp32 = reports["minmax"]["onnx_fp32"].path
        quantize_qdq_symmetric(fp32, tmp_path / "q.onnx", calibration, activation_calibration="mse")
    base = C.Config(name="ranges", model=C.ModelConfig(name="mlp"), data=C.DataConfig(name="digits"))
    onnx_only = {"formats": ("onnx",), "quantize": ("int8_qdq_symmetric",)}
    C.validate(dataclasses.replace(base, stages=(ExportStage(**onnx_only, activation_calibration="percentile"),)))
    with pytest.raises(C.ConfigError, match=r"activation_calibration='mse'.*has none"):
        C.validate(dataclasses.replace(base, stages=(ExportStage(**onnx_only, activation_calibration="mse"),)))


def test_calibration_batches_cover_every_sample_at_the_static_batch():
    from research.export.tflite import STATIC_TRACE_BATCH
    from research.export.tflite import calibration_batches

    data = np.arange(3 * STATIC_TRACE_BATCH + 4, dtype=np.float32)[:, None]  # 4 past the last full batch
    batches = [b for (b,) in calibration_batches(data, STATIC_TRACE_BATCH)()]
    assert {b.shape for b in batches} == {(STATIC_TRACE_BATCH, 1)} and len(batches) == 4
    seen = np.concatenate(batches)[:, 0]
    assert set(seen) == set(data[:, 0])  # the remainder too (an outlier there sets the range)
    np.testing.assert_array_equal(seen[-STATIC_TRACE_BATCH:], [*data[-4:, 0], *data[:3, 0]])
    assert len([*calibration_batches(data[:14], STATIC_TRACE_BATCH)()]) == 2  # divisible: nothing repeated
    assert len([*calibration_batches(data, 8, max_samples=16)()]) == 2
    with pytest.raises(ValueError, match="6 samples, fewer than one batch of 7; pass at least 7"):
        calibration_batches(data[:6], STATIC_TRACE_BATCH)
