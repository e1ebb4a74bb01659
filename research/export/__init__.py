"""Export and compilation: StableHLO, TFLite (fp32/fp16/int8) and ONNX, checked in their runtimes.

``export(model, sample_input, formats, out_dir, quantize, calibration)`` writes, for any
``flax.nnx`` model:

* ``model.stablehlo`` via ``jax.export`` and a ``model.stablehlo.json`` manifest (JAX/jaxlib
  versions, input/output shapes and dtypes, and the date until which the artifact is guaranteed
  loadable: 6 months of backward compatibility);
* ``model_{fp32,fp16,dynamic_int8,int8}.tflite`` via jax2tf and the TFLite converter (full int8
  calibrated on a representative dataset);
* ``model_{fp32,int8}.onnx`` converted by tf2onnx from the TFLite file (int8 in Q/DQ form),
  passing ``onnx.checker``.

Each artifact runs in its real runtime (LiteRT interpreter, onnxruntime, ``jax.export``
deserialization) on the same inputs as the JAX model; the :class:`ExportReport` gives max
absolute and relative differences, top-1 agreement, size (raw and gzip) and median latency.
Writes are atomic. TensorFlow and the ONNX stack are optional: they are imported on first use
(``pip install 'slimjax[export]'``).

TensorRT (not run here: TensorRT is not installed in this project's environments) builds an
engine from the ONNX file; for the int8 file, explicit Q/DQ nodes set the precision::

    trtexec --onnx=model_int8.onnx --saveEngine=model_int8.plan --int8 --fp16 \\
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
