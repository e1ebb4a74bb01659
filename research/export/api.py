"""``export``: validate, compute JAX's reference outputs, then let each registered format write and be checked.

The formats themselves live in their modules (:mod:`research.export.stablehlo`,
:mod:`~research.export.tflite`, :mod:`~research.export.onnx_export`, :mod:`~research.export.tvm`,
:mod:`~research.export.tensorrt`), registered in :data:`research.export.formats.EXPORT_FORMATS`;
this module names none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from research import metrics
from research.export import cpu as cpu_lib
from research.export import deploy as deploy_lib
from research.export import formats as formats_lib

# The built-in formats register themselves on import.
from research.export import onnx_export  # noqa: F401
from research.export import stablehlo  # noqa: F401
from research.export import tensorrt  # noqa: F401
from research.export import tflite  # noqa: F401
from research.export import tflite_ranges
from research.export import tvm  # noqa: F401
from research.export._io import commit_export_set
from research.export._io import gzip_size
from research.export._io import staging_dir
from research.export._trace import export_forms
from research.export._trace import inference_fn
from research.export.formats import DEFAULT_FORMATS
from research.export.formats import ExportJob
from research.export.formats import needs_calibration
from research.export.formats import quantize_modes
from research.export.report import ArtifactReport
from research.export.report import ExportAgreementWarning
from research.export.report import ExportReport
from research.export.report import agreement_warnings

FORMATS = DEFAULT_FORMATS
"""The formats written when none are named (``formats.format_names()`` lists every registered one)."""

__all__ = ["FORMATS", "export", "needs_calibration", "quantize_modes"]


def __getattr__(name: str) -> Any:
    # Deprecated in this release: the optional formats are registry entries now.
    if name == "OPTIONAL_FORMATS":
        warnings.warn(
            "research.export.OPTIONAL_FORMATS is deprecated and will be removed in the next release; "
            "use research.export.format_names() (every registered format) or research.export.FORMATS (the defaults)",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(n for n in formats_lib.format_names() if n not in DEFAULT_FORMATS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _batch(x: np.ndarray) -> int:
    return int(x.shape[0]) if x.ndim else 1


def _check_inputs(sample: np.ndarray, eval_data: np.ndarray | None, batch_polymorphic: bool) -> list[np.ndarray]:
    """Inputs every artifact is checked on: the sample, eval data in sample-sized batches, a second batch size."""
    bsz = _batch(sample)
    inputs = [sample]
    if eval_data is not None:
        data = np.asarray(eval_data, sample.dtype)
        chunks = [data[i : i + bsz] for i in range(0, len(data), bsz)]
        inputs += [c for c in chunks if batch_polymorphic or len(c) == bsz]
    if batch_polymorphic and sample.ndim:
        other = 1 if bsz != 1 else 3
        inputs.append(np.resize(sample, (other, *sample.shape[1:])).astype(sample.dtype))
    return inputs


def _jax_outputs(
    jfn: Callable, inputs: list[np.ndarray], sample: np.ndarray, row_independent: bool
) -> list[np.ndarray]:
    """JAX's outputs on every checked input, computed at the sample's batch size only.

    A module in eval mode computes each row on its own, so an input of another batch size runs in
    sample-sized pieces, the last one filled up with copies of its last row and cut back: one compiled
    program instead of one per batch size (ResNet-56 at width 4 compiles in about 4 s). A plain
    callable, or an output without the batch as its leading axis, is called on each input as it is.
    """
    bsz = _batch(sample)
    if not row_independent or not sample.ndim:
        return [np.asarray(jfn(x)) for x in inputs]
    outs = []
    for x in inputs:
        if _batch(x) == bsz:
            outs.append(np.asarray(jfn(x)))
            continue
        pieces = []
        for i in range(0, len(x), bsz):
            chunk = x[i : i + bsz]
            n = len(chunk)
            filled = np.concatenate([chunk, np.repeat(chunk[-1:], bsz - n, axis=0)]) if n < bsz else chunk
            y = np.asarray(jfn(filled))
            if y.ndim == 0 or y.shape[0] != bsz:  # not batch-major: no pieces
                return [np.asarray(jfn(x)) for x in inputs]
            pieces.append(y[:n])
        outs.append(np.concatenate(pieces))
    return outs


def _record(job: ExportJob, fmt: str, p: formats_lib.Produced) -> ArtifactReport:
    """Compares a produced artifact with JAX on the job's inputs and times it on the sample."""
    got = job.agreement(p.runtime, p.run)
    return ArtifactReport(
        name=p.name,
        format=fmt,
        quantize=p.quantize,
        path=p.path,
        runtime=p.runtime,
        size_bytes=os.path.getsize(p.path),
        gzip_bytes=gzip_size(p.path),
        max_abs_diff=got.max_abs_diff,
        max_rel_diff=got.max_rel_diff,
        top1_agreement=got.top1_agreement,
        latency_ms=metrics.median_ms(lambda: p.run(job.sample), job.latency_repeats),
        batch_sizes=tuple(sorted({_batch(x) for x in job.inputs})),
        extra=p.extra,
        reference=p.reference,
    )


