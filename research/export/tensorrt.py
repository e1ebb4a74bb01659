"""TensorRT engines from the exported ONNX files: fp32, fp16 and int8 (symmetric Q/DQ), checked vs JAX.

Needs an NVIDIA GPU with a driver, ``pip install tensorrt cuda-python`` (``slimjax[tensorrt]``).
:func:`skip_reason` says why TensorRT cannot run here (None when it can); every function that
needs it raises an ``ImportError``/``RuntimeError`` with that reason.

* fp32: the float32 ONNX file, no precision flags (TF32 disabled, so fp32 is fp32);
* fp16: the float32 ONNX file with ``BuilderFlag.FP16``;
* int8: the symmetric Q/DQ file (``quantize="int8_qdq_symmetric"``): TensorRT's explicit
  quantization takes the Q/DQ scales as written (zero point 0 only, which is checked first).

A variable-batch ONNX file gets one optimisation profile (batch 1 .. ``max_batch``, optimum
``opt_batch``). Script (run on a GPU machine)::

    python -m research.export.tensorrt --model resnet20 [--max-batch 64]

trains the zoo model briefly on digits, exports it, builds the three engines and prints parity
(max relative difference, top-1 agreement) and latency at batch 1 and 32 next to JAX, LiteRT and
onnxruntime, with the GPU's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from research.export import formats as formats_lib
from research.export._io import write_bytes_atomic
from research.export.formats import ExportFormat
from research.export.formats import ExportJob
from research.export.formats import Produced
from research.export.formats import register_format
from research.metrics import median_ms

INSTALL_HINT = "pip install 'slimjax[tensorrt]' (tensorrt and cuda-python) on a machine with an NVIDIA GPU and driver"
PRECISIONS = ("fp32", "fp16", "int8")


def _cudart() -> Any:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise ImportError(f"TensorRT engines need cuda-python for device memory: {INSTALL_HINT}")


def _check(result: Any) -> Any:
    """Unpacks a cuda-python ``(err, *values)`` tuple, raising on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def skip_reason() -> str | None:
    """Why TensorRT cannot run on this machine (package or GPU missing), or None when it can."""
    try:
        importlib.import_module("tensorrt")
    except ImportError as err:
        return f"tensorrt is not installed ({err}); {INSTALL_HINT}"
    try:
        cudart = _cudart()
        count = _check(cudart.cudaGetDeviceCount())
    except (ImportError, RuntimeError) as err:
        return f"no usable CUDA GPU: {err}"
    if count < 1:
        return "no CUDA GPU visible (cudaGetDeviceCount() = 0)"
    return None


def _trt() -> Any:
    reason = skip_reason()
    if reason is not None:
        raise ImportError(f"TensorRT cannot run here: {reason}")
    return importlib.import_module("tensorrt")


def gpu_name() -> str:
    """The CUDA device 0's name (e.g. ``"NVIDIA H200"``)."""
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


