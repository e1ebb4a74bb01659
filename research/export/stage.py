"""The ``export`` stage for configs and ``export_run`` for finished run directories."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from research.data import calibration_subset
from research.export import formats as formats_lib
from research.export.api import FORMATS
from research.export.api import export
from research.export.config import ExportStage
from research.export.formats import needs_calibration
from research.export.report import ExportReport
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import register_stage


def export_bundle(
    model: Any,
    dataset,
    out_dir: str,
    *,
    formats=FORMATS,
    quantize=(),
    calibration_examples: int = 256,
    activation_calibration: str = "minmax",
    int8_layernorm: str = "l2_normalization",
    eval_examples: int = 512,
    latency_batch_size: int = 1,
    latency_threads: int = 1,
    seed: int = 0,
) -> ExportReport:
    """Exports ``model`` with calibration and evaluation data taken from ``dataset``."""
    sample = np.repeat(dataset.x_test[:1], latency_batch_size, axis=0)
    needs = any(needs_calibration(q) for q in quantize)
    calibration = calibration_subset(dataset, calibration_examples, seed=seed) if needs else None
    return export(
        model,
        sample,
        formats=tuple(formats),
        out_dir=out_dir,
        quantize=tuple(quantize) or None,
        calibration=calibration,
        activation_calibration=activation_calibration,
        format_options=(
            {"tflite": {"int8_layernorm": int8_layernorm}}
            if "tflite" in formats_lib.conversions_used(formats)
            else None
        ),
        eval_data=dataset.x_test[:eval_examples],
        num_threads=latency_threads,
    )


def artifact_accuracy(fmt: str, path: str, batch_sizes, x: np.ndarray, y: np.ndarray) -> float | None:
    """Top-1 accuracy of an exported artifact on ``(x, y)``, run in its own runtime.

    The artifact is loaded from ``path`` by its format (``research.export.formats``) and run in
    batches of the largest batch size it was checked at (the last batch is padded by repeating
    rows; the padding is not counted). ``None`` when its output is not ``(batch, classes)``.
    """
    runner = formats_lib.get_format(fmt).load(path)
    bsz = max(batch_sizes) if batch_sizes else 1
    correct = 0
    for i in range(0, len(x), bsz):
        chunk = x[i : i + bsz]
        n = len(chunk)
        if n < bsz:
            chunk = np.resize(chunk, (bsz, *chunk.shape[1:])).astype(x.dtype)
        out = np.asarray(runner(chunk))
        if out.ndim != 2:
            return None
        correct += int(np.sum(out[:n].argmax(-1) == y[i : i + n]))
    return correct / len(x) if len(x) else None


def _accuracies(rep: ExportReport, model: Any, dataset) -> dict[str, float | None]:
    """Test-split accuracy of the JAX model and of every artifact (``{"jax": ..., name: ...}``)."""
    from research.metrics import accuracy  # pylint: disable=import-outside-toplevel

    x, y = np.asarray(dataset.x_test), np.asarray(dataset.y_test)
    out: dict[str, float | None] = {"jax": float(accuracy(model, x, y)) if len(x) else None}
    for a in rep.artifacts:
        out[a.name] = artifact_accuracy(a.format, a.path, a.batch_sizes, x, y)
    return out


def _artifact_rows(rep: ExportReport, accuracies: dict[str, float | None] | None = None) -> list[dict]:
    accuracies = accuracies or {}
    rows = [
        {
            "artifact": "jax",
            "size_kib": rep.jax_param_bytes / 1024,
            "test_accuracy": accuracies.get("jax"),
            "latency_ms": rep.jax_latency_ms,
        }
    ]
    for a in rep.artifacts:
        rows.append(
            {
                "artifact": a.name,
                "size_kib": a.size_bytes / 1024,
                "gzip_kib": a.gzip_bytes / 1024,
                "max_abs_diff": a.max_abs_diff,
                "top1_agreement": a.top1_agreement,
                "test_accuracy": accuracies.get(a.name),
                "ref_top1": None if a.reference is None else a.reference.top1_agreement,
                "tensorrt_symmetric": a.extra.get("qdq", {}).get("tensorrt_symmetric"),
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
        activation_calibration=cfg.activation_calibration,
        int8_layernorm=cfg.int8_layernorm,
        eval_examples=cfg.eval_examples,
        latency_batch_size=cfg.latency_batch_size,
        latency_threads=cfg.latency_threads,
        seed=ctx.seed,
    )
    rep.save(os.path.join(ctx.workdir, "export_report.json"))
    notes = [f"exported model: {cfg.source}", f"CPU: {rep.cpu}", *rep.notes, *(f"WARNING: {w}" for w in rep.warnings)]
    if "onnx_int8" in {a.name for a in rep.artifacts}:
        qdq = rep["onnx_int8"].extra.get("qdq", {})
        if qdq and not qdq.get("tensorrt_symmetric", True):
            notes.append(
                "onnx_int8 has asymmetric activation Q/DQ (non-zero zero points): TensorRT needs "
                "symmetric; add 'int8_qdq_symmetric' to quantize for onnx_int8_qdq_symmetric"
            )
    if "tflite_int8" in {a.name for a in rep.artifacts}:
        ranges = rep["tflite_int8"].extra.get("range_agreement", {})
        errs = [m["rel_err"] for r in ranges.values() for m in r["matches"]]
        if errs:
            notes.append(
                f"tflite_int8 activation ranges vs learned: {len(ranges)} ranges, max error "
                f"{max(errs):.2%} of the range width"
            )
    accuracies = _accuracies(rep, model, bundle.dataset)
    metrics = {f"{a.name}_latency_ms": float(a.latency_ms) for a in rep.artifacts}
    # Each artifact's accuracy on the whole test split, run in its own runtime (not only its
    # agreement with JAX): what a deployment of that file scores.
    metrics.update(
        {f"{name}_test_accuracy": acc for name, acc in accuracies.items() if acc is not None and name != "jax"}
    )
    return StageResult(
        bundle=bundle,
        # Measured deployment latency per artifact, readable as a tune objective/constraint.
        metrics=metrics,
        tables={"artifacts": _artifact_rows(rep, accuracies)},
        artifacts=[a.path for a in rep.artifacts],
        notes=notes,
    )


def _int8_modes(int8: bool, formats) -> tuple[str, ...]:
    """``--int8``: the TFLite-calibrated int8 and the symmetric Q/DQ mode, where a requested format writes them."""
    if not int8:
        return ()
    writes = {q for f in formats if f in formats_lib.EXPORT_FORMATS for q in formats_lib.get_format(f).modes()}
    return tuple(q for q in ("int8", "int8_qdq_symmetric") if q in writes)


def export_run(run_dir: str, *, formats=FORMATS, int8: bool = False, out_dir: str | None = None) -> ExportReport:
    """Exports the final model of a finished run directory (``slimjax export RUN_DIR``).

    Raises:
      ConfigError: an unknown, unrunnable or incomplete list of ``formats`` (before the run is loaded).
    """
    from research import config as config_lib
    from research.run import load_data
    from research.run import load_run
    from research.run import load_run_config

    found = formats_lib.problems(formats, _int8_modes(int8, formats))
    if found:  # before the run is loaded: a mistyped --to comes back at once
        raise config_lib.ConfigError("; ".join(msg for _, msg in found))
    _, model, _ = load_run(run_dir)
    cfg = load_run_config(run_dir)
    dataset = load_data(config_lib.Config(seed=cfg["seed"], data=config_lib.DataConfig(**cfg["data"])))
    out_dir = out_dir or os.path.join(run_dir, "export")
    rep = export_bundle(
        model,
        dataset,
        out_dir,
        formats=formats,
        quantize=_int8_modes(int8, formats),
        seed=cfg["seed"],
    )
    rep.save(os.path.join(out_dir, "export_report.json"))
    return rep
