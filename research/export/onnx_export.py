"""ONNX export by converting the TFLite file with tf2onnx, and an onnxruntime runner.

Modern jax2tf emits a single ``XlaCallModule`` op holding StableHLO, which tf2onnx cannot convert
from a SavedModel; the TFLite file, whose ops are ordinary builtins, converts. A full-int8 TFLite
model becomes an ONNX graph in QDQ form: ``QuantizeLinear``/``DequantizeLinear`` pairs around
float ops, the explicit-quantization form TensorRT builds int8 engines from.

TensorRT accepts only symmetric int8 Q/DQ (zero point 0). TFLite quantizes weights symmetric
per channel but activations asymmetric, so :func:`qdq_summary` reports how many Q/DQ nodes have
a non-zero zero point; ``tensorrt_symmetric`` is True only when none do.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from typing import Any

import numpy as np

from research.export import _deps
from research.export._io import write_bytes_atomic

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


def tflite_to_onnx(tflite_bytes: bytes, opset: int = DEFAULT_OPSET) -> Any:
    """Converts TFLite bytes to an ``onnx.ModelProto`` with ``tf2onnx.convert.from_tflite``."""
    tf2onnx = _deps.tf2onnx()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "model.tflite")
        with open(src, "wb") as f:
            f.write(tflite_bytes)
        model_proto, _ = tf2onnx.convert.from_tflite(src, opset=opset)
    return model_proto


def check_onnx(path: str | os.PathLike) -> None:
    """Runs ``onnx.checker`` (full check) and opens an onnxruntime session on ``path``."""
    onnx = _deps.onnx()
    onnx.checker.check_model(os.fspath(path), full_check=True)
    OnnxRunner(path)


def write_onnx(model_proto: Any, path: str | os.PathLike) -> None:
    """Writes ``model_proto`` atomically, after the checker and onnxruntime accept it."""
    write_bytes_atomic(path, model_proto.SerializeToString(), check_onnx)


def qdq_summary(model_proto: Any) -> dict[str, Any]:
    """Counts Q/DQ nodes and checks TensorRT's symmetric-int8 requirement.

    Returns:
      ``{"quantize_linear": int, "dequantize_linear": int, "nonzero_zero_points": int,
      "tensorrt_symmetric": bool}``; ``tensorrt_symmetric`` is False when there are no Q/DQ
      nodes or any has a non-zero zero point.
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
    nonzero = 0
    for node in model_proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None and np.any(np.asarray(zp) != 0):
                nonzero += 1
    del onnx
    q, dq = counts.get("QuantizeLinear", 0), counts.get("DequantizeLinear", 0)
    return {
        "quantize_linear": q,
        "dequantize_linear": dq,
        "nonzero_zero_points": nonzero,
        "tensorrt_symmetric": (q + dq) > 0 and nonzero == 0,
    }


class OnnxRunner:
    """Runs an ONNX file in onnxruntime on the CPU execution provider.

    Args:
      path: the ``.onnx`` file.
      num_threads: intra-op threads (1 makes latencies comparable across runtimes).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int = 1):
        ort = _deps.onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        self._sess = ort.InferenceSession(
            os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        first = self._sess.get_inputs()[0]
        self._in = first.name
        self._dtype = _ORT_DTYPES.get(first.type, np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run(None, {self._in: np.ascontiguousarray(x, dtype=self._dtype)})[0]