def _validate(
    formats: tuple[str, ...],
    variants: tuple[str, ...],
    calibration: np.ndarray | None,
    format_options: Mapping[str, Any],
    activation_calibration: str = "minmax",
) -> None:
    """Raises on a bad request before anything is converted: ValueError, or ImportError when a format cannot run."""
    tflite_ranges.check_activation_calibration(activation_calibration)
    found = formats_lib.problems(formats, variants, availability=False, activation_calibration=activation_calibration)
    if found:
        raise ValueError("; ".join(msg for _, msg in found))
    for f in dict.fromkeys(formats):
        reason = formats_lib.get_format(f).unavailable()
        if reason:
            raise ImportError(f"formats={formats!r}: {f!r} cannot run here: {reason}")
    for q in variants:
        if needs_calibration(q) and calibration is None:
            raise ValueError(
                f"quantize={q!r} needs calibration=<array (N, *input_shape[1:])> for the "
                "activation ranges; pass a few hundred training inputs, or use "
                "quantize='dynamic_int8'"
            )
    used = formats_lib.conversions_used(formats)
    stray = sorted(set(format_options) - set(used))
    if stray:
        raise ValueError(
            f"format_options names {stray}, which are not in formats={formats!r} nor converted through by them "
            f"(options apply to {list(used)}); drop them or add them"
        )
    for f, options in format_options.items():
        formats_lib.get_format(f).check_options(options)


def _param_facts(model: Any) -> tuple[int, float]:
    """Bytes of the model's state (parameters and batch statistics) and its fraction of exact zeros."""
    state = nnx.state(model, nnx.Not(nnx.RngState)) if isinstance(model, nnx.Module) else {}
    leaves = [
        v
        for v in jax.tree.leaves(state)
        if hasattr(v, "dtype") and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
    ]
    floats = [v for v in leaves if np.issubdtype(v.dtype, np.floating)]
    n = metrics.count_params(leaves)
    zeros = metrics.count_params(floats) - metrics.count_nonzeros(floats)
    return metrics.stored_bytes(leaves), (zeros / n if n else 0.0)


