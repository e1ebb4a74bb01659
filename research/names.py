"""The core's registries that a config names, with the names of their built-in entries declared.

Standard library only: ``slimjax`` checks ``model.name``, ``data.name``, ``stages.nas.sampler``
and ``stages.export.formats`` / ``stages.export.quantize`` against these before JAX is imported.
Each registry is the one its package registers into (``research.nn.registry.MODELS`` is
:data:`MODELS`); the declarations below name the ``module:attr`` that registers each built-in
entry on import (:meth:`research.registry.Registry.register_lazy`), and ``get`` imports it on
first use. ``tests/test_registry.py`` imports every module and checks that the registered names
equal the declared ones, so a new built-in entry needs its line here (the test prints it).

Entries registered by user code (a module beside the config that the config imports) are in the
same registries, so they are checked before JAX too; a stage plugin declares the names it
registers through ``declare_names()`` in its entry point's module (see
:func:`research.config.declare_plugin_names`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from research.registry import Registry

#: Zoo models (``research.nn.registry``): ``ModelConfig.name``.
MODELS: Registry[Callable[..., Any]] = Registry("model", hint="register one with @register_model('name')")
#: Shipped data sets (``research.data.datasets``): ``DataConfig.name``.
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", hint="register one with @register_dataset('name')")
#: AutoML samplers (``research.automl.samplers``): ``NASStage.sampler``.
SAMPLERS: Registry[type] = Registry("sampler", hint="register one with @register_sampler('name')")
#: Export formats (``research.export.formats``): ``ExportStage.formats``.
EXPORT_FORMATS: Registry[type] = Registry(
    "export format", hint="add one with @register_format on an ExportFormat subclass (research.export.formats)"
)

#: Distillation loss terms: ``KDTermConfig.name`` (a teacher's terms in every fine-tuning stage, the
#: distill stage's terms). The entries are a method package's (``methods.distillation.transforms``),
#: which declares its built-in names in its own names module; the registry lives here so the core's
#: ``KDTermConfig`` checks a term's name before JAX is imported.
KD_TERMS: Registry[Callable[..., Any]] = Registry(
    "KD term", hint="register a factory options -> KDTerm with @register_kd_term('name')"
)

_DECLARED: Mapping[Registry, Mapping[str, str]] = {
    MODELS: {
        "cnn1d": "research.nn.zoo:cnn1d",
        "lenet300": "research.nn.zoo:lenet300",
        "lenet5": "research.nn.zoo:lenet5",
        "mlp": "research.nn.zoo:mlp",
        "mobilenetv2": "research.nn.zoo:mobilenetv2",
        "resnet20": "research.nn.zoo:resnet20",
        "resnet56": "research.nn.zoo:resnet56",
        "vgg_small": "research.nn.zoo:vgg_small",
        "conv1d_family": "research.nn.families:conv1d_family",
        "mlp_family": "research.nn.families:mlp_family",
        "mobilenet_family": "research.nn.families:mobilenet_family",
        "resnet_family": "research.nn.families:resnet_family",
    },
    DATASETS: {
        "digits": "research.data.datasets:_digits",
        "mnist1d": "research.data.datasets:_mnist1d",
        "mnist5k": "research.data.datasets:_mnist5k",
        "synthetic": "research.data.datasets:_synthetic",
    },
    SAMPLERS: {
        "bohb": "research.automl.tpe:BOHBSampler",
        "ehvi": "research.automl.mo:EHVISampler",
        "gp": "research.automl.gp:GPSampler",
        "motpe": "research.automl.mo:MOTPESampler",
        "qmc": "research.automl.samplers:QMCSampler",
        "random": "research.automl.samplers:RandomSampler",
        "sobol": "research.automl.samplers:QMCSampler",
        "tpe": "research.automl.tpe:TPESampler",
    },
    EXPORT_FORMATS: {
        "onnx": "research.export.onnx_export:OnnxFormat",
        "stablehlo": "research.export.stablehlo:StableHLOFormat",
        "tensorrt": "research.export.tensorrt:TensorRTFormat",
        "tflite": "research.export.tflite:TFLiteFormat",
        "tvm": "research.export.tvm:TVMFormat",
    },
}
for _registry, _entries in _DECLARED.items():
    for _name, _target in _entries.items():
        _registry.register_lazy(_name, _target)

#: The ``quantize=`` modes the built-in export formats write (``research.export.formats.quantize_modes()``
#: once they are imported; the conformance test checks the two agree).
EXPORT_QUANTIZE_MODES: tuple[str, ...] = (
    "fp16",
    "dynamic_int8",
    "int8",
    "int8_dense_per_tensor",
    "int8_per_tensor",
    "int8_qdq_reduce_range",
    "int8_qdq_symmetric",
)


def export_quantize_modes() -> list[str]:
    """The known ``ExportStage.quantize`` modes without importing the formats: the built-in ones,
    and those of every format registered so far once ``research.export.formats`` is loaded."""
    formats = sys.modules.get("research.export.formats")
    loaded = formats.quantize_modes() if formats is not None and hasattr(formats, "quantize_modes") else ()
    return list(dict.fromkeys([*EXPORT_QUANTIZE_MODES, *loaded]))


def registries() -> dict[str, Registry]:
    """The registries declared here, by the name their package exports them under."""
    return {"MODELS": MODELS, "DATASETS": DATASETS, "SAMPLERS": SAMPLERS, "EXPORT_FORMATS": EXPORT_FORMATS}