def check_precision_file(precision: str, onnx_path: str | os.PathLike) -> None:
    """Refuses an int8 build from a file that is not symmetric Q/DQ (TensorRT needs zero point 0).

    Raises:
      ValueError: unknown precision, or int8 from a file without symmetric int8 Q/DQ.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose from {PRECISIONS}")
    if precision != "int8":
        return
    from research.export import _deps  # noqa: PLC0415
    from research.export.onnx_export import qdq_summary  # noqa: PLC0415

    summary = qdq_summary(_deps.onnx().load(os.fspath(onnx_path)))
    if not summary["tensorrt_symmetric"]:
        raise ValueError(
            f"{os.fspath(onnx_path)} is not symmetric int8 Q/DQ ({summary}); TensorRT's int8 needs zero points 0: "
            "export with quantize='int8_qdq_symmetric' and build from model_int8_qdq_symmetric.onnx"
        )


def build_engine(
    onnx_path: str | os.PathLike,
    precision: str = "fp32",
    *,
    max_batch: int = 64,
    opt_batch: int = 32,
    workspace_bytes: int = 1 << 30,
) -> bytes:
    """Builds a serialized TensorRT engine from an ONNX file with the ``tensorrt`` Python API.

    Args:
      onnx_path: the float32 ONNX file (fp32/fp16) or the symmetric Q/DQ file (int8).
      precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
      max_batch: the largest batch of the optimisation profile of a variable-batch file.
      opt_batch: the batch the profile is tuned for.
      workspace_bytes: TensorRT's workspace memory pool limit.

    Returns:
      The serialized engine (write it to ``model_<precision>.plan``).

    Raises:
      ImportError: TensorRT or a GPU is missing (the message says which).
      ValueError: int8 from a file without symmetric Q/DQ; an ONNX file TensorRT cannot parse
        (the parser's errors are listed).
      RuntimeError: the build failed.
    """
    check_precision_file(precision, onnx_path)
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT could not parse {os.fspath(onnx_path)}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without Q/DQ may run in fp16
    if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if shape and shape[0] == -1:
        rest = shape[1:]
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, *rest), (min(opt_batch, max_batch), *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build a {precision} engine from {os.fspath(onnx_path)} (see its log)")
    return bytes(engine)


class TensorRTRunner:
    """Runs a serialized engine on numpy inputs (host -> device copy, execute, device -> host).

    Args:
      engine: the bytes from :func:`build_engine` (or a ``.plan`` file's).
    """

    def __init__(self, engine: bytes):
        trt = _trt()
        self._trt = trt
        self._cudart = _cudart()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        self._ctx = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self._in = next(n for n in names if self._engine.get_tensor_mode(n) == mode)
        self._out = next(n for n in names if self._engine.get_tensor_mode(n) != mode)
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = _check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cudart, trt = self._cudart, self._trt
        x = np.ascontiguousarray(x, dtype=trt.nptype(self._engine.get_tensor_dtype(self._in)))
        self._ctx.set_input_shape(self._in, x.shape)
        out = np.empty(
            tuple(self._ctx.get_tensor_shape(self._out)), trt.nptype(self._engine.get_tensor_dtype(self._out))
        )
        d_in, d_out = self._buffer(self._in, x.nbytes), self._buffer(self._out, out.nbytes)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
        self._ctx.set_tensor_address(self._in, d_in)
        self._ctx.set_tensor_address(self._out, d_out)
        if not self._ctx.execute_async_v3(self._stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        return out

    def __del__(self) -> None:
        cudart = getattr(self, "_cudart", None)
        for ptr, _ in getattr(self, "_buffers", {}).values():
            if cudart is not None:
                cudart.cudaFree(ptr)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineResult:
    """One engine: precision, source file, parity with JAX and latency per batch size."""

    precision: str
    onnx_path: str
    engine_bytes: int
    build_s: float
    max_rel_diff: float
    top1_agreement: float
    latency_ms: dict[int, float]


def engine_parity(
    runner: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, reference: np.ndarray, batch: int = 32
) -> tuple[float, float]:
    """``(max relative difference, top-1 agreement)`` of ``runner`` against ``reference`` on ``inputs``.

    The relative difference is the largest absolute difference over the reference's largest
    magnitude, as in the export report.
    """
    outs = np.concatenate([runner(inputs[i : i + batch]) for i in range(0, len(inputs), batch)]).astype(np.float64)
    ref = np.asarray(reference, np.float64)
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(outs - ref))) / scale, float(np.mean(outs.argmax(-1) == ref.argmax(-1)))


def build_and_check(
    onnx_files: dict[str, str],
    inputs: np.ndarray,
    reference: np.ndarray,
    *,
    batches: tuple[int, ...] = (1, 32),
    repeats: int = 50,
    out_dir: str | None = None,
) -> list[EngineResult]:
    """Builds one engine per precision, checks it against JAX and times it.

    Args:
      onnx_files: precision -> ONNX file (``{"fp32": ..., "fp16": <fp32 file>, "int8": <symmetric Q/DQ file>}``).
      inputs: evaluation inputs; ``reference``: JAX's outputs on them.
      batches: batch sizes to time.
      repeats: timed calls per latency.
      out_dir: where to write ``model_<precision>.plan`` (not written when None).

    Returns:
      One :class:`EngineResult` per precision.
    """
    results = []
    for precision, path in onnx_files.items():
        t0 = time.perf_counter()
        engine = build_engine(path, precision, max_batch=max(max(batches), 32))
        build_s = time.perf_counter() - t0
        if out_dir is not None:
            write_bytes_atomic(os.path.join(out_dir, f"model_{precision}.plan"), engine)
        runner = TensorRTRunner(engine)
        rel, top1 = engine_parity(runner, inputs, reference)
        latency = {b: median_ms(lambda b=b, r=runner: r(inputs[:b]), repeats, warmup=5) for b in batches}
        results.append(
            EngineResult(
                precision=precision,
                onnx_path=path,
                engine_bytes=len(engine),
                build_s=build_s,
                max_rel_diff=rel,
                top1_agreement=top1,
                latency_ms=latency,
            )
        )
    return results


# Export variant -> (TensorRT precision, the ONNX variant its engine is built from).
_VARIANTS = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp32"), "int8_qdq_symmetric": ("int8", "int8_qdq_symmetric")}


@register_format
class TensorRTFormat(ExportFormat):
    """``model_{mode}.plan``: TensorRT engines built from the export's ONNX files, run on the GPU.

    Variants: ``fp32`` (the float32 ONNX file), ``fp16`` (the same file with ``BuilderFlag.FP16``)
    and ``int8_qdq_symmetric`` (the symmetric Q/DQ file, explicit quantization). Needs an NVIDIA
    GPU, ``tensorrt`` and ``cuda-python`` (:func:`skip_reason` says what is missing).
    """

    name = "tensorrt"
    requires = {"onnx": "builds its engines from the ONNX artifacts"}
    converted_from = "onnx"
    extension = ".plan"

    def modes(self) -> tuple[str, ...]:
        return tuple(_VARIANTS)

    def needs_calibration(self, mode: str) -> bool:
        return mode == "int8_qdq_symmetric"

    def unavailable(self) -> str | None:
        return skip_reason()

    def label(self, job: ExportJob, q: str) -> str:
        precision, source = _VARIANTS[q]
        return f"{job.name}_{q}.plan (tensorrt_{q}, a {precision} engine from {job.name}_{source}.onnx)"

    def produce(self, job: ExportJob, q: str) -> list[Produced]:
        precision, source = _VARIANTS[q]
        onnx_path = job.written("onnx")[source].path
        largest = max(int(x.shape[0]) if x.ndim else 1 for x in job.inputs)
        max_batch = max(64, largest)
        engine = build_engine(onnx_path, precision, max_batch=max_batch, opt_batch=min(32, max_batch))
        path = job.path(f"{job.name}_{q}.plan")
        write_bytes_atomic(path, engine, lambda p: self.load(p)(job.sample))
        runtime = f"TensorRT {formats_lib.dist_version('tensorrt')} on {gpu_name()}"
        extra = {"precision": precision, "from": os.path.basename(onnx_path), "max_batch": max_batch}
        return [
            Produced(name=f"tensorrt_{q}", quantize=q, path=path, runtime=runtime, run=self.load(path), extra=extra)
        ]

    def load(self, path: str, num_threads: int = 1) -> TensorRTRunner:
        """A runner for a ``.plan`` engine, or for an ``.onnx`` file (an fp32 engine is built first)."""
        del num_threads
        if path.endswith(".onnx"):
            return TensorRTRunner(build_engine(path))
        with open(path, "rb") as f:
            return TensorRTRunner(f.read())


def main(argv: list[str] | None = None) -> int:
    """``python -m research.export.tensorrt --model NAME``: engines for one zoo model, with the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--out", default="tensorrt_out")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        print(f"TensorRT skipped: {reason}")
        return 2
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from research.data import load_dataset  # noqa: PLC0415
    from research.export import export  # noqa: PLC0415
    from research.export import inference_fn  # noqa: PLC0415
    from research.nn import TINY_OPTIONS  # noqa: PLC0415
    from research.nn import build_model  # noqa: PLC0415
    from research.train import train_scan  # noqa: PLC0415

    data = load_dataset("digits", seed=0)
    flat = args.model == "cnn1d"
    x_train = data.x_train.reshape(len(data.x_train), -1) if flat else data.x_train
    x_test = data.x_test.reshape(len(data.x_test), -1) if flat else data.x_test
    model = build_model(
        args.model, input_shape=x_train.shape[1:], num_classes=10, rngs=nnx.Rngs(0), **TINY_OPTIONS.get(args.model, {})
    )
    train_scan(model, x_train, data.y_train, steps=150)
    rep = export(
        model,
        x_test[:32],
        formats=("tflite", "onnx"),
        out_dir=args.out,
        quantize=("int8_qdq_symmetric",),
        calibration=x_train[:256],
        eval_data=x_test,
    )
    ref = np.asarray(jax.jit(inference_fn(model))(x_test))
    files = {"fp32": rep["onnx_fp32"].path, "fp16": rep["onnx_fp32"].path, "int8": rep["onnx_int8_qdq_symmetric"].path}
    results = build_and_check(files, x_test, ref, repeats=args.repeats, out_dir=args.out)
    print(rep.table())
    print(f"\nTensorRT on {gpu_name()} ({args.model}, digits test split, {len(x_test)} inputs):")
    print("precision  max rel diff  top-1 agree  b1 ms   b32 ms  engine KiB  build s  onnx file")
    for r in results:
        print(
            f"{r.precision:<9}  {r.max_rel_diff:<12.2e}  {r.top1_agreement:<11.3f}  {r.latency_ms[1]:<6.3f}  "
            f"{r.latency_ms[32]:<6.3f}  {r.engine_bytes / 1024:<10.1f}  {r.build_s:<7.1f}  {os.path.basename(r.onnx_path)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
