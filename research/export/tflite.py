"""TFLite export via jax2tf and the TFLite converter, and a runner on the TFLite interpreter.

``jax2tf.convert`` wraps the StableHLO of the model in a TF function (an ``XlaCallModule`` op);
the TFLite converter legalizes that StableHLO to TFLite builtins. Quantization modes are a
registry (:func:`register_quantization`) of functions that configure the converter:

* ``"fp32"``: no quantization.
* ``"fp16"``: weights stored as float16, dequantized at load time.
* ``"dynamic_int8"``: int8 weights, float activations (dynamic-range quantization).
* ``"int8"``: full integer quantization; activation ranges are calibrated on a representative
  dataset (``calibration``). Inputs and outputs stay float32 (the model quantizes at entry and
  dequantizes at exit), so the artifact is a drop-in replacement for the float model. Kernels
  are quantized per output channel (the converter's default).
* ``"int8_dense_per_tensor"``: as ``"int8"``, but fully connected kernels get one scale per
  tensor (convolutions stay per channel). TFLite stores a float32 scale and an int64 zero point
  per channel for each kernel *and* for its int32 bias, 24 bytes per output channel; for a
  dense layer with fan-in ``n`` that is ``6 / n`` of its float32 weight bytes, which is what
  keeps small dense networks above 0.3x of their float32 file. Check the report's top-1
  agreement: a layer with very unequal output channels loses precision per tensor.

:func:`size_breakdown` splits a flatbuffer into constant data, quantization vectors and the
rest (graph, names), to show where an int8 file's bytes go.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from research.export import _deps
from research.export._trace import diagnose

ConfigureFn = Callable[[Any, "Callable[[], Iterator[list[np.ndarray]]] | None"], None]
_QUANTIZATIONS: dict[str, ConfigureFn] = {}
_FULL_INTEGER: set[str] = set()


def register_quantization(name: str, *, full_integer: bool = False) -> Callable[[ConfigureFn], ConfigureFn]:
    """Decorator registering a TFLite quantization mode; refuses duplicate names.

    The decorated function receives the ``TFLiteConverter`` and the representative-dataset
    generator (None when no calibration data was given) and configures the converter.

    Args:
      name: the mode's name, as passed to ``quantize=``.
      full_integer: the mode quantizes activations too, so it needs calibration data, its
        activation ranges are compared with learned ones, and its file is also converted to ONNX.
    """

    def deco(f: ConfigureFn) -> ConfigureFn:
        if name in _QUANTIZATIONS:
            raise ValueError(f"TFLite quantization {name!r} is already registered; pick a new name")
        _QUANTIZATIONS[name] = f
        if full_integer:
            _FULL_INTEGER.add(name)
        return f

    return deco


def quantization_modes() -> tuple[str, ...]:
    """Names of the registered quantization modes."""
    return tuple(_QUANTIZATIONS)


def is_full_integer(mode: str) -> bool:
    """Whether ``mode`` quantizes activations (and so needs calibration data)."""
    return mode in _FULL_INTEGER


@register_quantization("fp32")
def _fp32(converter: Any, rep: Any) -> None:
    del converter, rep


@register_quantization("fp16")
def _fp16(converter: Any, rep: Any) -> None:
    del rep
    tf = _deps.tensorflow()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


@register_quantization("dynamic_int8")
def _dynamic_int8(converter: Any, rep: Any) -> None:
    del rep
    tf = _deps.tensorflow()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


@register_quantization("int8", full_integer=True)
def _int8(converter: Any, rep: Any) -> None:
    if rep is None:
        raise ValueError(
            "quantize='int8' needs calibration data for the activation ranges; pass "
            "calibration=<array of inputs, shape (N, *input_shape[1:])> (a few hundred samples "
            "of the training data), or use quantize='dynamic_int8'"
        )
    tf = _deps.tensorflow()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = rep
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


@register_quantization("int8_dense_per_tensor", full_integer=True)
def _int8_dense_per_tensor(converter: Any, rep: Any) -> None:
    _int8(converter, rep)
    # The converter's switch for per-tensor fully connected kernels (TF >= 2.16; private name).
    if not hasattr(converter, "_experimental_disable_per_channel_quantization_for_dense_layers"):
        raise ImportError(
            "quantize='int8_dense_per_tensor' needs a TFLite converter with per-tensor dense "
            "kernels (tensorflow >= 2.16); upgrade tensorflow or use quantize='int8'"
        )
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True


def _tf_function(fn: Callable[..., Any], specs: Sequence[jax.ShapeDtypeStruct], batch_polymorphic: bool) -> Any:
    tf = _deps.tensorflow()
    jax2tf = _deps.jax2tf()
    poly = ["(b, ...)" if batch_polymorphic and len(s.shape) else None for s in specs]
    tf_sig = [
        tf.TensorSpec(
            [None, *s.shape[1:]] if batch_polymorphic and len(s.shape) else list(s.shape),
            tf.as_dtype(np.dtype(s.dtype)),
        )
        for s in specs
    ]
    converted = jax2tf.convert(fn, polymorphic_shapes=poly, with_gradient=False)
    return tf.function(converted, autograph=False, input_signature=tf_sig)


def _convert(
    fn: Callable[..., Any],
    specs: Sequence[jax.ShapeDtypeStruct],
    batch_polymorphic: bool,
    quantize: str,
    rep: Callable[[], Iterator[list[np.ndarray]]] | None,
) -> bytes:
    tf = _deps.tensorflow()
    tf_fn = _tf_function(fn, specs, batch_polymorphic)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([tf_fn.get_concrete_function()], tf_fn)
    _QUANTIZATIONS[quantize](converter, rep)
    return converter.convert()


def size_breakdown(blob: bytes) -> dict[str, int]:
    """Where the bytes of a ``.tflite`` flatbuffer go.

    Args:
      blob: the flatbuffer's bytes.

    Returns:
      ``{"total", "constants", "quant_vectors", "quant_entries", "other"}``: constant tensor data
      (weights, biases, shape constants), the quantization vectors (a float32 scale and an int64
      zero point per entry, plus min/max when present), the number of scale entries, and the
      remainder (operators, tensor tables and names, flatbuffer offsets, metadata).

    Example:
      >>> parts = size_breakdown(open("model_int8.tflite", "rb").read())  # doctest: +SKIP
    """
    _deps.tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415 (optional dependency)

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    constants = sum(0 if b.data is None else len(b.data) for b in m.buffers)
    quant, entries = 0, 0
    for sg in m.subgraphs:
        for t in sg.tensors:
            q = t.quantization
            if q is None:
                continue
            for vec, width in ((q.scale, 4), (q.zeroPoint, 8), (q.min, 4), (q.max, 4)):
                quant += 0 if vec is None else width * len(vec)
            entries += 0 if q.scale is None else len(q.scale)
    return {
        "total": len(blob),
        "constants": int(constants),
        "quant_vectors": int(quant),
        "quant_entries": int(entries),
        "other": int(len(blob) - constants - quant),
    }


def calibration_batches(
    calibration: np.ndarray, batch_size: int, max_samples: int = 512
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Returns a representative-dataset generator over ``calibration`` in fixed-size batches."""
    data = np.asarray(calibration)[:max_samples]
    n = (len(data) // batch_size) * batch_size
    if n == 0:
        raise ValueError(
            f"calibration has {len(data)} samples, fewer than one batch of {batch_size}; "
            f"pass at least {batch_size} samples"
        )

    def gen() -> Iterator[list[np.ndarray]]:
        for i in range(0, n, batch_size):
            yield [data[i : i + batch_size]]

    return gen


def to_tflite(
    fn: Callable[[jax.Array], jax.Array],
    sample: np.ndarray,
    *,
    quantize: str = "fp32",
    calibration: np.ndarray | None = None,
    batch_polymorphic: bool = True,
    model: Any = None,
) -> bytes:
    """Converts ``fn`` to a TFLite flatbuffer.

    Args:
      fn: the inference function ``x -> y``.
      sample: an input (fixes dtype and non-batch dims).
      quantize: a registered mode (see :func:`quantization_modes`).
      calibration: inputs for the representative dataset (needed by ``"int8"``).
      batch_polymorphic: keep the leading dimension variable (``None`` in TFLite).
      model: the NNX model, only used to name the layer in an unsupported-op error.

    Returns:
      The ``.tflite`` bytes.

    Raises:
      ValueError: unknown ``quantize`` or missing calibration.
      UnsupportedOpError: an operation has no TFLite equivalent; names the JAX primitive.
    """
    if quantize not in _QUANTIZATIONS:
        raise ValueError(
            f"quantize={quantize!r} is not a TFLite quantization mode; use one of "
            f"{quantization_modes()} (or register one with register_quantization)"
        )
    sample = np.asarray(sample)
    spec = jax.ShapeDtypeStruct(sample.shape, sample.dtype)
    rep = None
    if calibration is not None:
        rep = calibration_batches(calibration, 8 if batch_polymorphic else sample.shape[0])
    try:
        return _convert(fn, [spec], batch_polymorphic, quantize, rep)
    except (ValueError, TypeError, ImportError):
        raise
    except Exception as err:  # tf.lite ConverterError (its class moves between TF releases)

        def probe(f: Callable[..., Any], specs: list[jax.ShapeDtypeStruct]) -> None:
            _convert(f, specs, False, "fp32", None)

        raise diagnose("tflite", model, fn, sample, err, probe) from err


class TFLiteRunner:
    """Runs a ``.tflite`` model in the TFLite (LiteRT) interpreter, resizing the batch as needed.

    Args:
      model: path to a ``.tflite`` file, or its bytes.
      num_threads: interpreter threads (1 makes latencies comparable across runtimes).
    """

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int = 1):
        cls = _deps.tflite_interpreter_class()
        if isinstance(model, bytes | bytearray):
            self._interp = cls(model_content=bytes(model), num_threads=num_threads)
        else:
            self._interp = cls(model_path=os.fspath(model), num_threads=num_threads)
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self._shape: tuple[int, ...] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self._in["dtype"])
        if self._shape != x.shape:
            self._interp.resize_tensor_input(self._in["index"], list(x.shape), strict=False)
            self._interp.allocate_tensors()
            self._shape = x.shape
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        return self._interp.get_tensor(self._out["index"]).copy()

    def tensor_details(self) -> list[dict[str, Any]]:
        """The interpreter's tensor details (names, dtypes, quantization parameters)."""
        return self._interp.get_tensor_details()
