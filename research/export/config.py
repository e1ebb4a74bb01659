"""The ``export`` stage's config (standard library only: a config file imports it without JAX).

The stage's run function is :func:`research.export.stage.run_export`. The names in ``formats``
and ``quantize`` are checked against :mod:`research.names` (declared, no import) before JAX loads;
the checks of what a request needs (required formats, availability here) import
:mod:`research.export.formats` in the ``check`` hook, after the imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from research import names
from research.config import Check
from research.config import ConfigError
from research.config import Each
from research.config import EarlierStage
from research.config import Registered
from research.config import ValidationContext
from research.config import at_least_one
from research.stages import StageConfig

#: The formats written when none are named (kept equal to ``research.export.formats.DEFAULT_FORMATS``;
#: a test checks it).
DEFAULT_FORMATS = ("stablehlo", "tflite", "onnx")


INT8_LAYERNORM_CHOICES = ("l2_normalization", "as_is")
"""Values of ``ExportStage.int8_layernorm`` and ``format_options={"tflite": {"int8_layernorm": ...}}``:
how the full-int8 TFLite modes convert an ``nnx.LayerNorm`` or ``nnx.RMSNorm`` (``"l2_normalization"``, the default,
see :data:`research.export.tflite.L2_LAYERNORM_MODES`; ``"as_is"``: the layer's own ops, for a model
whose epsilons :func:`methods.quantization.int8_norm_epsilon` raised for that form)."""


def _activation_calibrations() -> tuple[str, ...]:
    # numpy and the registry only (no JAX, no TensorFlow): the rules' module is light
    from research.export import tflite_ranges  # pylint: disable=import-outside-toplevel

    return tflite_ranges.activation_calibrations()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportStage(StageConfig):
    """Export the current model and check every artifact in its runtime.

    Attributes:
      formats: registered export formats (:mod:`research.export.formats`): ``stablehlo``,
        ``tflite``, ``onnx``, ``tvm`` (needs ``onnx``), ``tensorrt`` (needs ``onnx`` and a GPU), or
        one registered by the user; checked before anything trains (name, required formats,
        whether it can run here).
      quantize: extra variants: ``fp16``, ``dynamic_int8``, ``int8`` (full integer TFLite,
        calibrated on ``calibration_examples`` training inputs; also gives the int8 ONNX file),
        ``int8_dense_per_tensor`` (as ``int8`` with one scale per fully connected kernel:
        smaller files for dense networks), ``int8_per_tensor`` (one scale per kernel: the
        smallest file; check its top-1 agreement), ``int16x8`` (TFLite's 16x8 mode: int16
        activations, int8 weights; for recurrent or LayerNorm-heavy models that lose top-1
        agreement in int8; its ONNX file has int16 Q/DQ at opset 21), ``int8_qdq_symmetric`` (the
        TensorRT-ready ONNX file, same calibration data) and ``int8_qdq_reduce_range`` (the same
        with 7-bit weights, for onnxruntime on x86-64 CPUs without VNNI).
      calibration_examples: size of the representative data set for int8.
      activation_calibration: how the int8 TFLite files (and their ONNX files) choose each
        activation's range from that data: ``minmax`` (the converter's own), ``percentile``
        (0.01/99.99 percentiles) or ``mse`` (:mod:`research.export.tflite_ranges`); the
        ``int8_qdq_*`` ONNX files take ``percentile`` through onnxruntime's calibrator and use
        min/max for ``mse``.
      int8_layernorm: how the full-int8 TFLite files (and their ONNX files) convert an
        ``nnx.LayerNorm`` or ``nnx.RMSNorm``: ``l2_normalization`` (default: one ``L2_NORMALIZATION`` op, statistics
        in 32-bit integers) or ``as_is`` (the layer's own ops; for a model whose epsilons a
        ``norm_epsilon`` stage raised). Needs ``tflite`` in ``formats``, or a format converted
        through it (``onnx``), to be anything but the default.
      eval_examples: test inputs on which every artifact is compared with JAX (top-1 agreement).
      latency_batch_size: batch size of the sample input used for latency.
      latency_threads: threads of the TFLite interpreter, onnxruntime and TVM when timing. Each
        artifact's median latency becomes a stage metric ``<artifact>_latency_ms`` (e.g.
        ``tflite_int8_latency_ms``), so ``slimjax tune --objective tflite_int8_latency_ms:min``
        searches against the deployed runtime's measured speed, not FLOPs.
      source: which model to export: ``"current"`` (the model the previous stage left) or the
        label/kind of an earlier stage (e.g. ``"prune"``). A fake-quant model (after a
        ``quantize``/``qat`` stage) is exported through the deploy hook that
        ``methods.quantization`` registers (:mod:`research.export.deploy`): its TFLite/ONNX
        files are converted from a float stand-in with the trained (dequantized) kernels and
        inputs clipped to the learned ranges, so TFLite's int8 calibration deploys the trained
        ranges; every artifact is compared with the fake-quant model and the report's notes
        and ``range_agreement`` say so.
    """

    kind: ClassVar[str] = "export"
    checks: ClassVar[Mapping[str, Check]] = {
        "formats": Each(Registered(names.EXPORT_FORMATS)),
        "quantize": Each(Registered(names.export_quantize_modes, what="export quantization mode")),
        "calibration_examples": at_least_one,
        "activation_calibration": Registered(_activation_calibrations, what="activation calibration"),
        "int8_layernorm": Registered(lambda: INT8_LAYERNORM_CHOICES, what="int8 LayerNorm form"),
        "eval_examples": at_least_one,
        "latency_batch_size": at_least_one,
        "latency_threads": at_least_one,
        "source": EarlierStage(also=("current",)),
    }
    formats: tuple[str, ...] = DEFAULT_FORMATS
    quantize: tuple[str, ...] = ()
    calibration_examples: int = 256
    activation_calibration: str = "minmax"
    int8_layernorm: str = "l2_normalization"
    eval_examples: int = 512
    latency_batch_size: int = 1
    latency_threads: int = 1
    source: str = "current"

    def check(self, key: str, context: ValidationContext) -> None:
        del context
        from research.export import formats as formats_lib  # pylint: disable=import-outside-toplevel

        found = formats_lib.problems(self.formats, self.quantize, activation_calibration=self.activation_calibration)
        if found:
            field, msg = found[0]
            raise ConfigError(f"{key}.{field}: {msg}")
        if self.int8_layernorm != "l2_normalization" and "tflite" not in formats_lib.conversions_used(self.formats):
            raise ConfigError(
                f"{key}.int8_layernorm={self.int8_layernorm!r} is an option of the TFLite conversion, and "
                f"formats={list(self.formats)} neither has 'tflite' nor is converted through it; "
                "add 'tflite' or 'onnx', or drop int8_layernorm"
            )
