"""ONNX export by converting the TFLite file with tf2onnx, and an onnxruntime runner.

Modern jax2tf emits a single ``XlaCallModule`` op holding StableHLO, which tf2onnx cannot convert
from a SavedModel; the TFLite file, whose ops are ordinary builtins, converts. A full-int8 TFLite
model becomes an ONNX graph in QDQ form: ``QuantizeLinear``/``DequantizeLinear`` pairs around
float ops, the explicit-quantization form TensorRT builds int8 engines from.

TensorRT accepts only symmetric int8 Q/DQ (zero point 0, int8 type). TFLite quantizes weights
symmetric per channel but activations asymmetric, so :func:`qdq_summary` reports how many Q/DQ
nodes have a non-zero (or non-int8) zero point; ``tensorrt_symmetric`` is True only when none do.
:func:`quantize_qdq_symmetric` writes the TensorRT-ready form: onnxruntime's static quantizer
run on the float32 ONNX file, QDQ format, symmetric int8 activations (per tensor) and symmetric
int8 weights (per output channel), calibrated on the same representative data as TFLite's int8.

The TFLite converter fuses a clamp to [0, 1] or [-1, 1] into the builtins ``RELU_0_TO_1`` /
``RELU_N1_TO_1``, which tf2onnx does not map; :func:`tflite_to_onnx` registers both as ONNX
``Clip`` and refuses (naming the node) any TFLite op tf2onnx leaves unconverted.

A 16x8 TFLite file (``quantize="int16x8"``) becomes int16 Q/DQ, which ONNX defines from opset
21 on; tf2onnx stops at 18, so that file is converted at 18 and labelled 21, its int64 bias
constants folded to float (:func:`tflite_to_onnx`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import numpy as np

from research.export import _deps
from research.export import formats as formats_lib
from research.export import tflite
from research.export._io import write_bytes_atomic
from research.export._trace import UnsupportedOpError
from research.export.formats import ExportFormat
from research.export.formats import ExportJob
from research.export.formats import Produced
from research.export.formats import register_format
from research.registry import Registry

DEFAULT_OPSET = 17
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


_CLAMPS = {"TFL_RELU_0_TO_1": (0.0, 1.0), "TFL_RELU_N1_TO_1": (-1.0, 1.0)}


def _register_clamp_handlers() -> None:
    """Maps TFLite's fused clamps to ONNX ``Clip`` where tf2onnx has no handler of its own."""
    from tf2onnx import utils  # noqa: PLC0415 (optional dependency)
    from tf2onnx.handler import tf_op  # noqa: PLC0415
    from tf2onnx.handler import tfl_op  # noqa: PLC0415

    known = {name for opset in tf_op.get_opsets().get("", []) for name in opset}
    for name, (lo, hi) in _CLAMPS.items():
        if name in known:
            continue

        class _Clamp:
            @classmethod
            def version_11(cls, ctx: Any, node: Any, lo: float = lo, hi: float = hi, **kwargs: Any) -> None:
                dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
                bounds = [
                    ctx.make_const(utils.make_name(f"{node.name}_{k}"), np.array(v, dtype))
                    for k, v in (("lo", lo), ("hi", hi))
                ]
                ctx.replace_inputs(node, [node.input[0], *(b.output[0] for b in bounds)])

        tfl_op([name], onnx_op="Clip")(_Clamp)


