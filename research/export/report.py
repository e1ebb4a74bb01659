"""Export report: one row per artifact, next to the JAX model it was exported from."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArtifactReport:
    """Measurements of one artifact, run in its own runtime.

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
    """

    out_dir: str
    jax_latency_ms: float
    jax_param_bytes: int
    param_zero_fraction: float
    num_checked: int
    artifacts: tuple[ArtifactReport, ...]
    notes: tuple[str, ...] = ()
    fusion: dict[str, Any] | None = None

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
                    "" if a.top1_agreement is None else f"{a.top1_agreement:.3f}",
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
        fusion = ["", self.fusion["table"]] if self.fusion else []
        return "\n".join([*lines, foot, *(f"note: {n}" for n in self.notes), *fusion])


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"
