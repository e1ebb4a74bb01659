"""Export and compilation: every registered format written, then checked in its own runtime.

``export(model, sample_input, formats, out_dir, quantize, calibration)`` writes, for any
``flax.nnx`` model, the artifacts of the requested formats. Formats are registered
:class:`ExportFormat` classes (:mod:`research.export.formats`; ``format_names()`` lists them), one
module each:

* ``stablehlo`` (:mod:`~research.export.stablehlo`): ``model.stablehlo`` via ``jax.export`` and a
  ``model.stablehlo.json`` manifest (JAX/jaxlib versions, input/output shapes and dtypes, and the
  date until which the artifact is guaranteed loadable: 6 months of backward compatibility);
* ``tflite`` (:mod:`~research.export.tflite`): ``model_{mode}.tflite`` via jax2tf and the TFLite
  converter, one file per registered mode (``fp32``, ``fp16``, ``dynamic_int8``, ``int8``,
  ``int8_dense_per_tensor``, ``int8_per_tensor``; full integer calibrated on a representative
  dataset), run in LiteRT;
* ``onnx`` (:mod:`~research.export.onnx_export`): ``model_{mode}.onnx`` converted by tf2onnx from
  the TFLite file (full-integer modes in Q/DQ form) plus the ONNX-only modes
  (``int8_qdq_symmetric``, ``int8_qdq_reduce_range``), passing ``onnx.checker``, run in onnxruntime;
* ``tvm`` (:mod:`~research.export.tvm`, optional, needs ``onnx``): each ONNX file compiled by
  Apache TVM for this CPU;
* ``tensorrt`` (:mod:`~research.export.tensorrt`, optional, needs ``onnx`` and an NVIDIA GPU):
  ``fp32``/``fp16``/``int8_qdq_symmetric`` engines built from the ONNX files.

Each artifact runs in its real runtime on the same inputs as the JAX model; the
:class:`ExportReport` gives max absolute and relative differences, top-1 agreement, size (raw and
gzip) and median latency. The set is written to a staging directory and moved into ``out_dir``
together. TensorFlow and the ONNX stack are optional: a requested format that cannot run here is
refused before anything is converted, with its install command (``pip install 'slimjax[export]'``).

TensorRT without the Python bindings: ``trtexec`` builds an engine from the ONNX file; for the
symmetric int8 file, explicit Q/DQ nodes set the precision::

    trtexec --onnx=model_int8_qdq_symmetric.onnx --saveEngine=model_int8.plan --int8 --fp16 \\
        --minShapes=args_tf_0:1x28x28x1 --optShapes=args_tf_0:32x28x28x1 \\
        --maxShapes=args_tf_0:128x28x28x1

(use the input name and shape of your model: ``onnxruntime.InferenceSession(path)
.get_inputs()[0]``). TensorRT requires symmetric (zero-point 0) Q/DQ; TFLite's int8 activations
are asymmetric, which ``report['onnx_int8'].extra['qdq']['tensorrt_symmetric']`` reports.
"""

from research.export._io import atomic_path
from research.export._trace import UnsupportedOpError
from research.export._trace import inference_fn
from research.export.api import FORMATS
from research.export.api import export
from research.export.formats import EXPORT_FORMATS
from research.export.formats import ExportFormat
from research.export.formats import ExportJob
from research.export.formats import Produced
from research.export.formats import format_names
from research.export.formats import get_format
from research.export.formats import register_format
from research.export.fusion import FusionReport
from research.export.fusion import fusion_report
from research.export.latency import artifact_latency
from research.export.onnx_export import OnnxRunner
from research.export.onnx_export import qdq_summary
from research.export.onnx_export import tflite_to_onnx
from research.export.report import ArtifactReport
from research.export.report import ExportReport
from research.export.stablehlo import export_stablehlo
from research.export.stablehlo import load_stablehlo
from research.export.stage import ExportStage
from research.export.stage import export_bundle
from research.export.stage import export_run
from research.export.tflite import TFLiteRunner
from research.export.tflite import batch_route
from research.export.tflite import free_batch_dim
from research.export.tflite import op_counts
from research.export.tflite import quantization_modes
from research.export.tflite import register_quantization
from research.export.tflite import size_breakdown
from research.export.tflite import to_tflite

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "ExportFormat",
    "ExportJob",
    "Produced",
    "FusionReport",
    "ArtifactReport",
    "ExportReport",
    "ExportStage",
    "OnnxRunner",
    "TFLiteRunner",
    "UnsupportedOpError",
    "artifact_latency",
    "atomic_path",
    "batch_route",
    "export",
    "export_bundle",
    "export_run",
    "export_stablehlo",
    "format_names",
    "free_batch_dim",
    "fusion_report",
    "get_format",
    "inference_fn",
    "load_stablehlo",
    "op_counts",
    "qdq_summary",
    "quantization_modes",
    "register_format",
    "register_quantization",
    "size_breakdown",
    "tflite_to_onnx",
    "to_tflite",
]


def __getattr__(name: str):  # noqa: ANN202 - deprecated names, forwarded with their warning
    if name == "OPTIONAL_FORMATS":
        from research.export import api  # noqa: PLC0415

        return api.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