def _register_gelu_handler() -> None:
    """Maps TFLite's fused ``GELU`` (what the converter makes of ``jax.nn.gelu``) to ONNX ops.

    ``approximate``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``; otherwise
    ``0.5 x (1 + erf(x / sqrt(2)))``, the two forms ``jax.nn.gelu`` computes.
    """
    from tf2onnx import utils  # noqa: PLC0415 (optional dependency)
    from tf2onnx.handler import tf_op  # noqa: PLC0415
    from tf2onnx.handler import tfl_op  # noqa: PLC0415

    if "TFL_GELU" in {name for opset in tf_op.get_opsets().get("", []) for name in opset}:
        return

    class _Gelu:
        @classmethod
        def version_11(cls, ctx: Any, node: Any, **kwargs: Any) -> None:
            x = node.input[0]
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(x))
            shape = ctx.get_shape(x)
            approximate = bool(node.get_attr_value("approximate", False))
            outputs = list(node.output)
            ctx.remove_node(node.name)

            def const(tag: str, value: float) -> str:
                return ctx.make_const(utils.make_name(f"{node.name}_{tag}"), np.array(value, dtype)).output[0]

            def op(kind: str, *inputs: str, out: list[str] | None = None) -> str:
                made = ctx.make_node(kind, list(inputs), outputs=out, shapes=[shape], dtypes=[ctx.get_dtype(x)])
                return made.output[0]

            if approximate:
                cube = op("Mul", x, op("Mul", x, x))
                inner = op("Mul", op("Add", x, op("Mul", cube, const("c", 0.044715))), const("k", np.sqrt(2 / np.pi)))
                gate = op("Tanh", inner)
            else:
                gate = op("Erf", op("Mul", x, const("r", 1 / np.sqrt(2))))
            op("Mul", op("Mul", x, const("half", 0.5)), op("Add", gate, const("one", 1.0)), out=outputs)

    tfl_op(["TFL_GELU"])(_Gelu)


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Nodes of ``graph`` and of every subgraph (Loop / If bodies)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _all_nodes(g)


def _refuse_unconverted(model_proto: Any) -> None:
    left = [(n.op_type, n.name) for n in _all_nodes(model_proto.graph) if n.op_type.startswith("TFL_")]
    if left:
        op, node = left[0]
        raise UnsupportedOpError(
            "onnx",
            None,
            (),
            "",
            f"tf2onnx has no ONNX equivalent of TFLite op {op[4:]!r} (node {node!r}, named after the JAX operations "
            f"it came from); {len(left)} such node(s)",
        )


def tflite_to_onnx(tflite_bytes: bytes, opset: int = DEFAULT_OPSET) -> Any:
    """Converts TFLite bytes to an ``onnx.ModelProto`` with ``tf2onnx.convert.from_tflite``.

    tf2onnx deep-copies the whole graph before each of its optimizer passes so that a failing
    pass can be undone (``TF2ONNX_CATCH_ERRORS``); on large int8 graphs that copying is most of the
    conversion time. The conversion first runs without the copies and
    only falls back to tf2onnx's safe mode when a pass raises, so the result is the same.

    A 16x8 file (int16 activations) is converted at opset ``max(opset, 18)`` and comes back at
    opset 21 with its int64 bias constants folded to float32 (int16 Q/DQ needs opset 21).
    """
    tf2onnx = _deps.tf2onnx()
    _register_clamp_handlers()
    _register_gelu_handler()
    wide = _has_int16_activations(tflite_bytes)
    if wide:  # converted at >= 18 (Reduce* axes as inputs), then labelled 21: int16 Q/DQ
        opset = max(opset, 18)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "model.tflite")
        with open(src, "wb") as f:
            f.write(tflite_bytes)
        try:
            with _env("TF2ONNX_CATCH_ERRORS", "FALSE"):
                model_proto, _ = tf2onnx.convert.from_tflite(src, opset=opset)
        except Exception:  # noqa: BLE001 - an optimizer pass failed: redo with tf2onnx's undo
            with _env("TF2ONNX_CATCH_ERRORS", "TRUE"):
                model_proto, _ = tf2onnx.convert.from_tflite(src, opset=opset)
    _refuse_unconverted(model_proto)
    if wide:
        _as_int16_qdq_opset(model_proto)
    return model_proto


INT16_QDQ_OPSET = 21
"""The first ONNX opset whose QuantizeLinear/DequantizeLinear take int16 (TFLite's 16x8 mode)."""


def _has_int16_activations(tflite_bytes: bytes) -> bool:
    """Whether a TFLite flatbuffer has quantized int16 tensors (a 16x8 file)."""
    _deps.tensorflow()
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    return any(
        t.type == schema.TensorType.INT16 and t.quantization is not None and t.quantization.scale is not None
        for sg in m.subgraphs
        for t in sg.tensors
    )


