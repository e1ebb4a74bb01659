"""Deployment latency as a number: a model (or an exported file) timed in a chosen runtime.

:func:`artifact_latency` is the objective/constraint hook for ``slimjax tune``: it measures what
the compressed model costs in the runtime it will ship in (batch and threads chosen), not FLOPs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

RUNTIMES = ("jax", "tflite", "onnxruntime", "tvm", "tensorrt")


def median_ms(call: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``call()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _runner(path: str, runtime: str, threads: int) -> Callable[[np.ndarray], Any]:
    if runtime == "tflite":
        from research.export.tflite import TFLiteRunner  # noqa: PLC0415

        return TFLiteRunner(path, num_threads=threads)
    if runtime == "onnxruntime":
        from research.export.onnx_export import OnnxRunner  # noqa: PLC0415

        return OnnxRunner(path, num_threads=threads)
    if runtime == "tvm":
        from research.export import tvm as tvm_lib  # noqa: PLC0415

        if path.endswith(".onnx"):
            lib = os.path.join(tempfile.mkdtemp(prefix="slimjax_tvm_"), "model_tvm.so")
            tvm_lib.export_tvm(path, lib)
            path = lib
        return tvm_lib.TVMRunner(path, num_threads=threads)
    if runtime == "tensorrt":
        from research.export import tensorrt as trt_lib  # noqa: PLC0415

        with open(path, "rb") as f:
            blob = f.read()
        return trt_lib.TensorRTRunner(blob if not path.endswith(".onnx") else trt_lib.build_engine(path))
    raise ValueError(f"runtime={runtime!r} cannot run a file; choose from {RUNTIMES[1:]}")


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
      runtime: ``"jax"`` (jitted model), ``"tflite"``, ``"onnxruntime"``, ``"tvm"`` or ``"tensorrt"``.
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
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; choose from {RUNTIMES}")
    if sample is None:
        raise ValueError("artifact_latency needs sample=<one input batch> to fix the input shape and dtype")
    x = np.asarray(sample)
    x = np.resize(x, (batch, *x.shape[1:])).astype(x.dtype)
    if isinstance(model_or_path, str | os.PathLike):
        run = _runner(os.fspath(model_or_path), runtime, threads)
        return median_ms(lambda: run(x), repeats, warmup)
    if runtime == "jax":
        import jax  # noqa: PLC0415

        from research.export._trace import inference_fn  # noqa: PLC0415

        if quantize != "fp32":
            raise ValueError(f"runtime='jax' times the model as it is; quantize={quantize!r} needs a file runtime")
        fn = jax.jit(inference_fn(model_or_path))
        return median_ms(lambda: fn(x).block_until_ready(), repeats, warmup)
    from research.export.api import export  # noqa: PLC0415

    formats = {"tflite": ("tflite",), "onnxruntime": ("onnx",), "tvm": ("onnx", "tvm"), "tensorrt": ("onnx",)}[runtime]
    quant = None if quantize == "fp32" else (quantize,)
    with tempfile.TemporaryDirectory() as d:
        rep = export(
            model_or_path,
            x,
            formats=formats,
            out_dir=d,
            quantize=quant,
            calibration=calibration,
            latency_repeats=1,
            num_threads=threads,
        )
        key = {"tflite": "tflite", "onnxruntime": "onnx", "tvm": "tvm", "tensorrt": "onnx"}[runtime]
        path = rep[f"{key}_{quantize}"].path
        run = _runner(path, runtime, threads)
        return median_ms(lambda: run(x), repeats, warmup)
