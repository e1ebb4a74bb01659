"""The ``export`` stage's config (standard library only: a config file imports it without JAX).

The stage's run function is :func:`research.export.stage.run_export`; the registry checks of
``formats``/``quantize`` import :mod:`research.export.formats` only when they run (after the
CLI has checked every plain value).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar

from research.config import Check
from research.config import ConfigError
from research.config import Each
from research.config import EarlierStage
from research.config import OneOf
from research.config import ValidationContext
from research.config import at_least_one
from research.registry import did_you_mean
from research.stages import StageConfig

#: The formats written when none are named (kept equal to ``research.export.formats.DEFAULT_FORMATS``;
#: a test checks it).
DEFAULT_FORMATS = ("stablehlo", "tflite", "onnx")


def _format_names() -> list[str]:
    from research.export.formats import format_names  # pylint: disable=import-outside-toplevel

    return format_names()


def _quantize_modes() -> tuple[str, ...]:
    from research.export.formats import quantize_modes  # pylint: disable=import-outside-toplevel

    return quantize_modes()


@dataclasses.dataclass(frozen=True)
class _Registered(OneOf):
    """:class:`OneOf` whose message names the closest registered name."""

    def check(self, value: Any, key: str, context: ValidationContext) -> None:
        names = self.names()
        if value is not None and value not in self.also and value not in names:
            raise ConfigError(
                f"{key}={value!r} is not registered ({self.what});{did_you_mean(value, names)} choose from {names}"
            )


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
        smallest file; check its top-1 agreement), ``int8_qdq_symmetric`` (the
        TensorRT-ready ONNX file, same calibration data) and ``int8_qdq_reduce_range`` (the same
        with 7-bit weights, for onnxruntime on x86-64 CPUs without VNNI).
      calibration_examples: size of the representative data set for int8.
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
        "formats": Each(_Registered(_format_names, "export format")),
        "quantize": Each(_Registered(_quantize_modes, "export quantization mode")),
        "calibration_examples": at_least_one,
        "eval_examples": at_least_one,
        "latency_batch_size": at_least_one,
        "latency_threads": at_least_one,
        "source": EarlierStage(also=("current",)),
    }
    formats: tuple[str, ...] = DEFAULT_FORMATS
    quantize: tuple[str, ...] = ()
    calibration_examples: int = 256
    eval_examples: int = 512
    latency_batch_size: int = 1
    latency_threads: int = 1
    source: str = "current"

    def check(self, key: str, context: ValidationContext) -> None:
        del context
        from research.export import formats as formats_lib  # pylint: disable=import-outside-toplevel

        found = formats_lib.problems(self.formats, self.quantize)
        if found:
            field, msg = found[0]
            raise ConfigError(f"{key}.{field}: {msg}")