def _as_int16_qdq_opset(model_proto: Any) -> None:
    """Makes tf2onnx's graph of a 16x8 TFLite file valid ONNX, in place.

    Its int16 Q/DQ nodes need opset :data:`INT16_QDQ_OPSET`; every other operator tf2onnx emits
    at opset 18 means the same at 21 (the changes in between add types and optional
    attributes). TFLite's 16x8 biases are int64, which no DequantizeLinear takes: each such
    constant DequantizeLinear is replaced by its float32 value (the bias as the file computes it).
    """
    from onnx import numpy_helper  # noqa: PLC0415

    graph = model_proto.graph
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = attr.t

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(values[name]) if name in values else None

    kept = []
    for node in graph.node:
        q = const(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.dtype != np.int64:
            kept.append(node)
            continue
        scale = np.asarray(const(node.input[1]), np.float64)
        zero = const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        zero = np.zeros((), np.int64) if zero is None else np.asarray(zero, np.int64)
        if scale.ndim == 1 and q.ndim > 0:  # per axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zero = zero.reshape(shape) if zero.ndim == 1 else zero
        value = ((q - zero).astype(np.float64) * scale).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    for imp in model_proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, INT16_QDQ_OPSET)


OnnxQuantizeFn = Callable[[str, str, np.ndarray], Any]
ONNX_QUANTIZATIONS: Registry[OnnxQuantizeFn] = Registry(
    "ONNX quantization mode", hint="register one with @research.export.onnx_export.register_onnx_quantization('name')"
)


#: The ``activation_calibration`` rules each ONNX-only mode implements, by mode name.
_ACTIVATION_RULES: dict[str, tuple[str, ...]] = {}


def register_onnx_quantization(
    name: str, *, activation_calibrations: Sequence[str] = ("minmax",)
) -> Callable[[OnnxQuantizeFn], OnnxQuantizeFn]:
    """Decorator registering an ONNX-only quantization mode; refuses a taken name (same definition again is fine).

    An ONNX-only mode quantizes the float32 ONNX file (not the TFLite one): the decorated
    ``fn(fp32_path, out_path, calibration) -> onnx.ModelProto`` writes ``out_path``.
    :func:`research.export.export` accepts its name in ``quantize`` and writes
    ``{name}_{mode}.onnx`` (artifact ``onnx_{mode}``).

    ``activation_calibrations``: the export's ``activation_calibration`` rules the mode implements
    besides min/max; for those it is called with ``activation_calibration=<rule>``, for any other
    rule without it (min/max). The artifact's ``extra["activation_calibration"]`` names the rule used.
    """

    def deco(fn: OnnxQuantizeFn) -> OnnxQuantizeFn:
        out = ONNX_QUANTIZATIONS.register(name, fn)
        _ACTIVATION_RULES[name] = tuple(dict.fromkeys(("minmax", *activation_calibrations)))
        return out

    return deco


def onnx_activation_rule(mode: str, requested: str) -> str:
    """The ``activation_calibration`` rule the ONNX-only ``mode`` uses when ``requested`` is asked
    for: ``requested`` if the mode implements it, else ``"minmax"``."""
    return requested if requested in _ACTIVATION_RULES.get(mode, ("minmax",)) else "minmax"


def onnx_modes_with_rule(rule: str) -> tuple[str, ...]:
    """The ONNX-only modes that implement the ``activation_calibration`` rule ``rule``."""
    return tuple(m for m in onnx_quantization_modes() if onnx_activation_rule(m, rule) == rule)


def onnx_quantization_modes() -> tuple[str, ...]:
    """Names of the registered ONNX-only quantization modes, sorted."""
    return tuple(ONNX_QUANTIZATIONS.names())


def onnx_quantize(
    mode: str, fp32_path: str, out_path: str, calibration: np.ndarray, activation_calibration: str = "minmax"
) -> Any:
    """Runs the registered ONNX-only quantization ``mode``; returns the written proto.

    ``activation_calibration`` is passed on when the mode implements it (:func:`onnx_activation_rule`).
    """
    rule = onnx_activation_rule(mode, activation_calibration)
    fn = ONNX_QUANTIZATIONS.get(mode)
    if rule == "minmax":
        return fn(fp32_path, out_path, calibration)
    return fn(fp32_path, out_path, calibration, activation_calibration=rule)


