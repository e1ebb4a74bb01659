"""CPU-independent checks of int8 files: reference agreement, the CPU's int8 ISA, and warnings.

onnxruntime's fused int8 kernels saturate on x86-64 CPUs without VNNI, so what they compute
depends on the machine; these tests assert only what does not: the file executed as written
(``ORT_DISABLE_ALL``, LiteRT's reference kernels), onnxruntime's non-saturating
``session.x64quantprecision`` mode, the ISA parser and the warning logic. The fused figure is
recorded, and asserted only to be what :func:`fused_int8_saturates` measured on this machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from research.export import OnnxRunner
from research.export.cpu import CpuInt8
from research.export.cpu import cpu_int8
from research.export.cpu import parse_cpuinfo
from research.export.onnx_export import fused_int8_saturates
from research.export.onnx_export import saturation_probe
from research.export.report import Agreement
from research.export.report import ArtifactReport
from research.export.report import ExportReport
from research.export.report import agreement_warnings

AVX2 = CpuInt8("x86-64", "AVX2 (no VNNI)", True)
VNNI = CpuInt8("x86-64", "AVX512-VNNI", False)


@pytest.mark.parametrize(
    "text,machine,isa,saturates",
    [
        ("flags\t: fpu sse4_1 avx2 avx512f avx512bw avx512_vnni\n", "x86_64", "AVX512-VNNI", False),
        ("flags\t: fpu sse4_1 avx2 avx_vnni\n", "x86_64", "AVX-VNNI", False),
        ("flags\t: fpu sse4_1 avx2 avx512bw amx_int8 avx512_vnni\n", "x86_64", "AMX-INT8", False),
        ("flags\t: fpu sse4_1 avx2 avx512f avx512bw\n", "x86_64", "AVX512 (no VNNI)", True),
        (
            "processor\t: 0\nflags\t: fpu sse4_1 sse4_2 avx avx2 fma\nflags\t: avx512_vnni\n",
            "x86_64",
            "AVX2 (no VNNI)",
            True,
        ),
        ("Features\t: fp asimd evtstrm aes asimddp\n", "aarch64", "NEON+dotprod", False),
        ("Features\t: fp asimd asimddp i8mm\n", "aarch64", "NEON+i8mm", False),
        ("Features\t: fp asimd\n", "aarch64", "NEON", False),
        ("", "x86_64", "unknown", None),
        ("", "riscv64", "unknown", None),
    ],
)
def test_parse_cpuinfo(text, machine, isa, saturates):
    got = parse_cpuinfo(text, machine)
    assert (got.isa, got.u8s8_saturates) == (isa, saturates)
    assert str(got).endswith(isa)


def test_this_cpu_is_named():
    assert cpu_int8().isa != "" and str(cpu_int8())


@pytest.fixture(scope="module")
def probe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.onnx"
    path.write_bytes(saturation_probe(k=64).SerializeToString())
    return path


def test_qdq_file_as_written_is_exact_on_any_cpu(probe_path):
    x = np.ones((3, 64), np.float32)
    # Q/DQ executed as written (float DequantizeLinear, MatMul, QuantizeLinear): every output is k.
    np.testing.assert_array_equal(OnnxRunner(probe_path, optimization="none")(x), np.full((3, 16), 64.0))
    # onnxruntime's u8u8 kernels (weights shifted to uint8) do not saturate either.
    np.testing.assert_array_equal(OnnxRunner(probe_path, x64_quant_precision=True)(x), np.full((3, 16), 64.0))
    # The fused kernels: exact where the sums are 32-bit, saturated (0.64 instead of 64) on x86-64
    # without VNNI; either way the same as fused_int8_saturates measured.
    fused = OnnxRunner(probe_path)(x)
    assert bool(np.allclose(fused, 64.0)) is not fused_int8_saturates(), fused[0, :4]


def test_bad_optimization_level(probe_path):
    with pytest.raises(ValueError, match="optimization='fast' is not one of"):
        OnnxRunner(probe_path, optimization="fast")


def _artifact(name, top1, ref_top1=None, *, fmt="onnx", quantize="int8", rel=0.01):
    ref = None
    if ref_top1 is not None:
        ref = Agreement(runtime="ref runtime", max_abs_diff=0.1, max_rel_diff=rel, top1_agreement=ref_top1)
    return ArtifactReport(
        name=name,
        format=fmt,
        quantize=quantize,
        path=f"/x/{name}",
        runtime="onnxruntime 1.32.0" if fmt == "onnx" else "LiteRT 2.3.0",
        size_bytes=1,
        gzip_bytes=1,
        max_abs_diff=0.1,
        max_rel_diff=rel,
        top1_agreement=top1,
        latency_ms=1.0,
        batch_sizes=(1,),
        reference=ref,
    )


def test_runtime_below_threshold_on_avx2_blames_saturation():
    (w,) = agreement_warnings([_artifact("onnx_int8_qdq_symmetric", 0.851, 1.0)], 0.99, AVX2)
    assert w.startswith("onnx_int8_qdq_symmetric: top-1 agreement with JAX 0.851 < 0.99")
    assert "saturating 16-bit" in w and "x86-64 AVX2 (no VNNI)" in w
    assert "executed as written agrees 1.000" in w and "session.x64quantprecision=1" in w


def test_runtime_below_threshold_with_vnni_blames_the_kernels_not_saturation():
    (w,) = agreement_warnings([_artifact("tflite_int8", 0.95, 1.0, fmt="tflite")], 0.99, VNNI)
    assert "LiteRT 2.3.0's optimized int8 kernels" in w and "saturating" not in w


def test_reference_below_threshold_blames_the_file():
    (w,) = agreement_warnings([_artifact("onnx_int8", 0.95, 0.95)], 0.99, VNNI)
    assert "the quantized file itself (executed as written it agrees 0.950)" in w and "calibrate" in w


def test_float_drift_and_clean_artifacts():
    ok = [_artifact("onnx_int8", 0.995, 1.0), _artifact("tflite_fp32", 1.0, fmt="tflite", quantize="fp32", rel=1e-6)]
    assert agreement_warnings(ok, 0.99, AVX2) == []
    (w,) = agreement_warnings([_artifact("onnx_fp32", None, quantize="fp32", rel=3e-3)], 0.99, VNNI)
    assert "max relative difference 3.00e-03" in w and "float32 conversion" in w


def test_table_shows_both_figures_cpu_and_warnings():
    arts = (_artifact("onnx_int8_qdq_symmetric", 0.851, 1.0),)
    found = agreement_warnings(arts, 0.99, AVX2)
    rep = ExportReport(
        out_dir="/x",
        jax_latency_ms=1.0,
        jax_param_bytes=4,
        param_zero_fraction=0.0,
        num_checked=10,
        artifacts=arts,
        cpu=str(AVX2),
        warnings=tuple(found),
    )
    table = rep.table()
    header, _, _, row = table.splitlines()[:4]
    assert "top-1 agree" in header and "ref top-1" in header
    assert "0.851" in row and "1.000" in row
    assert "optimized kernels on this CPU (x86-64 AVX2 (no VNNI))" in table
    assert f"WARNING: {found[0]}" in table
    d = rep.to_dict()
    assert d["artifacts"][0]["reference"]["top1_agreement"] == 1.0 and d["cpu"] == str(AVX2)


def test_reference_alone_below_threshold_is_named():
    (w,) = agreement_warnings([_artifact("onnx_int8_qdq_reduce_range", 0.995, 0.989)], 0.99, VNNI)
    assert w.startswith("onnx_int8_qdq_reduce_range: executed as written, top-1 agreement with JAX 0.989 < 0.99")
    assert "(onnxruntime 1.32.0 on this CPU: 0.995)" in w and "the quantized file itself:" in w


def test_fp32_drift_check_is_off_for_deploy_hook_stand_ins():
    # A fake-quant model's float stand-in is compared with the fake-quant model: not an exact match.
    art = _artifact("tflite_fp32", 0.997, fmt="tflite", quantize="fp32", rel=1e-2)
    assert agreement_warnings([art], 0.99, VNNI, fp32_drift=False) == []
    assert len(agreement_warnings([art], 0.99, VNNI)) == 1
