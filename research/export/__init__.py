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
  ``int8_dense_per_tensor``, ``int8_per_tensor``, ``int16x8``; full integer calibrated on a representative
  dataset; ``activation_calibration="percentile"``/``"mse"`` clips the int8 activation ranges,
  :mod:`~research.export.tflite_ranges`), run in LiteRT;
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

from research.lazy import lazy_exports

# Public names, each imported on first use (research.lazy): a config file that names ExportStage
# loads only its standard-library config module, so slimjax checks its values before JAX loads.
_EXPORTS = {
    "activation_calibrations": "research.export.tflite_ranges",
    "artifact_latency": "research.export.latency",
    "ArtifactReport": "research.export.report",
    "atomic_path": "research.export._io",
    "batch_route": "research.export.tflite",
    "export": "research.export.api",
    "export_bundle": "research.export.stage",
    "EXPORT_FORMATS": "research.export.formats",
    "export_run": "research.export.stage",
    "export_stablehlo": "research.export.stablehlo",
    "ExportFormat": "research.export.formats",
    "ExportJob": "research.export.formats",
    "ExportReport": "research.export.report",
    "ExportStage": "research.export.config",
    "format_names": "research.export.formats",
    "FORMATS": "research.export.api",
    "free_batch_dim": "research.export.tflite",
    "fusion_report": "research.export.fusion",
    "FusionReport": "research.export.fusion",
    "get_format": "research.export.formats",
    "inference_fn": "research.export._trace",
    "load_stablehlo": "research.export.stablehlo",
    "OnnxRunner": "research.export.onnx_export",
    "op_counts": "research.export.tflite",
    "Produced": "research.export.formats",
    "qdq_summary": "research.export.onnx_export",
    "quantization_modes": "research.export.tflite",
    "register_activation_calibration": "research.export.tflite_ranges",
    "register_format": "research.export.formats",
    "register_quantization": "research.export.tflite",
    "size_breakdown": "research.export.tflite",
    "tflite_to_onnx": "research.export.onnx_export",
    "TFLiteRunner": "research.export.tflite",
    "to_tflite": "research.export.tflite",
    "UnsupportedOpError": "research.export._trace",
}
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # noqa: ANN202 - lazy names, and deprecated names forwarded with their warning
    if name == "OPTIONAL_FORMATS":
        from research.export import api  # noqa: PLC0415

        return api.__getattr__(name)
    return _lazy_getattr(name)