def quantize_qdq_symmetric(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: np.ndarray,
    *,
    batch_size: int = 8,
    max_samples: int = 512,
    per_channel: bool = True,
    preprocess: bool = True,
    reduce_range: bool = False,
    activation_calibration: str = "minmax",
) -> Any:
    """Writes a TensorRT-ready int8 ONNX file: symmetric Q/DQ, calibrated on ``calibration``.

    With ``preprocess``, the float32 file first goes through onnxruntime's
    ``quant_pre_process`` (shape inference and graph optimisation, the step onnxruntime
    recommends before static quantization; without symbolic shape inference where that fails on
    a variable-batch graph); if it still fails, a warning names the error and the file is
    quantized as it is.
    Then ``onnxruntime.quantization.quantize_static`` runs on it in QDQ format:
    activations int8 per tensor with zero point 0 (``ActivationSymmetric``), weights int8 with
    zero point 0 per output channel (``WeightSymmetric``, ``per_channel``), activation ranges
    from ``calibration`` (the same representative data TFLite's int8 uses) by onnxruntime's
    calibrator for ``activation_calibration``. The file is written atomically after
    ``onnx.checker`` and onnxruntime accept it.

    Args:
      fp32_path: the float32 ONNX file (e.g. from :func:`tflite_to_onnx`).
      out_path: destination of the int8 file.
      calibration: representative inputs ``(N, *input_shape[1:])``.
      batch_size: calibration batch size (a variable-batch model accepts any).
      max_samples: at most this many calibration inputs are used.
      per_channel: per-output-channel weight scales (TensorRT's recommended form).
      preprocess: run ``quant_pre_process`` on the float32 file first.
      reduce_range: quantize weights to 7 bits (``[-64, 63]``), onnxruntime's ``reduce_range``:
        its fused ``uint8 x int8`` kernels cannot saturate then, on any x86-64 CPU (see
        :mod:`research.export.cpu`), at the cost of half the weight resolution everywhere.
      activation_calibration: ``"minmax"`` (each activation's largest magnitude) or
        ``"percentile"`` (onnxruntime's percentile calibrator at 99.99: with symmetric ranges, the
        99.99th percentile of each activation's magnitudes), the rules of
        :mod:`research.export.tflite_ranges` that onnxruntime has a calibrator for.

    Returns:
      The written ``onnx.ModelProto``.

    Raises:
      ValueError: empty calibration data, or an ``activation_calibration`` onnxruntime has no
        calibrator for.

    Example (the mode ``"int8_qdq_symmetric"`` of :func:`research.export.export` calls this)::

        rep = export(model, x, formats=("onnx",), quantize="int8_qdq_symmetric",
                     calibration=x_train[:256])
        rep["onnx_int8_qdq_symmetric"].extra["qdq"]["tensorrt_symmetric"]  # True
    """
    ort = _deps.onnxruntime()
    onnx = _deps.onnx()
    from onnxruntime import quantization as oq

    calibrators = {
        "minmax": (oq.CalibrationMethod.MinMax, {}),
        "percentile": (oq.CalibrationMethod.Percentile, {"CalibPercentile": 99.99}),
    }
    if activation_calibration not in calibrators:
        raise ValueError(
            f"activation_calibration={activation_calibration!r}: onnxruntime's symmetric Q/DQ quantizer "
            f"calibrates with {sorted(calibrators)}; use one of them"
        )
    method, calib_options = calibrators[activation_calibration]
    data = np.asarray(calibration, np.float32)[:max_samples]
    if len(data) == 0:
        raise ValueError(
            "quantize='int8_qdq_symmetric' needs calibration inputs; pass calibration=<array "
            "(N, *input_shape[1:])> with a few hundred training inputs"
        )
    session = ort.InferenceSession(os.fspath(fp32_path), providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    static_batch = first.shape[0] if isinstance(first.shape[0], int) else None
    step = static_batch or batch_size
    batches = [data[i : i + step] for i in range(0, len(data), step)]
    batches = [b for b in batches if static_batch is None or len(b) == static_batch]
    if not batches:
        raise ValueError(
            f"calibration has {len(data)} inputs, fewer than the model's fixed batch "
            f"{static_batch}; pass at least {static_batch}"
        )
    del session

    class _Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {first.name: batch}

    with tempfile.TemporaryDirectory() as d:
        tmp = os.path.join(d, "model_qdq.onnx")
        source = os.fspath(fp32_path)
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = os.path.join(d, "model_pre.onnx")
            errors = []
            # Symbolic shape inference fails on some variable-batch graphs from tf2onnx; ONNX's
            # own shape inference plus the optimisation pass still apply there.
            for kwargs in ({}, {"skip_symbolic_shape": True}):
                try:
                    quant_pre_process(source, pre, **kwargs)
                    source = pre
                    break
                except Exception as err:  # noqa: BLE001 (onnxruntime raises many types here)
                    errors.append(f"{type(err).__name__}: {err}")
            else:
                warnings.warn(
                    f"onnxruntime quant_pre_process failed on {source} ({'; '.join(errors)}); "
                    "quantizing the file without pre-processing",
                    stacklevel=2,
                )
        oq.quantize_static(
            source,
            tmp,
            _Reader(),
            quant_format=oq.QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=oq.QuantType.QInt8,
            weight_type=oq.QuantType.QInt8,
            calibrate_method=method,
            extra_options={
                **calib_options,
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # TensorRT fuses float biases into its int8 kernels; int32 bias Q/DQ is not
                # part of its explicit-quantization form.
                "QuantizeBias": False,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )
        proto = onnx.load(tmp)
    write_onnx(proto, out_path)
    return proto


def check_onnx(path: str | os.PathLike) -> None:
    """Runs ``onnx.checker`` (full check) and opens an onnxruntime session on ``path``."""
    onnx = _deps.onnx()
    onnx.checker.check_model(os.fspath(path), full_check=True)
    OnnxRunner(path)


def write_onnx(model_proto: Any, path: str | os.PathLike) -> None:
    """Writes ``model_proto`` atomically, after the checker and onnxruntime accept it."""
    write_bytes_atomic(path, model_proto.SerializeToString(), check_onnx)


@register_onnx_quantization("int8_qdq_symmetric", activation_calibrations=("percentile",))
def _int8_qdq_symmetric(
    fp32_path: str, out_path: str, calibration: np.ndarray, activation_calibration: str = "minmax"
) -> Any:
    return quantize_qdq_symmetric(fp32_path, out_path, calibration, activation_calibration=activation_calibration)


@register_onnx_quantization("int8_qdq_reduce_range", activation_calibrations=("percentile",))
def _int8_qdq_reduce_range(
    fp32_path: str, out_path: str, calibration: np.ndarray, activation_calibration: str = "minmax"
) -> Any:
    # 7-bit weights: onnxruntime's default session computes it as written on every x86-64 CPU.
    return quantize_qdq_symmetric(
        fp32_path, out_path, calibration, reduce_range=True, activation_calibration=activation_calibration
    )


def qdq_summary(model_proto: Any) -> dict[str, Any]:
    """Counts Q/DQ nodes and checks TensorRT's symmetric-int8 requirement.

    TensorRT's explicit quantization takes int8 Q/DQ with zero point 0. A Q/DQ node whose zero
    point is absent (ONNX then means uint8), not int8, or not all zeros fails the requirement.

    Returns:
      ``{"quantize_linear": int, "dequantize_linear": int, "nonzero_zero_points": int,
      "non_int8_zero_points": int, "tensorrt_symmetric": bool}``; ``tensorrt_symmetric`` is
      False when there are no Q/DQ nodes or any fails the requirement.
    """
    onnx = _deps.onnx()
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    for node in model_proto.graph.node:  # tf2onnx may emit zero points as Constant nodes
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    inits[node.output[0]] = numpy_helper.to_array(attr.t)
    counts = Counter(n.op_type for n in model_proto.graph.node)
    nonzero, non_int8 = 0, 0
    for node in model_proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            non_int8 += 1  # no zero point: uint8 by the ONNX spec
            continue
        zp = np.asarray(zp)
        if zp.dtype != np.int8:
            non_int8 += 1
        if np.any(zp != 0):
            nonzero += 1
    del onnx
    q, dq = counts.get("QuantizeLinear", 0), counts.get("DequantizeLinear", 0)
    return {
        "quantize_linear": q,
        "dequantize_linear": dq,
        "nonzero_zero_points": nonzero,
        "non_int8_zero_points": non_int8,
        "tensorrt_symmetric": (q + dq) > 0 and nonzero == 0 and non_int8 == 0,
    }


def saturation_probe(k: int = 64, n: int = 16) -> Any:
    """A Q/DQ MatMul that onnxruntime's fused int8 kernels compute wrongly where they saturate.

    ``x`` (1, k) quantized to int8 127 (scale 1/127), weights int8 127 (scale 1/127): every
    product pair is ``2 x 255 x 127`` once onnxruntime shifts the activations to uint8, above the
    16-bit limit of ``PMADDUBSW``. As written, every output is exactly ``k`` (quantized with scale
    ``k / 100`` to 100, so the output is ``k`` again).

    Returns:
      An ``onnx.ModelProto`` with input ``x`` (float32, ``[batch, k]``) and output ``y``.
    """
    onnx = _deps.onnx()
    from onnx import TensorProto  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    def const(name: str, value: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        const("s", np.float32(1 / 127)),
        const("z", np.int8(0)),
        const("w", np.full((k, n), 127, np.int8)),
        const("ys", np.float32(k / 100)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["m"]),
        helper.make_node("QuantizeLinear", ["m", "ys", "z"], ["mq"]),
        helper.make_node("DequantizeLinear", ["mq", "ys", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


@functools.cache
def fused_int8_saturates() -> bool:
    """Whether onnxruntime's fused int8 kernels saturate on this machine, measured.

    Runs :func:`saturation_probe` with all graph optimizations (Q/DQ fused into int8 kernels) and
    compares with its exact result; True on x86-64 CPUs without VNNI (AVX2, AVX-512 without VNNI),
    False where the sums are exact (VNNI, AMX, ARM). See :mod:`research.export.cpu`.
    """
    ort = _deps.onnxruntime()
    k = 64
    sess = ort.InferenceSession(saturation_probe(k).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((1, k), np.float32)})[0]
    return not bool(np.allclose(y, k))


ORT_OPTIMIZATIONS = {"all": "ORT_ENABLE_ALL", "basic": "ORT_ENABLE_BASIC", "none": "ORT_DISABLE_ALL"}


class OnnxRunner:
    """Runs an ONNX file in onnxruntime on the CPU execution provider.

    By default the session applies every graph optimization, as a plain
    ``onnxruntime.InferenceSession`` does: Q/DQ pairs around a Conv/MatMul are fused into int8
    kernels, whose results depend on the CPU (they saturate on x86-64 without VNNI; see
    :mod:`research.export.cpu`). ``optimization="none"`` executes the file as written (each
    DequantizeLinear/QuantizeLinear in float): the file's own semantics, the reference a Q/DQ file
    is checked against. ``x64_quant_precision=True`` sets onnxruntime's
    ``session.x64quantprecision=1``: on x86-64 its int8 weights are rewritten to uint8 so that the
    non-saturating ``uint8 x uint8`` kernels run (slower; the same products exactly).

    Args:
      path: the ``.onnx`` file.
      num_threads: intra-op threads (1 makes latencies comparable across runtimes).
      optimization: ``"all"`` (default), ``"basic"`` or ``"none"`` (``ORT_DISABLE_ALL``).
      x64_quant_precision: set ``session.x64quantprecision=1``.

    Example:
      >>> ref = OnnxRunner("model_int8_qdq_symmetric.onnx", optimization="none")  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_threads: int = 1,
        *,
        optimization: str = "all",
        x64_quant_precision: bool = False,
    ):
        if optimization not in ORT_OPTIMIZATIONS:
            raise ValueError(f"optimization={optimization!r} is not one of {tuple(ORT_OPTIMIZATIONS)}")
        ort = _deps.onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPTIMIZATIONS[optimization])
        if x64_quant_precision:
            opts.add_session_config_entry("session.x64quantprecision", "1")
            # onnxruntime refuses some graphs with it; its exception carries the whole message, which
            # it would also print to stderr as an error log (the export records the exception instead)
            opts.log_severity_level = 4
        self.description = ORT_OPTIMIZATIONS[optimization] + (
            " (Q/DQ executed as written)" if optimization == "none" else ""
        )
        if x64_quant_precision:
            self.description += ", session.x64quantprecision=1"
        self._sess = ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])
        first = self._sess.get_inputs()[0]
        self._in = first.name
        self._dtype = _ORT_DTYPES.get(first.type, np.float32)
        lead = first.shape[0] if first.shape else None
        self._fixed = lead if isinstance(lead, int) and lead > 0 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._fixed is not None and x.ndim and x.shape[0] != self._fixed:  # a fixed-batch file: in chunks
            return tflite.run_fixed_batch(self, x, self._fixed)
        return self._sess.run(None, {self._in: np.ascontiguousarray(x, dtype=self._dtype)})[0]


@register_format
class OnnxFormat(ExportFormat):
    """``model_{mode}.onnx``: the TFLite file converted by tf2onnx, run in onnxruntime.

    Variants: float32 and every full-integer TFLite mode (int8 becomes Q/DQ), plus the ONNX-only
    modes (:func:`register_onnx_quantization`) quantized from the float32 ONNX file. A Q/DQ file
    is also run as written (``reference``) and, where onnxruntime's fused int8 kernels saturate on
    this CPU, with ``session.x64quantprecision=1`` (``extra["x64quantprecision"]``).
    """

    name = "onnx"
    runtime_name = "onnxruntime"
    converted_from = "tflite"
    extension = ".onnx"

    def modes(self) -> tuple[str, ...]:
        full = (q for q in tflite.quantization_modes() if tflite.is_full_integer(q))
        return ("fp32", *full, *onnx_quantization_modes())

    def needs_calibration(self, mode: str) -> bool:
        return mode != "fp32" and mode in self.modes()

    def unavailable(self) -> str | None:
        for module in ("tensorflow", "tf2onnx", "onnx", "onnxruntime"):
            reason = formats_lib.module_available(module, _deps.INSTALL_HINT)
            if reason:
                return reason
        return None

    def prepare(self, job: ExportJob) -> None:
        # Measured, not inferred from the CPU flags.
        job.cpu = dataclasses.replace(job.cpu, u8s8_saturates=fused_int8_saturates())
        job.cpu_text += "; onnxruntime fused int8 kernels " + (
            "saturate (16-bit pair sums)" if job.cpu.u8s8_saturates else "exact (32-bit sums)"
        )

    def label(self, job: ExportJob, q: str) -> str:
        how = f"from {job.name}_fp32.onnx" if q in ONNX_QUANTIZATIONS else "tf2onnx from the TFLite file"
        return f"{job.name}_{q}.onnx (onnx_{q}, {how})"

    def produce(self, job: ExportJob, q: str) -> list[Produced]:
        path = job.path(f"{job.name}_{q}.onnx")
        if q in ONNX_QUANTIZATIONS:
            fp32_path = job.written("onnx")["fp32"].path
            rule = onnx_activation_rule(q, job.activation_calibration)
            proto = onnx_quantize(q, fp32_path, path, np.asarray(job.calibration), rule)
            extra: dict[str, Any] = {"from": os.path.basename(fp32_path), "activation_calibration": rule}
        else:
            proto = tflite_to_onnx(tflite.converted(job, q), opset=job.onnx_opset)
            write_onnx(proto, path)
            extra = {"opset": next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))}
        qdq = qdq_summary(proto)
        extra = {"qdq": qdq, **extra}
        ort_name = f"onnxruntime {formats_lib.dist_version('onnxruntime')}"
        reference = None
        if qdq["quantize_linear"] + qdq["dequantize_linear"]:
            # The file as written (each Q/DQ in float) and, where onnxruntime's fused u8s8 kernels
            # saturate, with its non-saturating u8u8 kernels (session.x64quantprecision=1).
            as_written = OnnxRunner(path, num_threads=job.num_threads, optimization="none")
            reference = job.agreement(f"{ort_name}, {as_written.description}", as_written)
            if job.cpu.u8s8_saturates:
                try:
                    precise = OnnxRunner(path, num_threads=job.num_threads, x64_quant_precision=True)
                    extra["x64quantprecision"] = dataclasses.asdict(
                        job.agreement(f"{ort_name}, {precise.description}", precise)
                    )
                except Exception as err:  # noqa: BLE001 - onnxruntime refuses some graphs with it
                    extra["x64quantprecision"] = {"error": f"{type(err).__name__}: {str(err)[-300:]}"}
        runner = OnnxRunner(path, num_threads=job.num_threads)
        return [
            Produced(
                name=f"onnx_{q}", quantize=q, path=path, runtime=ort_name, run=runner, extra=extra, reference=reference
            )
        ]

    def load(self, path: str, num_threads: int = 1) -> OnnxRunner:
        return OnnxRunner(path, num_threads=num_threads)
