"""Deployment latency as a number: a model (or an exported file) timed in a chosen runtime.

:func:`artifact_latency` is the objective/constraint hook for ``slimjax tune``: it measures what
the compressed model costs in the runtime it will ship in (batch and threads chosen), not FLOPs.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from research.export import formats as formats_lib
from research.metrics import median_ms


def runtimes() -> tuple[str, ...]:
    """``"jax"`` (the jitted model) and the runtime of every registered export format."""
    from research.export import api  # noqa: F401, PLC0415 (registers the built-in formats)

    return ("jax", *formats_lib.runtimes())


def artifact_latency(
    model_or_path: Any,
    runtime: str = "tflite",
    *,
    sample: np.ndarray | None = None,
    batch: int = 1,
    threads: int = 1,
    quantize: str = "fp32",
    calibration: np.ndarray | None = None,
    repeats: int = 30,
    warmup: int = 3,
) -> float:
    """Median latency in milliseconds of a model, or an exported file, in one runtime.

    Args:
      model_or_path: a ``flax.nnx`` model (exported here to what ``runtime`` runs), or a file:
        ``.tflite`` (LiteRT), ``.onnx`` (onnxruntime; compiled first for ``"tvm"``; built into an
        engine for ``"tensorrt"``), ``*_tvm.so`` (TVM) or ``.plan`` (TensorRT).
      runtime: ``"jax"`` (jitted model) or the runtime of a registered export format
        (:func:`runtimes`: ``"tflite"``, ``"onnxruntime"``, ``"tvm"``, ``"tensorrt"``, ``"jax.export"``...).
      sample: one input (its rows are repeated or cut to ``batch``); required for a model, and
        for a file it fixes the input shape and dtype.
      batch: batch size timed.
      threads: runtime threads (TFLite, onnxruntime, TVM's pool).
      quantize: for a model: ``"fp32"`` or a full-integer mode (``"int8"``, needs ``calibration``).
      calibration: representative inputs for int8.
      repeats: timed calls (the median is returned).
      warmup: untimed calls first.

    Returns:
      Milliseconds per call.

    Raises:
      ValueError: unknown runtime, no ``sample``, or a model with a runtime it cannot be exported to.

    Example:
      >>> ms = artifact_latency(model, "tflite", sample=x_test[:1], batch=1, threads=1)  # doctest: +SKIP
    """
    known = runtimes()
    if runtime not in known:
        raise ValueError(f"runtime={runtime!r}; choose from {known}")
    if sample is None:
        raise ValueError("artifact_latency needs sample=<one input batch> to fix the input shape and dtype")
    x = np.asarray(sample)
    x = np.resize(x, (batch, *x.shape[1:])).astype(x.dtype)
    if runtime == "jax":
        if isinstance(model_or_path, str | os.PathLike):
            raise ValueError(
                f"runtime='jax' times a model; {os.fspath(model_or_path)!r} is a file: choose from {known[1:]}"
            )
        import jax  # noqa: PLC0415

        from research.export._trace import inference_fn  # noqa: PLC0415

        if quantize != "fp32":
            raise ValueError(f"runtime='jax' times the model as it is; quantize={quantize!r} needs a file runtime")
        fn = jax.jit(inference_fn(model_or_path))
        return median_ms(lambda: fn(x).block_until_ready(), repeats, warmup)
    fmt = formats_lib.format_for_runtime(runtime)
    if isinstance(model_or_path, str | os.PathLike):
        run = fmt.load(os.fspath(model_or_path), threads)
        return median_ms(lambda: run(x), repeats, warmup)
    from research.export.api import export  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as d:
        rep = export(
            model_or_path,
            x,
            formats=(*fmt.requires, fmt.name),
            out_dir=d,
            quantize=None if quantize == "fp32" else (quantize,),
            calibration=calibration,
            latency_repeats=1,
            num_threads=threads,
        )
        key = "stablehlo" if fmt.name == "stablehlo" else f"{fmt.name}_{quantize}"
        if key not in {a.name for a in rep.artifacts}:
            raise ValueError(f"runtime={runtime!r} has no {quantize!r} variant; it writes {fmt.modes()}")
        run = fmt.load(rep[key].path, threads)
        return median_ms(lambda: run(x), repeats, warmup)
