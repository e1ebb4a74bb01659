"""Deploying a fake-quant model: int8 TFLite through the deploy hook agrees with what was trained."""

from __future__ import annotations

import numpy as np
import pytest
import trained_models
from flax import nnx

from methods.quantization import QuantRule
from methods.quantization import calibrate
from methods.quantization import deployable
from methods.quantization import quantize_model
from methods.quantization.deploy import DeployedLayer
from research.export import export
from research.export.deploy import as_deployable
from research.export.deploy import deploy_hooks
from research.nn import build_model
from research.nn import find_modules


@pytest.fixture(scope="module")
def qmodel(digits):
    """LeNet-5 trained on digits (the stored ``zoo_lenet5``: 150 Adam steps, tests/trained_models.py;
    stored, not trained here, so every CPU checks the same weights), quantized int8, calibrated."""
    model, _ = trained_models.load("zoo_lenet5", digits)
    q = quantize_model(model, [QuantRule(pattern=".*", bits=8)])
    return calibrate(q, [digits.x_train[:256]])


@pytest.fixture(scope="module")
def int8_report(qmodel, digits, tmp_path_factory):
    return export(
        qmodel,
        digits.x_test[:8],
        formats=("tflite",),
        out_dir=tmp_path_factory.mktemp("deploy"),
        quantize="int8",
        calibration=digits.x_train[:256],
        eval_data=digits.x_test,
        latency_repeats=1,
        batch_polymorphic=False,
    )


def test_deployable_bakes_kernels_and_lists_ranges(qmodel, digits):
    float_model, ranges = deployable(qmodel)
    layers = find_modules(float_model, DeployedLayer)
    assert {p for p, _ in layers} == {"conv1", "conv2", "fc1", "fc2", "head"}
    for path, layer in layers:
        src = nnx.clone(getattr(qmodel, path))
        np.testing.assert_array_equal(np.asarray(layer.layer.kernel[...]), src.quantized_kernel())
        lo, hi = ranges[f"deploy_clip/{path}/clamp"]
        assert lo <= 0.0 < hi
    # Float activations vs fake-quant activations: the same predictions almost everywhere.
    agree = np.mean(np.asarray(float_model(digits.x_test)).argmax(-1) == np.asarray(qmodel(digits.x_test)).argmax(-1))
    assert agree >= 0.99


def test_deploy_hook_is_registered_and_claims_only_fake_quant(qmodel):
    assert "methods.quantization" in deploy_hooks()
    dep = as_deployable(qmodel)
    assert dep is not None and dep.source == "methods.quantization"
    plain = build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    assert as_deployable(plain) is None
    with pytest.raises(ValueError, match="no fake-quant layer"):
        deployable(plain)


def test_int8_tflite_agrees_with_fake_quant_model(int8_report, qmodel, digits):
    a = int8_report["tflite_int8"]
    acc = float(np.mean(np.asarray(qmodel(digits.x_test)).argmax(-1) == digits.y_test))
    assert acc >= 0.9, acc
    assert a.top1_agreement >= 0.99, a
    # Measured: max |logit difference| 5.6% of the largest |logit| (int8 sums, pools, logits).
    assert a.max_rel_diff <= 0.1, a
    assert any("deploy hook" in n for n in int8_report.notes)


def test_int8_tflite_deploys_the_calibrated_ranges(int8_report):
    agreement = int8_report["tflite_int8"].extra["range_agreement"]
    assert len(agreement) == 5
    for pattern, entry in agreement.items():
        assert entry["matches"], f"no TFLite tensor named like {pattern!r}"
        for m in entry["matches"]:
            assert m["rel_err"] <= 0.01, (pattern, m)


def test_fake_quant_graph_fails_without_the_hook(qmodel, digits, tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - the converter's error type varies across TF
        export(
            qmodel,
            digits.x_test[:8],
            formats=("tflite",),
            out_dir=tmp_path,
            quantize="int8",
            calibration=digits.x_train[:64],
            use_deploy_hooks=False,
            latency_repeats=1,
            batch_polymorphic=False,
        )
