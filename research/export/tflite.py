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
  are quantized per output channel (the converter's default). The activation ranges are the
  calibration minimum and maximum unless ``activation_calibration`` names another rule
  (``"percentile"``, ``"mse"``: :mod:`research.export.tflite_ranges`), as for the two modes below.
  In these three modes every last-axis ``nnx.LayerNorm`` and ``nnx.RMSNorm`` converts as one ``L2_NORMALIZATION``
  (:data:`L2_LAYERNORM_MODES`; ``format_options={"tflite": {"int8_layernorm": "as_is"}}`` keeps the
  layer's own ops).
* ``"int8_dense_per_tensor"``: as ``"int8"``, but fully connected kernels get one scale per
  tensor (convolutions stay per channel). TFLite stores a float32 scale and an int64 zero point
  per channel for each kernel *and* for its int32 bias, 24 bytes per output channel; for a
  dense layer with fan-in ``n`` that is ``6 / n`` of its float32 weight bytes, which is what
  keeps small dense networks above 0.3x of their float32 file. Check the report's top-1
  agreement: a layer with very unequal output channels loses precision per tensor.
* ``"int8_per_tensor"``: as ``"int8"``, but every kernel (convolutions too) gets one scale.
  The smallest int8 file: a depthwise 3x3 channel holds 9 int8 weights but 24 bytes of
  per-channel metadata, so per-channel MobileNetV2 files stay above 0.4x of float32. Per-tensor
  depthwise kernels are the classic int8 accuracy trap (channels with small weights round to
  zero); read the report's top-1 agreement before shipping.
* ``"int16x8"``: TFLite's 16x8 mode: int8 weights (per channel, as ``"int8"``) and int16
  activations (symmetric, zero point 0; biases int64), calibrated like ``"int8"``. Every
  activation gets 256 times the resolution of ``"int8"`` for 2 bytes instead of 1 per value at
  run time; the file is about as small (weights stay int8; the attention + GRU zoo model:
  91 kB against 89 kB int8 and 105 kB float32). It is the mode for models that carry a state
  through many requantized steps (a GRU's gates and hidden state, LayerNorm statistics), where
  ``"int8"`` rounding compounds: on MNIST-1D the ``attn_gru`` zoo model agrees with JAX on
  0.996-0.999 of the test predictions in 16x8 against 0.973-0.988 in int8 (five seed and
  data-order variations). The converter refuses ops without a 16x8 kernel (``DIV`` among them;
  the error names the op), and its 16x8 ``SUM`` keeps the input's scale, so a mean written as
  ``jnp.mean`` can clip: :func:`int16_sum_warnings` names each such op (in this mode every
  ``nnx.LayerNorm`` and ``nnx.RMSNorm`` is converted in a form without one,
  :class:`research.export._trace.ExportLayerNorm`; see :data:`INTEGER_LAYERNORM_MODES`). Its ONNX
  file has int16 Q/DQ, which needs ONNX opset 21 (:func:`research.export.onnx_export.tflite_to_onnx`).

**Variable batch.** jax2tf's shape polymorphism (``batch_route="jax2tf"``) turns every
broadcast of a parameter against a batch-sized tensor into a runtime ``BROADCAST_TO``, which
stops the converter from folding BatchNorm and fusing biases and activations (MobileNetV2: 190
ops instead of 28; ``experiments/benchmarks/compile.py`` times the artifacts). The default route, ``"auto"``, converts at
a fixed batch of :data:`STATIC_TRACE_BATCH`, frees the leading dimension in the flatbuffer
(:func:`free_batch_dim`) and checks that the result does not depend on the batch size; when the
check fails it falls back to jax2tf's route (``"static"`` raises instead). :func:`batch_route`
reads which route a file took.

:func:`size_breakdown` splits a flatbuffer into constant data, quantization vectors and the
rest (graph, names), to show where an int8 file's bytes go.
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from research.export import _deps
from research.export import formats as formats_lib
from research.export import tflite_ranges
from research.export._io import write_bytes_atomic
from research.export._trace import UnsupportedOpError
from research.export._trace import diagnose
from research.export._trace import export_forms
from research.export._trace import inference_fn
from research.export.config import INT8_LAYERNORM_CHOICES
from research.export.formats import ExportFormat
from research.export.formats import ExportJob
from research.export.formats import Produced
from research.export.formats import register_format
from research.registry import Registry

ConfigureFn = Callable[[Any, "Callable[[], Iterator[list[np.ndarray]]] | None"], None]
QUANTIZATIONS: Registry[ConfigureFn] = Registry(
    "TFLite quantization mode", hint="register one with @research.export.tflite.register_quantization('name')"
)
_ORDER: list[str] = []  # registration order: the order the docs, the report and quantize_modes() list
_FULL_INTEGER: set[str] = set()


def register_quantization(name: str, *, full_integer: bool = False) -> Callable[[ConfigureFn], ConfigureFn]:
    """Decorator registering a TFLite quantization mode; refuses a taken name (same definition again is fine).

    The decorated function receives the ``TFLiteConverter`` and the representative-dataset
    generator (None when no calibration data was given) and configures the converter.

    Args:
      name: the mode's name, as passed to ``quantize=``.
      full_integer: the mode quantizes activations too, so it needs calibration data, its
        activation ranges are compared with learned ones, and its file is also converted to ONNX.

    Raises:
      research.registry.DuplicateNameError: a different function already has ``name``.
    """

    def deco(f: ConfigureFn) -> ConfigureFn:
        QUANTIZATIONS.register(name, f)
        if name not in _ORDER:
            _ORDER.append(name)
        if full_integer:
            _FULL_INTEGER.add(name)
        else:
            _FULL_INTEGER.discard(name)
        return f

    return deco


def quantization_modes() -> tuple[str, ...]:
    """Names of the registered quantization modes, in registration order."""
    return tuple(q for q in _ORDER if q in QUANTIZATIONS)


def is_full_integer(mode: str) -> bool:
    """Whether ``mode`` quantizes activations (and so needs calibration data)."""
    return mode in _FULL_INTEGER and mode in QUANTIZATIONS


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


def _set_private_switch(converter: Any, attr: str, mode: str) -> None:
    # The converter's per-tensor switches are private attributes; refuse clearly when absent.
    if not hasattr(converter, attr):
        raise ImportError(
            f"quantize={mode!r} needs a TFLite converter with {attr} (tensorflow >= 2.16); "
            "upgrade tensorflow or use quantize='int8'"
        )
    setattr(converter, attr, True)


@register_quantization("int8_dense_per_tensor", full_integer=True)
def _int8_dense_per_tensor(converter: Any, rep: Any) -> None:
    _int8(converter, rep)
    _set_private_switch(
        converter, "_experimental_disable_per_channel_quantization_for_dense_layers", "int8_dense_per_tensor"
    )


@register_quantization("int8_per_tensor", full_integer=True)
def _int8_per_tensor(converter: Any, rep: Any) -> None:
    _int8(converter, rep)
    _set_private_switch(converter, "_experimental_disable_per_channel", "int8_per_tensor")


@register_quantization("int16x8", full_integer=True)
def _int16x8(converter: Any, rep: Any) -> None:
    _int8(converter, rep)
    tf = _deps.tensorflow()
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]


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
    activation_calibration: str = "minmax",
) -> bytes:
    tf = _deps.tensorflow()
    tf_fn = _tf_function(fn, specs, batch_polymorphic)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([tf_fn.get_concrete_function()], tf_fn)
    QUANTIZATIONS.get(quantize)(converter, rep)
    if quantize in tflite_ranges.INT8_ACTIVATION_MODES and rep is not None:
        blob = tflite_ranges.calibrate_with_ranges(converter, rep, activation_calibration)
    else:
        blob = converter.convert()
    if quantize == "int16x8":
        for msg in int16_sum_warnings(blob):
            warnings.warn(msg, stacklevel=4)
    return blob


class Int16SumWarning(UserWarning):
    """A 16x8 TFLite ``SUM`` that keeps its input's scale and may clip (see :func:`int16_sum_warnings`)."""


def int16_sum_warnings(blob: bytes) -> list[Int16SumWarning]:
    """Warnings for the int16 ``SUM`` ops of a 16x8 flatbuffer that can clip.

    TFLite's 16x8 quantizer gives a ``SUM`` the scale of its input, so a sum over ``n`` elements
    saturates once it exceeds the largest single input (a ``jnp.mean`` becomes ``SUM`` then a
    multiply by ``1/n``): a mean over the features of a LayerNorm, over the tokens of a pooled
    transformer, over the pixels of a global average pool. :class:`research.export._trace.ExportLayerNorm`
    avoids it for ``nnx.LayerNorm``; elsewhere write a mean over the last axis as a product with a
    constant ``1/n`` column (``x @ jnp.full((n, 1), 1 / n)``), which the converter calibrates like
    any layer, and one over another axis as a sum of slices (``x[:, 0] / n + x[:, 1] / n + ...``,
    each partial sum calibrated; a product over a middle axis broke the ViT's variable batch).

    Returns:
      One :class:`Int16SumWarning` per such op, naming its output tensor (the JAX operation's
      name) and ``n``; empty when there is none.
    """
    _deps.tensorflow()
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    names = _op_names()
    found = []
    for sg in m.subgraphs:
        for op in sg.operators:
            if _op_name(m, op, names) != "SUM" or len(op.inputs) < 2:
                continue
            x, y = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
            axes_buf = m.buffers[sg.tensors[op.inputs[1]].buffer].data
            if y.type != schema.TensorType.INT16 or axes_buf is None or x.shape is None:
                continue
            axes = np.frombuffer(bytes(bytearray(axes_buf)), np.int32)
            n = int(np.prod([x.shape[a % len(x.shape)] for a in axes])) if len(x.shape) else 1
            sx, sy = (t.quantization.scale for t in (x, y))
            if n > 1 and sx is not None and sy is not None and np.allclose(sx, sy):
                name = y.name.decode() if isinstance(y.name, bytes) else y.name
                found.append(
                    Int16SumWarning(
                        f"quantize='int16x8': TFLite op SUM {name!r} adds {n} int16 values at its input's scale, so "
                        f"its result clips at the largest single input; compute that mean as a product with a "
                        f"constant 1/{n} column (x @ jnp.full(({n}, 1), 1 / {n})) or use quantize='int8'"
                    )
                )
    return found


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
    """Returns a representative-dataset generator over ``calibration`` in fixed-size batches.

    Every one of the first ``max_samples`` samples is in a batch: when ``batch_size`` does not
    divide their number (the static trace's batch of 7, say), the last batch is filled with samples
    from the start, which the converter has seen already (min/max ranges are unchanged by them).

    Raises:
      ValueError: fewer samples than one batch.
    """
    data = np.asarray(calibration)[:max_samples]
    if len(data) < batch_size:
        raise ValueError(
            f"calibration has {len(data)} samples, fewer than one batch of {batch_size}; "
            f"pass at least {batch_size} samples"
        )

    def gen() -> Iterator[list[np.ndarray]]:
        for i in range(0, len(data), batch_size):
            batch = data[i : i + batch_size]
            if len(batch) < batch_size:
                batch = np.concatenate([batch, data[: batch_size - len(batch)]])
            yield [batch]

    return gen


STATIC_TRACE_BATCH = 7
"""Batch size of the fixed-shape trace behind ``batch_route="static"`` (a prime, so that a
reshape constant or tensor whose leading size is the batch is unlikely to be anything else)."""

BATCH_ROUTES = ("auto", "static", "jax2tf")
_BATCH_META = "slimjax_batch"


def _op_names() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _op_name(model: Any, op: Any, names: dict[int, str]) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    return names.get(builtin, str(builtin))


def op_counts(blob: bytes) -> collections.Counter:
    """TFLite builtin operator names in a flatbuffer's main subgraph, counted.

    Example:
      >>> op_counts(open("model_fp32.tflite", "rb").read())  # doctest: +SKIP
      Counter({'CONV_2D': 14, 'DEPTHWISE_CONV_2D': 8, 'ADD': 4, 'SUM': 1, 'FULLY_CONNECTED': 1})
    """
    _deps.tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    names = _op_names()
    return collections.Counter(_op_name(m, op, names) for op in m.subgraphs[0].operators)


def free_batch_dim(blob: bytes, batch: int) -> bytes:
    """Makes the leading dimension of a flatbuffer converted at a fixed batch variable.

    Every non-constant tensor whose leading size is ``batch`` gets shape signature ``-1`` there
    (and static size 1, the batch the interpreter allocates before a resize), every RESHAPE
    target whose leading entry is ``batch`` gets ``-1`` and every SLICE of all ``batch`` rows
    (a time step ``x[:, t]``) gets size ``-1`` there, so the interpreter recomputes all shapes
    from the input's batch. A graph that mixes the batch into other dimensions is not fixed by
    this; :func:`to_tflite` checks the result at three batch sizes.

    Args:
      blob: ``.tflite`` bytes converted with a fixed leading dimension ``batch``.
      batch: that leading dimension.

    Returns:
      The rewritten bytes, tagged with ``slimjax_batch`` metadata (see :func:`batch_route`).
    """
    _deps.tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    names = _op_names()
    for sg in m.subgraphs:
        for t in sg.tensors:
            constant = m.buffers[t.buffer].data is not None
            if constant or t.shape is None or not len(t.shape) or t.shape[0] != batch:
                continue
            shape = np.asarray(t.shape, np.int32).copy()
            shape[0] = -1
            t.shapeSignature = shape.copy()
            shape[0] = 1
            t.shape = shape
        for op in sg.operators:
            if _op_name(m, op, names) == "SLICE" and len(op.inputs) == 3:
                _free_slice_size(m, sg, op, batch)
                continue
            if _op_name(m, op, names) != "RESHAPE":
                continue
            if len(op.inputs) > 1 and op.inputs[1] >= 0:
                buf = m.buffers[sg.tensors[op.inputs[1]].buffer]
                if buf.data is not None:
                    target = np.frombuffer(bytes(bytearray(buf.data)), np.int32).copy()
                    if len(target) and target[0] == batch:
                        target[0] = -1
                        buf.data = np.frombuffer(target.tobytes(), np.uint8)
            opts = op.builtinOptions
            new_shape = getattr(opts, "newShape", None)
            if new_shape is not None and len(new_shape) and new_shape[0] == batch:
                new_shape = np.asarray(new_shape, np.int32).copy()
                new_shape[0] = -1
                opts.newShape = new_shape
    return _with_batch_note(m, f"static trace at batch {batch}, batch dimension freed")


def _with_batch_note(m: Any, note: str) -> bytes:
    """The flatbuffer object ``m`` as bytes, with ``note`` as its ``slimjax_batch`` metadata."""
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    tag = schema.BufferT()
    tag.data = np.frombuffer(note.encode(), np.uint8)
    m.buffers.append(tag)
    meta = schema.MetadataT()
    meta.name = _BATCH_META
    meta.buffer = len(m.buffers) - 1
    m.metadata = [*(m.metadata or []), meta]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def _free_slice_size(m: Any, sg: Any, op: Any, batch: int) -> None:
    """A SLICE of all ``batch`` rows (begin 0, size ``batch``) takes every row (size ``-1``)."""
    begin_t, size_t = (sg.tensors[i] for i in op.inputs[1:3])
    begin_buf, size_buf = m.buffers[begin_t.buffer], m.buffers[size_t.buffer]
    if begin_buf.data is None or size_buf.data is None or size_t.type != 2:  # int32 constants only
        return
    begin = np.frombuffer(bytes(bytearray(begin_buf.data)), np.int32)
    size = np.frombuffer(bytes(bytearray(size_buf.data)), np.int32).copy()
    if len(size) and size[0] == batch and begin[0] == 0:
        size[0] = -1
        size_buf.data = np.frombuffer(size.tobytes(), np.uint8)


def batch_route(blob: bytes) -> str:
    """How a ``.tflite`` file's batch dimension was made: which :func:`to_tflite` route it took.

    Returns:
      ``"static trace at batch B, batch dimension freed"`` (``batch_route="static"``),
      ``"jax2tf shape polymorphism"``, or ``"fixed batch B"``.
    """
    _deps.tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    for meta in m.metadata or []:
        name = meta.name.decode() if isinstance(meta.name, bytes) else meta.name
        if name == _BATCH_META:
            return bytes(bytearray(m.buffers[meta.buffer].data)).decode()
    sg = m.subgraphs[0]
    t = sg.tensors[sg.inputs[0]]
    if t.shapeSignature is not None and len(t.shapeSignature) and t.shapeSignature[0] == -1:
        return "jax2tf shape polymorphism"
    return f"fixed batch {int(t.shape[0])}" if t.shape is not None and len(t.shape) else "scalar input"


def _check_batch_free(blob: bytes, sample: np.ndarray, trace_batch: int) -> None:
    """Raises ValueError when a freed-batch file's rows depend on the batch they are run in."""
    n = 2 * trace_batch - 1
    x = np.resize(sample, (n, *sample.shape[1:])).astype(sample.dtype)
    if np.issubdtype(x.dtype, np.floating):  # distinct rows, so a batch mix-up shows
        scale = float(np.std(sample)) or 1.0
        x = x + np.random.default_rng(0).normal(0, 0.1 * scale, x.shape).astype(x.dtype)
    runner = TFLiteRunner(blob)
    y_n = runner(x)
    if not np.shape(y_n) or np.shape(y_n)[0] != n:
        raise ValueError(f"a batch of {n} gave outputs of shape {np.shape(y_n)}")
    tol = 1e-4 * max(1.0, float(np.max(np.abs(y_n))))
    for b in (1, trace_batch):
        y_b, ref = runner(x[:b]), y_n[:b]
        if y_b.shape != ref.shape:
            raise ValueError(f"outputs at batch {b} have shape {y_b.shape}, not {ref.shape} as at batch {n}")
        diff = float(np.max(np.abs(y_b - ref)))
        if not diff <= tol:  # NaN fails too
            raise ValueError(f"outputs at batch {b} differ from the same rows run at batch {n} by {diff:.3g}")


def to_tflite(
    fn: Callable[[jax.Array], jax.Array],
    sample: np.ndarray,
    *,
    quantize: str = "fp32",
    calibration: np.ndarray | None = None,
    batch_polymorphic: bool = True,
    batch_route: str = "auto",
    model: Any = None,
    activation_calibration: str = "minmax",
) -> bytes:
    """Converts ``fn`` to a TFLite flatbuffer.

    Args:
      fn: the inference function ``x -> y``.
      sample: an input (fixes dtype and non-batch dims; and the batch when not polymorphic).
      quantize: a registered mode (see :func:`quantization_modes`).
      calibration: inputs for the representative dataset (needed by ``"int8"``).
      batch_polymorphic: keep the leading dimension variable (``-1`` in the shape signature).
      batch_route: how a variable batch is made (module docstring): ``"static"`` (trace at
        :data:`STATIC_TRACE_BATCH`, free the dimension, check; raises if the check fails),
        ``"jax2tf"`` (shape polymorphism) or ``"auto"`` (static, else jax2tf with a warning).
      model: the NNX model, only used to name the layer in an unsupported-op error.
      activation_calibration: how the int8 activation ranges are chosen from the calibration
        data (:mod:`research.export.tflite_ranges`): ``"minmax"`` (the converter's own),
        ``"percentile"`` or ``"mse"``; applies to the int8-activation modes (``"int8"``,
        ``"int8_dense_per_tensor"``, ``"int8_per_tensor"``), the others ignore it.

    Returns:
      The ``.tflite`` bytes (:func:`batch_route` tells which route they took).

    Raises:
      ValueError: unknown ``quantize``/``batch_route``, missing calibration, or a static route
        whose result depends on the batch size.
      UnsupportedOpError: an operation has no TFLite equivalent; names the JAX primitive.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}: {QUANTIZATIONS.unknown_message(quantize)}")
    if batch_route not in BATCH_ROUTES:
        raise ValueError(f"batch_route={batch_route!r} is not one of {BATCH_ROUTES}")
    tflite_ranges.check_activation_calibration(activation_calibration)
    sample = np.asarray(sample)
    polymorphic = batch_polymorphic and sample.ndim > 0
    static = polymorphic and batch_route != "jax2tf"
    if static:
        shape = (STATIC_TRACE_BATCH, *sample.shape[1:])
    else:
        shape = sample.shape
    spec = jax.ShapeDtypeStruct(shape, sample.dtype)
    rep = None
    if calibration is not None:
        rep = calibration_batches(calibration, 8 if polymorphic and not static else shape[0])
    try:
        blob = _convert_or_diagnose(
            fn, spec, polymorphic and not static, quantize, rep, sample, model, activation_calibration
        )
    except UnsupportedOpError as err:
        if batch_route != "auto" or not static:
            raise
        # the static trace itself does not convert: the other routes may
        warnings.warn(f"{err.short()} at batch {STATIC_TRACE_BATCH}; trying jax2tf shape polymorphism", stacklevel=2)
        return _after_static(fn, sample, quantize, calibration, model, err, activation_calibration)
    if not static:
        return blob
    freed = free_batch_dim(blob, STATIC_TRACE_BATCH)
    try:
        _check_batch_free(freed, sample, STATIC_TRACE_BATCH)
    except Exception as err:
        why = f"the graph converted at batch {STATIC_TRACE_BATCH} does not run at other batch sizes ({err})"
        if batch_route == "static":
            raise ValueError(f"batch_route='static': {why}; use batch_route='jax2tf' or 'auto'") from err
        warnings.warn(f"{why}; converting with jax2tf shape polymorphism instead", stacklevel=2)
        return _after_static(fn, sample, quantize, calibration, model, None, activation_calibration)
    return freed


def _convert_or_diagnose(fn, spec, polymorphic, quantize, rep, sample, model, activation_calibration="minmax") -> bytes:
    try:
        return _convert(fn, [spec], polymorphic, quantize, rep, activation_calibration)
    except (ValueError, TypeError, ImportError):
        raise
    except Exception as err:  # tf.lite ConverterError (its class moves between TF releases)

        def probe(f: Callable[..., Any], specs: list[jax.ShapeDtypeStruct]) -> None:
            _convert(f, specs, False, "fp32", None)

        raise diagnose("tflite", model, fn, sample, err, probe) from err


def _after_static(
    fn, sample, quantize, calibration, model, static_error: UnsupportedOpError | None, activation_calibration="minmax"
) -> bytes:
    """``batch_route="auto"`` once the static route failed: jax2tf shape polymorphism, else a file at
    the sample's fixed batch (runners feed it in chunks); the first conversion error if none converts."""
    try:
        return to_tflite(
            fn,
            sample,
            quantize=quantize,
            calibration=calibration,
            batch_route="jax2tf",
            model=model,
            activation_calibration=activation_calibration,
        )
    except UnsupportedOpError as poly:
        warnings.warn(
            f"jax2tf shape polymorphism cannot convert this model either ({poly.short()}); the file keeps "
            f"the fixed batch {sample.shape[0]} and runners feed it in chunks of that size",
            stacklevel=3,
        )
        fixed = jax.ShapeDtypeStruct(sample.shape, sample.dtype)
        rep = None if calibration is None else calibration_batches(calibration, sample.shape[0])
        try:
            blob = _convert_or_diagnose(fn, fixed, False, quantize, rep, sample, model, activation_calibration)
        except UnsupportedOpError:
            raise (static_error or poly) from None
        return _tag(blob, f"{FIXED_BATCH_TAG} {sample.shape[0]}: no variable-batch route converts this model")


FIXED_BATCH_TAG = "slimjax fixed batch"
"""Start of the batch-route note of a file that keeps its trace batch (``batch_route="auto"`` when
neither variable-batch route converts the model); :class:`TFLiteRunner` feeds such a file in chunks."""


def _tag(blob: bytes, note: str) -> bytes:
    _deps.tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    return _with_batch_note(flatbuffer_utils.convert_bytearray_to_object(bytearray(blob)), note)


def run_fixed_batch(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    """Runs a fixed-batch model on any number of rows: chunks of ``batch``, the last padded."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(run(chunk)[:n])
    return np.concatenate(outs)


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
        blob = bytes(model) if isinstance(model, bytes | bytearray) else open(os.fspath(model), "rb").read()
        self._fixed = int(self._in["shape"][0]) if FIXED_BATCH_TAG.encode() in blob else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self._in["dtype"])
        if self._fixed is not None and x.ndim and x.shape[0] != self._fixed:
            return run_fixed_batch(self, x, self._fixed)
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


def range_agreement(runner: TFLiteRunner, ranges: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """Compares deployed int8 activation ranges with given (learned) ``(min, max)`` ranges.

    Args:
      runner: an int8 TFLite model.
      ranges: regular expression over TFLite tensor names -> learned ``(min, max)``.

    Returns:
      Per pattern, ``{"learned": [lo, hi], "matches": [{"tensor", "deployed", "rel_err"}, ...]}``
      (the error is relative to the learned range's width).
    """
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


INTEGER_LAYERNORM_MODES = frozenset({"int16x8"})
"""Modes converted with every ``nnx.LayerNorm`` (and ``nnx.RMSNorm``) as :class:`research.export._trace.ExportLayerNorm`
(TFLite's 16x8 ``SUM`` would clip Flax's feature sums). For ``"int8"`` that form made no
difference beyond noise (attention + GRU model, three seeds); see :data:`L2_LAYERNORM_MODES`."""

L2_LAYERNORM_MODES = frozenset({"int8", "int8_dense_per_tensor", "int8_per_tensor"})
"""Full-int8 modes, converted with every ``nnx.LayerNorm`` and ``nnx.RMSNorm`` as
:class:`research.export._trace.L2LayerNorm` (one int8 ``L2_NORMALIZATION`` per LayerNorm, its
statistics in 32-bit integers, instead of a variance on a shared int8 grid). Float and
ONNX-only modes (``int8_qdq_symmetric`` quantizes the float32 ONNX file) convert the layer as it is,
and so do the full-int8 modes with ``format_options={"tflite": {"int8_layernorm": "as_is"}}``."""


def _int8_layernorm(job: ExportJob) -> str | None:
    """The LayerNorm form of the full-int8 conversions (``format_options["tflite"]``, checked by
    :meth:`TFLiteFormat.check_options`); ``None``: the layer as it is."""
    value = job.options_of("tflite").get("int8_layernorm", "l2_normalization")
    return None if value == "as_is" else value


def converted(job: ExportJob, q: str) -> bytes:
    """The TFLite flatbuffer of variant ``q`` for this export, converted once and shared.

    The TFLite format writes it; the ONNX format converts it with tf2onnx. A converter failure is
    reported for the first requested format that needs it and names all of them (to drop).
    """
    needing = job.needing("tflite")

    fn = job.convert_fn
    form = "mean_column" if q in INTEGER_LAYERNORM_MODES else _int8_layernorm(job) if q in L2_LAYERNORM_MODES else None
    if form is not None:  # the converted model's LayerNorms in the form this mode quantizes well
        fn = job.memo(("forms", form), lambda: inference_fn(export_forms(job.convert_model, layernorm=form)))

    def convert() -> bytes:
        with formats_lib.producing(f"the {q} TFLite conversion (needed by {' and '.join(needing)})", job.out_dir):
            try:
                return to_tflite(
                    fn,
                    job.sample,
                    quantize=q,
                    calibration=job.calibration,
                    batch_polymorphic=job.batch_polymorphic,
                    batch_route=job.batch_route,
                    model=job.convert_model,
                    activation_calibration=job.activation_calibration,
                )
            except UnsupportedOpError as err:
                raise err.retarget(needing[0], via="tflite", drop=needing) from err

    return job.memo(("tflite", q), convert)


@register_format
class TFLiteFormat(ExportFormat):
    """``model_{mode}.tflite``: jax2tf + the TFLite converter, run in the LiteRT interpreter.

    Writes every registered quantization mode (:func:`register_quantization`); full-integer modes
    need calibration data and get ``extra["range_agreement"]`` when activation ranges are known.
    """

    name = "tflite"
    extension = ".tflite"

    def modes(self) -> tuple[str, ...]:
        return quantization_modes()

    def check_options(self, options: Mapping[str, Any]) -> None:
        """``int8_layernorm``: :data:`research.export.config.INT8_LAYERNORM_CHOICES` (see :data:`L2_LAYERNORM_MODES`)."""
        unknown = sorted(set(options) - {"int8_layernorm"})
        if unknown:
            raise ValueError(
                f"format_options['tflite'] has unknown keys {unknown}; the TFLite format takes 'int8_layernorm'"
            )
        value = options.get("int8_layernorm", "l2_normalization")
        if value not in INT8_LAYERNORM_CHOICES:
            raise ValueError(
                f"format_options['tflite']['int8_layernorm']={value!r}: choose one of {INT8_LAYERNORM_CHOICES}"
            )

    def needs_calibration(self, mode: str) -> bool:
        return is_full_integer(mode)

    def unavailable(self) -> str | None:
        return formats_lib.module_available("tensorflow", _deps.INSTALL_HINT)

    def produce(self, job: ExportJob, q: str) -> list[Produced]:
        blob = converted(job, q)
        path = job.path(f"{job.name}_{q}.tflite")
        write_bytes_atomic(path, blob, lambda p: TFLiteRunner(p)(job.sample))
        runner = TFLiteRunner(path, num_threads=job.num_threads)
        extra: dict[str, Any] = {"size_breakdown": size_breakdown(blob), "batch_route": batch_route(blob)}
        if q in tflite_ranges.INT8_ACTIVATION_MODES:
            extra["activation_calibration"] = job.activation_calibration
        if is_full_integer(q) and job.activation_ranges:
            extra["range_agreement"] = range_agreement(runner, job.activation_ranges)
        runtime = f"LiteRT {formats_lib.dist_version('ai-edge-litert')}"
        return [Produced(name=f"tflite_{q}", quantize=q, path=path, runtime=runtime, run=runner, extra=extra)]

    def load(self, path: str, num_threads: int = 1) -> TFLiteRunner:
        return TFLiteRunner(path, num_threads=num_threads)
