"""TVM (Relax) as an export format: parity with JAX on every zoo model, int8 outcome, atomic writes.

fp32: the TVM library compiled from the float32 ONNX file is within 1e-5 of the output scale of
JAX on the digits test split, at the sample batch (8), the split's remainder and a batch of 1
(one library: the batch stays symbolic). int8: the Q/DQ ONNX files compile; TVM computes them in
float on int8-rounded values, which the report's ``extra["int8_compute"]`` states, and the top-1
agreement is recorded (or TVM's exact error, in the notes).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

from research.export import export
from research.export import tvm as tvm_lib
from research.nn import TINY_OPTIONS
from research.nn import build_model
from research.nn import list_models


@pytest.fixture(scope="module", autouse=True)
def _tvm_installed():
    """Skips the module without TVM. Imported when the module runs, not when it is collected: every
    pytest-xdist worker collects every module, and importing TVM takes about 4 s of CPU."""
    pytest.importorskip("tvm", reason="TVM not installed: pip install 'slimjax[tvm]'")


FLAT = {"cnn1d"}
# The whole zoo takes ~2 min here (TFLite + tf2onnx + TVM compile per model; 341 s for all 8 on
# this loaded 2-core machine); the default run covers a dense net, a conv net and a residual
# BatchNorm net. SLIMJAX_TVM_ZOO=all runs every zoo model (all 8 passed when this was written).
DEFAULT_ZOO = ("mlp", "lenet5", "resnet20")
ZOO = list_models() if os.environ.get("SLIMJAX_TVM_ZOO") == "all" else [m for m in list_models() if m in DEFAULT_ZOO]


def _inputs(name, x):
    return x.reshape(len(x), -1) if name in FLAT else x


@pytest.mark.slow  # TFLite + tf2onnx + TVM compile per zoo model
@pytest.mark.parametrize("name", ZOO)
def test_tvm_fp32_parity_on_zoo_model(name, digits, tmp_path):
    x_test = _inputs(name, digits.x_test)
    model = build_model(
        name,
        input_shape=x_test.shape[1:],
        num_classes=digits.num_classes,
        rngs=nnx.Rngs(0),
        **TINY_OPTIONS.get(name, {}),
    )
    # Untrained: fp32 parity does not need margins (a 1e-6 difference flips no argmax of random
    # weights), and compiling a training step would double the test's time.
    report = export(
        model,
        x_test[:8],
        formats=("onnx", "tvm"),
        out_dir=tmp_path,
        eval_data=x_test[:61],
        latency_repeats=1,
    )
    a = report["tvm_fp32"]
    assert a.max_rel_diff <= 1e-5, (name, a)
    assert a.top1_agreement == 1.0, (name, a)
    assert {1, 5, 8} <= set(a.batch_sizes), a.batch_sizes  # sample, remainder of 61, a batch of 1
    assert a.extra["variable_batch"] and a.extra["compile"]["batch"] is None
    assert a.path.endswith("model_fp32_tvm.so") and os.path.getsize(a.path) == a.size_bytes > 0


def test_tvm_int8_outcome_is_recorded(trained_mlp, digits, tmp_path):
    x = digits.x_test.reshape(len(digits.x_test), -1)
    report = export(
        trained_mlp,
        x[:8],
        formats=("onnx", "tvm"),
        out_dir=tmp_path,
        quantize=("int8", "int8_qdq_symmetric"),
        calibration=digits.x_train.reshape(len(digits.x_train), -1)[:256],
        eval_data=x,
        latency_repeats=1,
    )
    names = {a.name for a in report.artifacts}
    for q in ("int8", "int8_qdq_symmetric"):
        if f"tvm_{q}" in names:
            a = report[f"tvm_{q}"]
            # The same Q/DQ graph as the ONNX file, so TVM agrees with JAX about as well as it.
            assert a.top1_agreement >= report[f"onnx_{q}"].top1_agreement - 0.01, a
            compute = a.extra["int8_compute"]
            assert compute["ops"]["relax.dequantize"] >= 1
            assert compute["int8_matmul_or_conv"] + compute["float_matmul_or_conv"] >= 2
        else:
            assert any(n.startswith(f"tvm_{q}: TVM could not compile") for n in report.notes), report.notes


def test_tvm_library_write_is_atomic(trained_mlp, tmp_path):
    x = np.zeros((4, 64), np.float32)
    rep = export(trained_mlp, x, formats=("onnx",), out_dir=tmp_path, latency_repeats=1)
    onnx_path = rep["onnx_fp32"].path
    lib = tmp_path / "model_fp32_tvm.so"
    tvm_lib.export_tvm(onnx_path, lib, verify_input=x)
    good = lib.read_bytes()
    y = tvm_lib.TVMRunner(lib)(x)
    np.testing.assert_allclose(y, np.asarray(trained_mlp(x)), rtol=1e-5, atol=1e-5)
    # A library that fails its check (wrong input width) never replaces the good one.
    with pytest.raises(Exception):  # noqa: B017, PT011 - TVM raises its own error types
        tvm_lib.export_tvm(onnx_path, lib, verify_input=np.zeros((4, 65), np.float32))
    assert lib.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_tvm_format_errors(trained_mlp, tmp_path):
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="'tvm' compiles the ONNX artifacts; add 'onnx'"):
        export(trained_mlp, x, formats=("tvm",), out_dir=tmp_path)
    with pytest.raises(ValueError, match="choose from"):
        export(trained_mlp, x, formats=("tvmm",), out_dir=tmp_path)
    with pytest.raises(ValueError, match="tuning_trials=-1 must be >= 0"):
        tvm_lib.compile_onnx("unused.onnx", tuning_trials=-1)


def test_host_target_names_this_cpu():
    target = tvm_lib.host_target()
    assert target.kind.name == "llvm"
    cpu = tvm_lib.host_cpu()
    assert target.attrs.get("mcpu", "generic") == cpu
