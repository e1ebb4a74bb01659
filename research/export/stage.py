"""The ``export`` stage for configs and ``export_run`` for finished run directories."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import numpy as np

from research.data import calibration_subset
from research.export.api import FORMATS, export
from research.export.report import ExportReport
from research.stages import Bundle, StageConfig, StageContext, StageResult, register_stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportStage(StageConfig):
    """Export the current model and check every artifact in its runtime.

    Attributes:
      formats: any of ``stablehlo``, ``tflite``, ``onnx``.
      quantize: extra TFLite variants: ``fp16``, ``dynamic_int8``, ``int8`` (full integer,
        calibrated on ``calibration_examples`` training inputs; also gives the int8 ONNX file).
      calibration_examples: size of the representative data set for int8.
      eval_examples: test inputs on which every artifact is compared with JAX (top-1 agreement).
      latency_batch_size: batch size of the sample input used for latency.
      source: which model to export: ``"current"`` (the model the previous stage left) or the
        label/kind of an earlier stage (e.g. ``"prune"``). A fake-quant model (after a
        ``quantize``/``qat`` stage) exports to float TFLite/ONNX with its rounding baked into
        the graph, but the TFLite int8 converter cannot re-quantize such a graph; export the
        float model before quantization and let TFLite's int8 calibration quantize it.
    """

    kind: ClassVar[str] = "export"
    formats: tuple[str, ...] = FORMATS
    quantize: tuple[str, ...] = ()
    calibration_examples: int = 256
    eval_examples: int = 512
    latency_batch_size: int = 1
    source: str = "current"

    def validate(self) -> None:
        bad = sorted(set(self.formats) - set(FORMATS))
        if bad:
            raise ValueError(f"ExportStage.formats has unknown {bad}; choose from {list(FORMATS)}")
        allowed = ("fp16", "dynamic_int8", "int8")
        bad = sorted(set(self.quantize) - set(allowed))
        if bad:
            raise ValueError(f"ExportStage.quantize has unknown {bad}; choose from {list(allowed)}")


def export_bundle(
    model: Any,
    dataset,
    out_dir: str,
    *,
    formats=FORMATS,
    quantize=(),
    calibration_examples: int = 256,
    eval_examples: int = 512,
    latency_batch_size: int = 1,
    seed: int = 0,
) -> ExportReport:
    """Exports ``model`` with calibration and evaluation data taken from ``dataset``."""
    sample = np.repeat(dataset.x_test[:1], latency_batch_size, axis=0)
    calibration = calibration_subset(dataset, calibration_examples, seed=seed) if "int8" in quantize else None
    return export(
        model,
        sample,
        formats=tuple(formats),
        out_dir=out_dir,
        quantize=tuple(quantize) or None,
        calibration=calibration,
        eval_data=dataset.x_test[:eval_examples],
    )


def _artifact_rows(rep: ExportReport) -> list[dict]:
    rows = [{"artifact": "jax", "size_kib": rep.jax_param_bytes / 1024, "latency_ms": rep.jax_latency_ms}]
    for a in rep.artifacts:
        rows.append(
            {
                "artifact": a.name,
                "size_kib": a.size_bytes / 1024,
                "gzip_kib": a.gzip_bytes / 1024,
                "max_abs_diff": a.max_abs_diff,
                "top1_agreement": a.top1_agreement,
                "latency_ms": a.latency_ms,
            }
        )
    return rows


@register_stage(ExportStage)
def run_export(bundle: Bundle, cfg: ExportStage, ctx: StageContext) -> StageResult:
    """Exports ``bundle.model`` (or the model of stage ``cfg.source``) and reports each artifact."""
    if cfg.source == "current":
        model = bundle.model
    elif cfg.source in bundle.models:
        model = bundle.models[cfg.source]
    else:
        raise ValueError(
            f"ExportStage.source={cfg.source!r} names no earlier stage; use 'current' or one of {sorted(bundle.models)}"
        )
    rep = export_bundle(
        model,
        bundle.dataset,
        str(ctx.workdir),
        formats=cfg.formats,
        quantize=cfg.quantize,
        calibration_examples=cfg.calibration_examples,
        eval_examples=cfg.eval_examples,
        latency_batch_size=cfg.latency_batch_size,
        seed=ctx.seed,
    )
    rep.save(os.path.join(ctx.workdir, "export_report.json"))
    notes = [f"exported model: {cfg.source}"]
    if "onnx_int8" in {a.name for a in rep.artifacts}:
        qdq = rep["onnx_int8"].extra.get("qdq", {})
        if qdq and not qdq.get("tensorrt_symmetric", True):
            notes.append("onnx_int8 has asymmetric activation Q/DQ (non-zero zero points): TensorRT needs symmetric")
    return StageResult(
        bundle=bundle,
        tables={"artifacts": _artifact_rows(rep)},
        artifacts=[a.path for a in rep.artifacts],
        notes=notes,
    )


def export_run(run_dir: str, *, formats=FORMATS, int8: bool = False, out_dir: str | None = None) -> ExportReport:
    """Exports the final model of a finished run directory (``slimjax export RUN_DIR``)."""
    from research import config as config_lib
    from research.run import load_data, load_run, load_run_config

    _, model, _ = load_run(run_dir)
    cfg = load_run_config(run_dir)
    dataset = load_data(config_lib.Config(seed=cfg["seed"], data=config_lib.DataConfig(**cfg["data"])))
    out_dir = out_dir or os.path.join(run_dir, "export")
    rep = export_bundle(model, dataset, out_dir, formats=formats, quantize=("int8",) if int8 else (), seed=cfg["seed"])
    rep.save(os.path.join(out_dir, "export_report.json"))
    return rep