def export(
    model: Any,
    sample_input: np.ndarray | jax.Array,
    formats: Sequence[str] = FORMATS,
    out_dir: str | os.PathLike = "export",
    quantize: str | Sequence[str] | None = None,
    calibration: np.ndarray | None = None,
    *,
    eval_data: np.ndarray | None = None,
    batch_polymorphic: bool = True,
    batch_route: str = "auto",
    activation_ranges: Mapping[str, tuple[float, float]] | None = None,
    activation_calibration: str = "minmax",
    latency_repeats: int = 30,
    num_threads: int = 1,
    name: str = "model",
    onnx_opset: int = onnx_export.DEFAULT_OPSET,
    use_deploy_hooks: bool = True,
    tvm_tuning_trials: int = 0,
    fusion: bool = False,
    format_options: Mapping[str, Mapping[str, Any]] | None = None,
    min_top1_agreement: float = 0.99,
) -> ExportReport:
    """Exports a model to StableHLO, TFLite and ONNX and checks every artifact in its runtime.

    The float32 TFLite (and ONNX) artifact is always written; ``quantize`` adds quantized
    variants. The artifacts of one export are a set: all are written to a staging directory
    inside ``out_dir``, loaded and run in their runtimes, and moved into place together only when
    every one succeeded, followed by ``{name}.export.json`` (the set's file names and SHA-256
    hashes; files of the previous set that the new one lacks are removed). A failed export
    leaves ``out_dir`` exactly as it was, and its error names the artifact that failed.

    Every artifact is run on ``sample_input`` and ``eval_data`` (in batches), and at a second
    batch size when ``batch_polymorphic``; the report gives max abs/rel differences against JAX,
    top-1 agreement, size, gzip size and median latency, as the runtime runs the file by default
    (optimized kernels: onnxruntime's fused int8 kernels depend on the CPU, see
    :mod:`research.export.cpu`). ONNX files with Q/DQ nodes are also run as written
    (onnxruntime with ``ORT_DISABLE_ALL``), which is ``ArtifactReport.reference``: what the file
    computes on any CPU. An artifact below
    ``min_top1_agreement`` (by either measure) gets a warning naming the likely cause, in
    ``ExportReport.warnings`` and as an :class:`ExportAgreementWarning`.

    Args:
      model: a ``flax.nnx.Module`` mapping one array to one array (exported in eval mode; the
        caller's model is not modified), or any such JAX function.
      sample_input: one batch of inputs; fixes dtype and the non-batch dimensions, and is the
        input latencies are measured on.
      formats: names of registered export formats (:mod:`research.export.formats`): built in are
        ``"stablehlo"``, ``"tflite"``, ``"onnx"``, ``"tvm"`` and ``"tensorrt"``; they are produced
        in the order given, each after the formats it requires. ONNX is converted from the
        TFLite flatbuffer (jax2tf's ``XlaCallModule`` cannot be converted by tf2onnx directly).
        ``"tvm"`` (needs ``"onnx"``) compiles every ONNX file with Apache TVM Relax for the host
        CPU into ``{name}_{variant}_tvm.so`` (:mod:`research.export.tvm`); a quantized file that
        TVM rejects is reported in ``notes`` with TVM's error. ``"tensorrt"`` (needs ``"onnx"``
        and an NVIDIA GPU) builds engines from the ONNX files (:mod:`research.export.tensorrt`).
      out_dir: directory for ``{name}.stablehlo`` (+ ``.json`` manifest),
        ``{name}_{variant}.tflite`` and ``{name}_{variant}.onnx``.
      quantize: None, or one or several of ``"fp16"``, ``"dynamic_int8"``, ``"int8"``,
        ``"int8_dense_per_tensor"``, ``"int8_per_tensor"``, ``"int16x8"`` (int16 activations,
        int8 weights) (TFLite modes, see
        :mod:`research.export.tflite`) and ``"int8_qdq_symmetric"`` (ONNX only). ONNX is written for the fp32 and full-integer
        TFLite variants (int8 ONNX carries the TFLite file's QuantizeLinear/DequantizeLinear
        nodes, asymmetric activations); ``"int8_qdq_symmetric"`` quantizes the fp32 ONNX file
        with onnxruntime into the symmetric int8 Q/DQ form TensorRT needs
        (:func:`research.export.onnx_export.quantize_qdq_symmetric`), and
        ``"int8_qdq_reduce_range"`` does the same with 7-bit weights, which onnxruntime's fused
        int8 kernels compute as written on x86-64 CPUs without VNNI too.
      calibration: inputs ``(N, *sample_input.shape[1:])`` for int8 calibration (the
        representative dataset); required for the full-integer and ``int8_qdq_*`` modes.
      eval_data: inputs to compare on (e.g. the test split); default: ``sample_input``.
      batch_polymorphic: export with a variable leading (batch) dimension.
      batch_route: how TFLite (and so ONNX) files get their variable batch: ``"auto"``
        (default: convert at a fixed batch and free the dimension, falling back to jax2tf shape
        polymorphism when the result depends on the batch), ``"static"`` or ``"jax2tf"``; see
        :mod:`research.export.tflite`. Each TFLite artifact's ``extra["batch_route"]`` says
        which route it took.
      activation_ranges: optional learned ranges from quantization-aware training, a mapping
        from a regular expression over TFLite tensor names (which carry the JAX primitive
        names, e.g. ``"dot_general"``) to ``(min, max)``. The int8 TFLite activation ranges come
        from calibration on ``calibration`` (a fake-quant model clips its activations to the
        learned ranges, so calibration recovers them); the report's
        ``extra["range_agreement"]`` of ``tflite_int8`` lists, per pattern, each matching int8
        tensor's deployed range and its error relative to the learned range width.
      activation_calibration: how the int8 TFLite files (``"int8"``, ``"int8_dense_per_tensor"``,
        ``"int8_per_tensor"``, and the ONNX files converted from them) choose each activation's
        range from the calibration data: ``"minmax"`` (default: the converter's own minimum and
        maximum), ``"percentile"`` (0.01/99.99 percentiles) or ``"mse"`` (the clip with the least
        squared rounding error); see :mod:`research.export.tflite_ranges`. The ONNX-only symmetric
        modes (``"int8_qdq_symmetric"``, ``"int8_qdq_reduce_range"``) take ``"percentile"``
        through onnxruntime's calibrator and use min/max for ``"mse"``, which it has none for. Each
        such artifact's ``extra["activation_calibration"]`` names the rule used.
      latency_repeats: timed calls per latency measurement (median is reported).
      num_threads: threads for the TFLite interpreter and onnxruntime.
      name: file name stem.
      onnx_opset: ONNX opset for tf2onnx.
      use_deploy_hooks: ask the registered deploy hooks
        (:func:`research.export.deploy.as_deployable`) whether the model has a float stand-in
        for the converters. ``methods.quantization`` registers one for fake-quant models: their
        TFLite/ONNX artifacts are then converted from a float model with the fake-quantized
        kernels baked in and inputs clipped to the learned ranges (TFLite's int8 converter
        cannot quantize fake-quant graphs), ``activation_ranges`` defaults to the learned
        ranges, and every artifact is still compared with the fake-quant model itself. The
        StableHLO artifact is always the model's own graph.
      tvm_tuning_trials: with ``"tvm"``, also tune the float32 library with MetaSchedule for this
        many trials at the sample's batch size (artifact ``tvm_fp32_tuned``, with its measured
        ``extra["speedup_vs_untuned"]``).
      fusion: add the fusion report (:func:`research.export.fusion.fusion_report`: per runtime,
        operators before/after fusion, fused patterns, latency with fusion off and on) as
        ``report.fusion``, printed after the table.
      format_options: per-format options for formats that take them (``{"name": {...}}``),
        read by the format from :meth:`ExportJob.options_of`. Options of a format that a requested
        one is converted through apply too (``formats=("onnx",)`` with ``{"tflite": {...}}``: the
        ONNX files are the TFLite conversion's); any other key is refused.
      min_top1_agreement: an artifact whose top-1 agreement with JAX (runtime or reference) is
        below this gets a warning naming the likely cause (for float32 artifacts also a max
        relative difference above 1e-4).

    Returns:
      An :class:`ExportReport`; ``report.table()`` prints it.

    Raises:
      ValueError: unknown format (with the closest name) or quantization mode, int8 without
        calibration, a format without a format it requires (``"tvm"`` without ``"onnx"``), or a
        mode that no requested format writes (an ONNX-only mode without ``"onnx"``).
      UnsupportedOpError: an operation cannot be converted; names the JAX primitive and layer,
        and the requested formats that need the failing conversion (ONNX is converted from
        TFLite).
      ImportError: a requested format cannot run here (TensorFlow/tf2onnx/onnx/onnxruntime
        missing: ``pip install 'slimjax[export]'``; TVM: ``'slimjax[tvm]'``), before anything is
        converted.

    Example:
      >>> from flax import nnx
      >>> import numpy as np, tempfile
      >>> from research.export import export
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> x = np.ones((2, 4), np.float32)
      >>> rep = export(model, x, formats=("stablehlo",), out_dir=tempfile.mkdtemp())
      >>> rep["stablehlo"].max_abs_diff < 1e-6
      True
    """
    formats = tuple(formats)
    variants = formats_lib.requested_variants(quantize)
    _validate(formats, variants, calibration, format_options or {}, activation_calibration)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    sample = np.asarray(sample_input)
    fn = inference_fn(model)
    jfn = jax.jit(fn)
    deployable = deploy_lib.as_deployable(model) if use_deploy_hooks else None
    convert_model, notes = model, []
    if deployable is not None:
        convert_model = deployable.model
        if activation_ranges is None:
            activation_ranges = deployable.activation_ranges
        notes += [
            f"TFLite/ONNX converted from the float stand-in of deploy hook {deployable.source!r};"
            " compared with the original model",
            *deployable.notes,
        ]

    inputs = _check_inputs(sample, eval_data, batch_polymorphic)
    refs = _jax_outputs(jfn, inputs, sample, row_independent=isinstance(model, nnx.Module))
    jax_ms = metrics.median_ms(lambda: jfn(sample).block_until_ready(), latency_repeats)
    param_bytes, zero_frac = _param_facts(model)

    cpu = cpu_lib.cpu_int8()
    order = formats_lib.processing_order(formats)
    job = ExportJob(
        model=model,
        fn=fn,
        convert_model=convert_model,
        convert_fn=inference_fn(export_forms(convert_model)),
        sample=sample,
        calibration=calibration,
        inputs=inputs,
        refs=refs,
        formats=order,
        variants=variants,
        stage="",
        out_dir=out_dir,
        name=name,
        cpu=cpu,
        cpu_text=str(cpu),
        batch_polymorphic=batch_polymorphic,
        batch_route=batch_route,
        activation_ranges=activation_ranges,
        activation_calibration=activation_calibration,
        num_threads=num_threads,
        latency_repeats=latency_repeats,
        onnx_opset=onnx_opset,
        tvm_tuning_trials=tvm_tuning_trials,
        format_options=dict(format_options or {}),
    )
    plan = [(formats_lib.get_format(f), f) for f in order]
    for fmt, _ in plan:
        fmt.prepare(job)

    # Everything is written to a staging directory and moved into out_dir together at the end.
    job.stage = staging_dir(out_dir, name)
    artifacts: list[ArtifactReport] = []
    try:
        for fmt, f in plan:
            for q in fmt.variants(variants):
                with formats_lib.producing(fmt.label(job, q), out_dir):
                    for p in fmt.produce(job, q):
                        job.produced.append((f, p))
                        artifacts.append(_record(job, f, p))
        moved = commit_export_set(job.stage, out_dir, name, {"formats": list(formats), "quantize": list(variants)})
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(job.stage)
    artifacts = [dataclasses.replace(a, path=moved[a.path]) for a in artifacts]

    found = agreement_warnings(artifacts, min_top1_agreement, job.cpu, fp32_drift=deployable is None)
    for w in found:
        warnings.warn(w, ExportAgreementWarning, stacklevel=2)

    fusion_dict = None
    if fusion:
        from research.export import fusion as fusion_lib  # noqa: PLC0415

        fp32 = {a.format: a.path for a in artifacts if a.quantize == "fp32"}
        fusion_dict = fusion_lib.fusion_report(
            model,
            sample,
            runtimes=[r for r in fusion_lib.RUNTIMES if r != "tvm" or "tvm" in formats],
            tflite_path=fp32.get("tflite"),
            onnx_path=fp32.get("onnx"),
            num_threads=num_threads,
            latency_repeats=latency_repeats,
        ).to_dict()
    return ExportReport(
        out_dir=out_dir,
        jax_latency_ms=jax_ms,
        jax_param_bytes=param_bytes,
        param_zero_fraction=zero_frac,
        num_checked=sum(_batch(x) for x in inputs),
        artifacts=tuple(artifacts),
        notes=(*notes, *job.notes),
        fusion=fusion_dict,
        cpu=job.cpu_text,
        warnings=tuple(found),
    )
