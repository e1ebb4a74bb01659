"""``export``: write StableHLO, TFLite and ONNX artifacts and check each in its runtime."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import jax
import numpy as np
from flax import nnx

from research.export import cpu as cpu_lib
from research.export import deploy as deploy_lib
from research.export import onnx_export
from research.export import stablehlo
from research.export import tflite
from research.export._io import commit_export_set
from research.export._io import gzip_size
from research.export._io import staging_dir
from research.export._io import write_bytes_atomic
from research.export._trace import UnsupportedOpError
from research.export._trace import inference_fn
from research.export.latency import median_ms
from research.export.report import Agreement
from research.export.report import ArtifactReport
from research.export.report import ExportAgreementWarning
from research.export.report import ExportReport
from research.export.report import agreement_warnings

FORMATS = ("stablehlo", "tflite", "onnx")
# Formats that need extra packages, so not in the default FORMATS: "tvm" (pip install 'slimjax[tvm]').
OPTIONAL_FORMATS = ("tvm",)


# TFLite variants that are also converted to ONNX (tf2onnx turns int8 TFLite into Q/DQ form).
def quantize_modes() -> tuple[str, ...]:
    """Every ``quantize=`` mode: the registered TFLite modes but ``"fp32"``, then the ONNX-only ones."""
    return (*(q for q in tflite.quantization_modes() if q != "fp32"), *onnx_export.onnx_quantization_modes())


def needs_calibration(q: str) -> bool:
    """Whether quantization mode ``q`` calibrates activation ranges (so needs calibration data)."""
    return tflite.is_full_integer(q) or q in onnx_export.onnx_quantization_modes()


def _onnx_variant(q: str) -> bool:
    """TFLite variants that are also converted to ONNX: float32 and full-integer ones."""
    return q == "fp32" or tflite.is_full_integer(q)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _chunks(x: np.ndarray, size: int, exact: bool) -> list[np.ndarray]:
    out = [x[i : i + size] for i in range(0, len(x), size)]
    return [c for c in out if not exact or len(c) == size]


def _compare(
    run: Callable[[np.ndarray], np.ndarray],
    inputs: Sequence[np.ndarray],
    refs: Sequence[np.ndarray],
) -> tuple[float, float, float | None]:
    abs_diff, scale, agree, total = 0.0, 0.0, 0, 0
    classify = all(r.ndim == 2 for r in refs)
    for x, ref in zip(inputs, refs, strict=True):
        y = np.asarray(run(x), dtype=np.float64)
        ref64 = np.asarray(ref, dtype=np.float64)
        if y.shape != ref64.shape:
            raise AssertionError(f"artifact output shape {y.shape} != JAX output {ref64.shape}")
        abs_diff = max(abs_diff, float(np.max(np.abs(y - ref64))))
        scale = max(scale, float(np.max(np.abs(ref64))))
        if classify:
            agree += int(np.sum(y.argmax(-1) == ref64.argmax(-1)))
            total += len(y)
    rel = abs_diff / scale if scale > 0 else abs_diff
    return abs_diff, rel, (agree / total if classify and total else None)


@contextlib.contextmanager
def _producing(artifact: str, out_dir: str) -> Any:
    """Names the artifact being produced on any error, and says the previous set is intact."""
    try:
        yield
    except Exception as err:
        err.add_note(
            f"slimjax export: failed while producing {artifact}; nothing of this export was moved "
            f"into {out_dir}, which still holds the previous export set"
        )
        raise


def _range_agreement(runner: tflite.TFLiteRunner, ranges: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """Compares deployed int8 activation ranges with given (learned) ``(min, max)`` ranges."""
    details = [d for d in runner.tensor_details() if d["dtype"] == np.int8]
    out: dict[str, Any] = {}
    for pattern, (lo, hi) in ranges.items():
        rx = re.compile(pattern)
        matches = []
        for d in details:
            scale, zp = d["quantization"]
            if scale and rx.search(d["name"]):
                dep_lo, dep_hi = scale * (-128 - zp), scale * (127 - zp)
                width = max(hi - lo, 1e-12)
                err = max(abs(dep_lo - lo), abs(dep_hi - hi)) / width
                matches.append({"tensor": d["name"], "deployed": [dep_lo, dep_hi], "rel_err": err})
        out[pattern] = {"learned": [lo, hi], "matches": matches}
    return out


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
    latency_repeats: int = 30,
    num_threads: int = 1,
    name: str = "model",
    onnx_opset: int = onnx_export.DEFAULT_OPSET,
    use_deploy_hooks: bool = True,
    tvm_tuning_trials: int = 0,
    fusion: bool = False,
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
      formats: any of ``"stablehlo"``, ``"tflite"``, ``"onnx"``, ``"tvm"``. ONNX is converted from the
        TFLite flatbuffer (jax2tf's ``XlaCallModule`` cannot be converted by tf2onnx directly).
        ``"tvm"`` (needs ``"onnx"``) compiles every ONNX file with Apache TVM Relax for the host
        CPU into ``{name}_{variant}_tvm.so`` (:mod:`research.export.tvm`); a quantized file that
        TVM rejects is reported in ``notes`` with TVM's error.
      out_dir: directory for ``{name}.stablehlo`` (+ ``.json`` manifest),
        ``{name}_{variant}.tflite`` and ``{name}_{variant}.onnx``.
      quantize: None, or one or several of ``"fp16"``, ``"dynamic_int8"``, ``"int8"``,
        ``"int8_dense_per_tensor"``, ``"int8_per_tensor"`` (TFLite modes, see
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
      min_top1_agreement: an artifact whose top-1 agreement with JAX (runtime or reference) is
        below this gets a warning naming the likely cause (for float32 artifacts also a max
        relative difference above 1e-4).

    Returns:
      An :class:`ExportReport`; ``report.table()`` prints it.

    Raises:
      ValueError: unknown format or quantization mode, int8 without calibration, or an ONNX-only
        mode without ``"onnx"`` in ``formats``.
      UnsupportedOpError: an operation cannot be converted; names the JAX primitive and layer,
        and the requested formats that need the failing conversion (ONNX is converted from
        TFLite).
      ImportError: TensorFlow/tf2onnx/onnx/onnxruntime missing (``pip install
        'slimjax[export]'``).

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
    bad = [f for f in formats if f not in (*FORMATS, *OPTIONAL_FORMATS)]
    if bad or not formats:
        raise ValueError(f"formats={formats!r} contains {bad}; choose from {(*FORMATS, *OPTIONAL_FORMATS)}")
    if "tvm" in formats and "onnx" not in formats:
        raise ValueError(f"formats={formats!r}: 'tvm' compiles the ONNX artifacts; add 'onnx' to formats")
    if quantize is None:
        variants: list[str] = ["fp32"]
    else:
        qs = [quantize] if isinstance(quantize, str) else list(quantize)
        variants = ["fp32", *[q for q in dict.fromkeys(qs) if q != "fp32"]]
    onnx_only = onnx_export.onnx_quantization_modes()
    known = quantize_modes()
    unknown = [q for q in variants if q != "fp32" and q not in known]
    if unknown:
        raise ValueError(f"quantize={quantize!r}: {unknown} unknown; use None or some of {known}")
    for q in variants:
        if needs_calibration(q) and calibration is None:
            raise ValueError(
                f"quantize={q!r} needs calibration=<array (N, *input_shape[1:])> for the "
                "activation ranges; pass a few hundred training inputs, or use "
                "quantize='dynamic_int8'"
            )
        if q in onnx_only and "onnx" not in formats:
            raise ValueError(f"quantize={q!r} writes an ONNX file only; add 'onnx' to formats={formats!r}")
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
    convert_fn = inference_fn(convert_model)

    # Inputs to check on: the sample, eval data in sample-sized batches, and a second batch size.
    bsz = sample.shape[0] if sample.ndim else 1
    inputs = [sample]
    if eval_data is not None:
        inputs += _chunks(np.asarray(eval_data, sample.dtype), bsz, exact=not batch_polymorphic)
    if batch_polymorphic and sample.ndim:
        other = 1 if bsz != 1 else 3
        inputs.append(np.resize(sample, (other, *sample.shape[1:])).astype(sample.dtype))
    refs = [np.asarray(jfn(x)) for x in inputs]
    batch_sizes = tuple(sorted({int(x.shape[0]) if x.ndim else 1 for x in inputs}))
    num_checked = sum(int(x.shape[0]) if x.ndim else 1 for x in inputs)

    jax_ms = median_ms(lambda: jfn(sample).block_until_ready(), latency_repeats)
    params = nnx.state(model) if isinstance(model, nnx.Module) else {}
    leaves = [np.asarray(v) for v in jax.tree.leaves(params) if hasattr(v, "dtype")]
    param_bytes = int(sum(v.nbytes for v in leaves))
    n_params = sum(v.size for v in leaves)
    zeros = sum(int(np.sum(v == 0)) for v in leaves if np.issubdtype(v.dtype, np.floating))
    zero_frac = zeros / n_params if n_params else 0.0
    cpu = cpu_lib.cpu_int8()
    cpu_text = str(cpu)
    if "onnx" in formats:  # measured, not inferred from the flags
        cpu = dataclasses.replace(cpu, u8s8_saturates=onnx_export.fused_int8_saturates())
        cpu_text += "; onnxruntime fused int8 kernels " + (
            "saturate (16-bit pair sums)" if cpu.u8s8_saturates else "exact (32-bit sums)"
        )

    artifacts: list[ArtifactReport] = []

    def agreement(runtime: str, run: Callable[[np.ndarray], np.ndarray]) -> Agreement:
        abs_d, rel_d, top1 = _compare(run, inputs, refs)
        return Agreement(runtime=runtime, max_abs_diff=abs_d, max_rel_diff=rel_d, top1_agreement=top1)

    def record(
        art_name: str,
        fmt: str,
        q: str,
        path: str,
        runtime: str,
        run: Callable[[np.ndarray], np.ndarray],
        extra: dict[str, Any],
        reference: Agreement | None = None,
    ) -> None:
        got = agreement(runtime, run)
        ms = median_ms(lambda: run(sample), latency_repeats)
        artifacts.append(
            ArtifactReport(
                name=art_name,
                format=fmt,
                quantize=q,
                path=path,
                runtime=runtime,
                size_bytes=os.path.getsize(path),
                gzip_bytes=gzip_size(path),
                max_abs_diff=got.max_abs_diff,
                max_rel_diff=got.max_rel_diff,
                top1_agreement=got.top1_agreement,
                latency_ms=ms,
                batch_sizes=batch_sizes,
                extra=extra,
                reference=reference,
            )
        )

    def record_onnx(art_name: str, q: str, path: str, proto: Any, extra: dict[str, Any]) -> None:
        qdq = onnx_export.qdq_summary(proto)
        extra = {"qdq": qdq, **extra}
        reference = None
        if qdq["quantize_linear"] + qdq["dequantize_linear"]:
            # The file as written (each Q/DQ in float) and, where onnxruntime's fused u8s8 kernels
            # saturate, with its non-saturating u8u8 kernels (session.x64quantprecision=1).
            as_written = onnx_export.OnnxRunner(path, num_threads=num_threads, optimization="none")
            reference = agreement(f"{ort_name}, {as_written.description}", as_written)
            if cpu.u8s8_saturates:
                try:
                    precise = onnx_export.OnnxRunner(path, num_threads=num_threads, x64_quant_precision=True)
                    extra["x64quantprecision"] = dataclasses.asdict(
                        agreement(f"{ort_name}, {precise.description}", precise)
                    )
                except Exception as err:  # noqa: BLE001 - onnxruntime refuses some graphs with it
                    extra["x64quantprecision"] = {"error": f"{type(err).__name__}: {str(err)[-300:]}"}
        runner = onnx_export.OnnxRunner(path, num_threads=num_threads)
        record(art_name, "onnx", q, path, ort_name, runner, extra, reference)

    # Everything is written to a staging directory and moved into out_dir together at the end.
    stage = staging_dir(out_dir, name)
    litert = f"LiteRT {_version('ai-edge-litert')}"
    ort_name = f"onnxruntime {_version('onnxruntime')}"
    try:
        if "stablehlo" in formats:
            with _producing(f"{name}.stablehlo (stablehlo)", out_dir):
                path = os.path.join(stage, f"{name}.stablehlo")
                spec = stablehlo.input_spec(sample, batch_polymorphic)
                info = stablehlo.export_stablehlo(fn, spec, path)
                loaded = stablehlo.load_stablehlo(path)
                record(
                    "stablehlo",
                    "stablehlo",
                    "fp32",
                    path,
                    f"jax.export {jax.__version__}",
                    lambda x: np.asarray(loaded(x)),
                    {"manifest": info},
                )

        via_tflite = [f for f in ("tflite", "onnx") if f in formats]
        for q in variants if via_tflite else ():
            if q in onnx_only:
                continue
            with _producing(f"the {q} TFLite conversion (needed by {' and '.join(via_tflite)})", out_dir):
                try:
                    blob = tflite.to_tflite(
                        convert_fn,
                        sample,
                        quantize=q,
                        calibration=calibration,
                        batch_polymorphic=batch_polymorphic,
                        batch_route=batch_route,
                        model=convert_model,
                    )
                except UnsupportedOpError as err:
                    raise err.retarget(via_tflite[0], via="tflite", drop=via_tflite) from err
            if "tflite" in formats:
                with _producing(f"{name}_{q}.tflite (tflite_{q})", out_dir):
                    path = os.path.join(stage, f"{name}_{q}.tflite")
                    write_bytes_atomic(path, blob, lambda p: tflite.TFLiteRunner(p)(sample))
                    runner = tflite.TFLiteRunner(path, num_threads=num_threads)
                    extra: dict[str, Any] = {
                        "size_breakdown": tflite.size_breakdown(blob),
                        "batch_route": tflite.batch_route(blob),
                    }
                    if tflite.is_full_integer(q) and activation_ranges:
                        extra["range_agreement"] = _range_agreement(runner, activation_ranges)
                    record(f"tflite_{q}", "tflite", q, path, litert, runner, extra)
            if "onnx" in formats and _onnx_variant(q):
                with _producing(f"{name}_{q}.onnx (onnx_{q}, tf2onnx from the TFLite file)", out_dir):
                    proto = onnx_export.tflite_to_onnx(blob, opset=onnx_opset)
                    path = os.path.join(stage, f"{name}_{q}.onnx")
                    onnx_export.write_onnx(proto, path)
                    record_onnx(f"onnx_{q}", q, path, proto, {"opset": onnx_opset})
        for q in variants:
            if q not in onnx_only:
                continue
            with _producing(f"{name}_{q}.onnx (onnx_{q}, from {name}_fp32.onnx)", out_dir):
                path = os.path.join(stage, f"{name}_{q}.onnx")
                proto = onnx_export.onnx_quantize(
                    q, os.path.join(stage, f"{name}_fp32.onnx"), path, np.asarray(calibration)
                )
                record_onnx(f"onnx_{q}", q, path, proto, {"from": f"{name}_fp32.onnx"})

        if "tvm" in formats:
            from research.export import tvm as tvm_lib  # noqa: PLC0415 (optional dependency)

            onnx_files = [(a.quantize, a.path) for a in artifacts if a.format == "onnx"]
            with _producing("the TVM libraries (tvm, compiled from the ONNX files)", out_dir):
                built, tvm_notes = tvm_lib.build_artifacts(
                    onnx_files,
                    stage,
                    name,
                    sample,
                    num_threads=num_threads,
                    tuning_trials=tvm_tuning_trials,
                    latency_repeats=latency_repeats,
                )
            notes += tvm_notes
            for t in built:
                record(t.name, "tvm", t.quantize, t.path, t.runtime, t.runner, t.extra)

        moved = commit_export_set(stage, out_dir, name, {"formats": list(formats), "quantize": variants})
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(stage)
    artifacts = [dataclasses.replace(a, path=moved[a.path]) for a in artifacts]

    found = agreement_warnings(artifacts, min_top1_agreement, cpu, fp32_drift=deployable is None)
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
        num_checked=num_checked,
        artifacts=tuple(artifacts),
        notes=tuple(notes),
        fusion=fusion_dict,
        cpu=cpu_text,
        warnings=tuple(found),
    )
