"""Every zoo model, trained on digits, exported and run in LiteRT and onnxruntime.

The trained weights are test data (``tests/data/trained/``, made by ``tests/trained_models.py``):
training them here cost minutes of every run, and the weights a seed trains depend on the CPU's
vector ISA, so a borderline int8 agreement passed on one machine and failed on the next.

fp32: TFLite and ONNX within 1e-5 of the output scale of JAX (float32 runtimes reorder sums:
XNNPACK / MLAS accumulate in another order, so bit equality is not available; measured
<= 6e-7 on every model). int8: top-1 agreement with the JAX model >= 99% on the digits test
split (the ViT: lower measured bounds, :data:`INT8_BOUND`) for what each file computes on any
CPU: the TFLite int8 file in LiteRT (32-bit accumulation on every CPU), and its ONNX (Q/DQ) conversion and the TensorRT-ready symmetric Q/DQ
file executed as written (onnxruntime ``ORT_DISABLE_ALL``). onnxruntime's fused int8 kernels
saturate on x86-64 CPUs without VNNI (measured on an emulated AVX2 CPU: symmetric files 0.40-0.98
top-1 agreement), so their figure is recorded (``record_testsuite_property``), not asserted. Every file
has a variable batch dimension (the default route: a fixed-batch trace with the batch dimension
freed). Widths are the zoo's smallest (``TINY_OPTIONS``; ResNet-56 at width 8, see
``tests/trained_models.py``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import trained_models

from research.export import OnnxRunner
from research.export import TFLiteRunner
from research.export import export
from research.export import qdq_summary
from research.nn import list_models

# Trains and exports every hand-designed zoo model (minutes): slow, still run in CI.
pytestmark = pytest.mark.slow

# Models with attention (softmax and activation x activation products in int8).
ATTENTION = {"vit", "attn_gru"}

# The ViT's int16x8 files (int16 activations, int8 weights) are checked here too, on the same trained
# model, instead of training that ViT a second time in tests/research/test_sequence_models.py.
EXTRA_QUANTIZE = {"vit": ("int16x8",)}
# The ViT (no dropout, no BatchNorm: train and eval mode agree) reaches more after its 1500 steps.
MIN_ACCURACY = {"vit": 0.85}

# Top-1 agreement bounds below the 0.99 target, each measured, not a target met. The ViT's symmetric
# Q/DQ file (0.984 on an earlier training, 0.995 on the stored weights): symmetric activation grids
# spend half their levels on the softmax's absent negative values. Its int8 TFLite file (and the ONNX
# file converted from it) is held to 0.99 since its LayerNorms convert as one L2_NORMALIZATION each
# (research.export._trace.L2LayerNorm): stored weights 0.9837 -> 0.9918 TFLite (3 of 368 inputs
# flip, the most 0.99 allows), 0.9946 ONNX as written; over data-order seeds 0-5 (one XLA thread)
# 0.9864-0.9973, mean 0.9923, against 0.9755-0.9946, mean 0.9842, before (experiments/int8_seq/README.md).
# ResNet-56 met 0.99 only on some trainings at the zoo's tiniest width 4 (over data-order seeds 0-7
# on an AVX2-only EPYC: int8 TFLite/ONNX 0.9891-1.0, symmetric Q/DQ 0.9783-1.0); at width 8 the
# same seeds gave >= 0.9918 and >= 0.9891, and its stored weights (seed 0) agree 0.9973, 0.9973, 1.0.
INT8_BOUND = {
    ("vit", "onnx_int8_qdq_symmetric"): 0.98,
}


# The hand-designed zoo. The searchable families (research/nn/families.py) are built from the
# same layers; their smallest members go through export in tests/research/test_families.py, and
# training + exporting each of them here again would add minutes to the suite.
HAND_DESIGNED = [m for m in list_models() if not m.endswith("_family")]


@pytest.fixture(scope="module", params=HAND_DESIGNED)
def zoo(request, digits, tmp_path_factory):
    name = request.param
    key = f"zoo_{name}"
    # Trained weights shipped in tests/data/trained/ (made by tests/trained_models.py; see its docstring).
    model, stored_accuracy = trained_models.load(key, digits)
    recipe = trained_models.recipes()[key]
    x_train = trained_models.inputs(recipe, digits.x_train)
    x_test = trained_models.inputs(recipe, digits.x_test)
    report = export(
        model,
        x_test[:8],
        formats=("tflite", "onnx"),
        out_dir=tmp_path_factory.mktemp(name),
        quantize=("int8", "int8_qdq_symmetric", *EXTRA_QUANTIZE.get(name, ())),
        calibration=x_train[:256],
        eval_data=x_test,
        latency_repeats=1,
    )
    return name, model, report, x_test, stored_accuracy


def test_zoo_model_is_trained(zoo, digits):
    name, model, _, x_test, stored_accuracy = zoo
    acc = float(np.mean(np.asarray(model(x_test)).argmax(-1) == digits.y_test))
    bound = MIN_ACCURACY.get(name, 0.8)
    assert acc >= bound, f"{name} reached only {acc:.3f} test accuracy (< {bound}); int8 agreement is moot"
    # The weights the recipe stored: only near-ties of the logits may round the other way on this CPU.
    assert abs(acc - stored_accuracy) <= 0.01, (name, acc, stored_accuracy)


@pytest.mark.parametrize("artifact", ["tflite_fp32", "onnx_fp32"])
def test_zoo_fp32_matches_jax(zoo, artifact):
    name, _, report, x_test, _ = zoo
    a = report[artifact]
    assert a.max_rel_diff <= 1e-5, (name, a)
    assert a.top1_agreement == 1.0, (name, a)
    assert report.num_checked == 8 + len(x_test) + 1  # sample, test split, a batch of one


def test_zoo_files_have_a_variable_batch_by_the_static_route(zoo):
    name, _, report, x_test, _ = zoo
    for a in report.artifacts:
        # Test-split batches of 8, the remainder and a batch of 1 all ran in the runtime.
        assert {1, 8, len(x_test) % 8} <= set(a.batch_sizes), (name, a.name, a.batch_sizes)
        if a.format == "tflite":
            assert a.extra["batch_route"].startswith("static trace"), (name, a.extra["batch_route"])


@pytest.mark.parametrize("artifact", ["tflite_int8", "onnx_int8", "onnx_int8_qdq_symmetric"])
def test_zoo_int8_top1_agreement(zoo, artifact, record_testsuite_property):
    name, _, report, _, _ = zoo
    a = report[artifact]
    if a.format == "onnx":  # the Q/DQ file executed as written: the same on every CPU
        assert a.reference is not None and a.reference.runtime.endswith("ORT_DISABLE_ALL (Q/DQ executed as written)")
        assert a.reference.top1_agreement >= INT8_BOUND.get((name, artifact), 0.99), (name, a)
    else:  # LiteRT's int8 kernels sum in 32 bits on every CPU
        assert a.reference is None
        assert a.top1_agreement >= INT8_BOUND.get((name, artifact), 0.99), (name, a)
    # onnxruntime's fused int8 kernels on this CPU: recorded, asserted only to be a measurement.
    assert 0.0 <= a.top1_agreement <= 1.0
    record_testsuite_property(f"{name}/{artifact}/runtime_top1", a.top1_agreement)
    if a.reference is not None:
        record_testsuite_property(f"{name}/{artifact}/reference_top1", a.reference.top1_agreement)
    record_testsuite_property("cpu", report.cpu)


def test_zoo_onnx_int8_computes_what_tflite_int8_computes(zoo):
    """tf2onnx's conversion is faithful: executed as written, onnx_int8 gives the TFLite file's outputs
    up to int8 rounding.

    Both files put their logits on the same int8 grid (one output scale and zero point), so every
    difference is a whole number of output steps: the two runtimes round some requantizations
    (residual adds, TFLite's fixed-point rescale against ONNX's float Q/DQ) to the neighbouring
    step, and a step taken early can grow by a few steps through a deep net. How many logits differ
    depends on the trained weights, which differ from CPU to CPU (an AMD EPYC: bit-identical on five
    models, 0.1-0.8% of the logits on the residual ones; an Intel Xeon: 2.6% on ResNet-56, by 1-4
    steps), so the bound is on the size of the differences: less than one step on average, and
    the same argmax on >= 99% of the test split.
    On an x86-64 CPU without VNNI onnxruntime's default (fused) session differs from both
    (saturation; tiny MLP: top-1 0.864 vs 0.997 for the TFLite file), which is what
    ``ArtifactReport.reference`` separates from the file itself.
    """
    name, _, report, x_test, _ = zoo
    y_tfl = TFLiteRunner(report["tflite_int8"].path)(x_test)
    y_onnx = OnnxRunner(report["onnx_int8"].path, optimization="none")(x_test)
    assert np.mean(y_onnx.argmax(-1) == y_tfl.argmax(-1)) >= 0.99, name
    levels = np.unique(np.concatenate([y_tfl.ravel(), y_onnx.ravel()]))
    step = float(np.min(np.diff(levels)))  # the output scale: both files dequantize the same int8 logits
    steps = np.abs(y_onnx.astype(np.float64) - y_tfl) / step
    assert np.allclose(steps, np.round(steps), atol=1e-3), (name, "outputs off the shared int8 grid", step)
    assert np.mean(steps) < 1.0, (name, float(np.mean(steps)), float(np.mean(y_onnx != y_tfl)))


def test_zoo_onnx_files_pass_checker_and_symmetric_qdq(zoo):
    _, _, report, _, _ = zoo
    for a in report.artifacts:
        if a.format == "onnx":
            onnx.checker.check_model(a.path, full_check=True)
    sym = qdq_summary(onnx.load(report["onnx_int8_qdq_symmetric"].path))
    assert sym["tensorrt_symmetric"] and sym["nonzero_zero_points"] == 0, sym
    assert sym["quantize_linear"] >= 1
    assert not report["onnx_int8"].extra["qdq"]["tensorrt_symmetric"]  # TFLite: asymmetric


def test_zoo_int16x8_files(zoo, record_testsuite_property):
    """The files asked for beyond int8 (the ViT's int16x8) exist, and nothing else was written.

    The ViT's 16x8 files keep the token mean's SUM, which int16 activations clip (the export warns):
    0.981-0.997 top-1 agreement over three seeds, asserted at 0.96 and recorded; ONNX opset 21.
    """
    name, _, report, _, _ = zoo
    extra = [a for a in report.artifacts if a.quantize == "int16x8"]
    expected = {f"{fmt}_{q}" for q in EXTRA_QUANTIZE.get(name, ()) for fmt in ("tflite", "onnx")}
    assert {a.name for a in extra} == expected, name
    for a in extra:
        record_testsuite_property(f"{name}_{a.name}_top1_agreement", a.top1_agreement)
        assert a.top1_agreement >= 0.96, (name, a)
        if a.reference is not None:  # the Q/DQ file as written: any CPU
            assert a.reference.top1_agreement >= 0.96, (name, a.reference)
        if a.format == "onnx":
            assert a.extra["opset"] == 21, (name, a.extra)
