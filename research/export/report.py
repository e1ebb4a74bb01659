"""Export report: one row per artifact, next to the JAX model it was exported from."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from research.export.cpu import CpuInt8

#: Largest max relative difference a float32 artifact may show before it gets a warning.
FP32_MAX_REL_DIFF = 1e-4


class ExportAgreementWarning(UserWarning):
    """An exported artifact agrees with the JAX model less than the export's threshold."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Agreement:
    """How closely one way of running an artifact reproduces the JAX model.

    Attributes:
      runtime: what ran the file, e.g. ``"onnxruntime 1.32.0, ORT_DISABLE_ALL (Q/DQ executed as
        written)"``.
      max_abs_diff: largest ``|y_artifact - y_jax|`` over all checked inputs.
      max_rel_diff: ``max_abs_diff / max|y_jax|``.
      top1_agreement: fraction of checked inputs whose argmax matches JAX's (None when the output
        is not ``(batch, classes)``).
    """

    runtime: str
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArtifactReport:
    """Measurements of one artifact, run in its own runtime.

    ``max_abs_diff``, ``max_rel_diff`` and ``top1_agreement`` are measured as a user runs the file
    by default: LiteRT with its optimized kernels, onnxruntime with all graph optimizations
    (Q/DQ pairs fused into int8 kernels). onnxruntime's fused int8 kernels depend on the CPU: they
    saturate on x86-64 without VNNI (:mod:`research.export.cpu`). For an ONNX file with Q/DQ
    nodes, ``reference`` is the same comparison with the file executed as written
    (CPU-independent up to float32 rounding): what the file itself computes, and what TensorRT
    implements. LiteRT's int8 kernels accumulate in 32 bits on every CPU (measured: the same
    outputs on AVX-512 VNNI and on an emulated AVX2 CPU), and its reference op resolver
    (``BUILTIN_REF``) disagrees with its own optimized kernels and with JAX on int8 residual and
    pooling networks, so TFLite files get no ``reference``.

    Attributes:
      name: artifact id, e.g. ``"tflite_int8"``.
      format: ``"stablehlo"``, ``"tflite"`` or ``"onnx"``.
      quantize: ``"fp32"``, ``"fp16"``, ``"dynamic_int8"`` or ``"int8"``.
      path: file written.
      runtime: the runtime that ran it, with its version.
      size_bytes: size on disk.
      gzip_bytes: size after gzip -9 (what a masked/sparse model costs to ship compressed).
      max_abs_diff: largest ``|y_artifact - y_jax|`` over all checked inputs.
      max_rel_diff: ``max_abs_diff / max|y_jax|`` (relative to the output's scale; elementwise
        relative error is meaningless near zero).
      top1_agreement: fraction of checked inputs whose argmax matches JAX's (None when the
        output is not ``(batch, classes)``).
      latency_ms: median wall time of one call on the sample input.
      batch_sizes: batch sizes the artifact was run at.
      extra: format-specific facts (Q/DQ counts, manifest, range agreement).
      reference: for ONNX files with Q/DQ nodes, the agreement with the file executed as
        written: onnxruntime with ``ORT_DISABLE_ALL`` (every DequantizeLinear/QuantizeLinear
        computed in float). None for other artifacts.
    """

    name: str
    format: str
    quantize: str
    path: str
    runtime: str
    size_bytes: int
    gzip_bytes: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None
    latency_ms: float
    batch_sizes: tuple[int, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference: Agreement | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportReport:
    """Everything :func:`research.export.export` wrote and measured.

    Attributes:
      out_dir: directory holding the artifacts.
      jax_latency_ms: median latency of the jitted JAX model on the sample input.
      jax_param_bytes: bytes of the model's parameters (and batch stats) in memory.
      param_zero_fraction: fraction of exactly-zero parameter values (sparsity of a masked
        model; compare ``gzip_bytes`` with ``size_bytes``).
      num_checked: number of inputs the differences and agreement were computed on.
      artifacts: one :class:`ArtifactReport` per artifact.
      notes: facts about how the artifacts were made (e.g. converted from a deploy hook's
        float stand-in of a fake-quant model).
      fusion: the fusion report (``research.export.fusion.FusionReport.to_dict()``) when
        ``export(..., fusion=True)``; its ``"table"`` is printed after the artifact table.
      cpu: the CPU's int8-relevant instruction set (``"x86-64 AVX512-VNNI"``, ``"x86-64 AVX2
        (no VNNI)"``, ``"arm64 NEON+dotprod"`` ...), which decides what optimized int8 kernels
        compute.
      warnings: one line per artifact whose agreement with JAX is below the export's threshold,
        naming the likely cause (also issued with :func:`warnings.warn` and printed by
        :meth:`table`).
    """

    out_dir: str
    jax_latency_ms: float
    jax_param_bytes: int
    param_zero_fraction: float
    num_checked: int
    artifacts: tuple[ArtifactReport, ...]
    notes: tuple[str, ...] = ()
    fusion: dict[str, Any] | None = None
    cpu: str = ""
    warnings: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> ArtifactReport:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise KeyError(f"no artifact {name!r}; have {[a.name for a in self.artifacts]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the run's ``report.json``)."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_dict` as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)

    def table(self) -> str:
        """A printable table: one row for JAX, one per artifact."""
        head = (
            "artifact",
            "size",
            "gzip",
            "latency ms",
            "vs JAX",
            "max abs diff",
            "max rel diff",
            "top-1 agree",
            "ref top-1",
            "runtime",
        )
        rows = [
            (
                "jax (jit)",
                _kib(self.jax_param_bytes) + " (params)",
                "",
                f"{self.jax_latency_ms:.3f}",
                "1.00x",
                "0",
                "0",
                "1.000" if self.num_checked else "",
                "",
                "jax",
            )
        ]
        for a in self.artifacts:
            ratio = a.latency_ms / self.jax_latency_ms if self.jax_latency_ms > 0 else float("nan")
            rows.append(
                (
                    a.name,
                    _kib(a.size_bytes),
                    _kib(a.gzip_bytes),
                    f"{a.latency_ms:.3f}",
                    f"{ratio:.2f}x",
                    f"{a.max_abs_diff:.2e}",
                    f"{a.max_rel_diff:.2e}",
                    _top1(a.top1_agreement),
                    "" if a.reference is None else _top1(a.reference.top1_agreement) or "-",
                    a.runtime,
                )
            )
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        foot = (
            f"checked on {self.num_checked} inputs; parameter zeros: "
            f"{100 * self.param_zero_fraction:.1f}%; out_dir: {self.out_dir}"
        )
        refs = [a.reference.runtime for a in self.artifacts if a.reference is not None]
        if refs or self.cpu:
            foot += (
                f"\ntop-1 agree: the runtime's optimized kernels on this CPU ({self.cpu or 'unknown'}); "
                "ref top-1: the file executed as written, CPU-independent (" + "; ".join(dict.fromkeys(refs)) + ")"
            )
        fusion = ["", self.fusion["table"]] if self.fusion else []
        return "\n".join(
            [*lines, foot, *(f"note: {n}" for n in self.notes), *(f"WARNING: {w}" for w in self.warnings), *fusion]
        )


def _top1(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _cause(a: ArtifactReport, threshold: float, cpu: CpuInt8, fp32_drift: bool) -> str | None:
    """Why ``a`` is below ``threshold`` (None when it is not)."""
    low = a.top1_agreement is not None and a.top1_agreement < threshold
    ref = a.reference
    ref_low = ref is not None and ref.top1_agreement is not None and ref.top1_agreement < threshold
    drift = fp32_drift and a.quantize == "fp32" and a.max_rel_diff > FP32_MAX_REL_DIFF
    if not (low or ref_low or drift):
        return None
    got = "" if a.top1_agreement is None else f"top-1 agreement with JAX {a.top1_agreement:.3f}"
    if drift and not low:
        got = f"max relative difference {a.max_rel_diff:.2e} (> {FP32_MAX_REL_DIFF:g})"
    head = f"{a.name}: {got} < {threshold:g}" if low else f"{a.name}: {got}"
    if ref_low and not low:
        head = (
            f"{a.name}: executed as written, top-1 agreement with JAX {ref.top1_agreement:.3f} < {threshold:g}"
            f" ({a.runtime} on this CPU: {_top1(a.top1_agreement)})"
        )
    if ref is not None and low and not ref_low:
        written = f"the file executed as written agrees {ref.top1_agreement:.3f} ({ref.runtime})"
        if a.format == "onnx" and cpu.u8s8_saturates:
            why = (
                f"likely cause: onnxruntime's fused int8 kernels sum uint8 x int8 product pairs in saturating 16-bit "
                f"arithmetic on this CPU ({cpu}; measured with a probe), and full-range int8 weights overflow it; "
                f"{written}. "
                "The file is right: TensorRT, VNNI x86 and ARM CPUs compute it as written. With onnxruntime on this "
                "CPU set session.x64quantprecision=1 (OnnxRunner(path, x64_quant_precision=True); onnxruntime 1.32 "
                "refuses it for some TFLite-converted files, see extra['x64quantprecision']), or export "
                "quantize='int8_qdq_reduce_range' (7-bit weights, which these kernels cannot overflow)"
            )
        else:
            why = (
                f"likely cause: {a.runtime}'s optimized int8 kernels on this CPU ({cpu}) compute differently from the "
                f"file's operators; {written}"
            )
        return f"{head}; {why}"
    if a.quantize == "fp32":
        why = (
            "likely cause: the float32 conversion changed the function (an unsupported or approximated operation); "
            "compare the per-layer outputs of the runtime and JAX"
        )
    else:
        also = ""
        if ref is not None and low:
            also = f" (executed as written it agrees {_top1(ref.top1_agreement) or '-'})"
        why = (
            f"likely cause: the quantized file itself{also}: {a.quantize} ranges or scales do not fit this model; "
            "calibrate on more (representative) data, prefer per-channel 'int8' to per-tensor modes, keep "
            "sensitive layers in float, or train for larger logit margins (quantization-aware training)"
        )
    return f"{head}; {why}"


def agreement_warnings(
    artifacts: Sequence[ArtifactReport], threshold: float, cpu: CpuInt8, *, fp32_drift: bool = True
) -> list[str]:
    """One line per artifact whose agreement with JAX is below ``threshold``, naming the likely cause.

    An artifact is flagged when its top-1 agreement (as the runtime runs it by default, or its
    ``reference``, the file executed as written) is below ``threshold``, or when a float32
    artifact's max relative difference exceeds :data:`FP32_MAX_REL_DIFF`. When only the
    runtime's figure is low, the cause is the runtime's optimized kernels on this CPU (for
    onnxruntime on x86-64 without VNNI: 16-bit saturation, with the session option that avoids
    it); when the reference is low too, the file itself.

    Args:
      artifacts: the export's artifact reports.
      threshold: the lowest acceptable top-1 agreement.
      cpu: the CPU the figures were measured on (:func:`research.export.cpu.cpu_int8`).
      fp32_drift: check float32 artifacts' max relative difference; off when they were converted
        from a deploy hook's float stand-in and compared with a fake-quant model, which they are
        not meant to match exactly.
    """
    return [w for a in artifacts if (w := _cause(a, threshold, cpu, fp32_drift)) is not None]
