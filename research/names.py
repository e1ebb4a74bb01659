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

import ast
import importlib.util
import inspect
import pathlib
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
        "attn_gru": "research.nn.sequence:attn_gru",
        "vit": "research.nn.sequence:vit",
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
        "evolution": "research.automl.evolution:EvolutionSampler",
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
    "int16x8",
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


def declared_parameters(registry: Registry, name: str) -> list[inspect.Parameter] | None:
    """The parameters of entry ``name``'s function, read without importing its module.

    A loaded entry is inspected; a declared one is read from its module's source with :mod:`ast`
    (the ``module:attr`` target, located from the top-level package's path, so no package
    ``__init__`` runs). ``None`` when that cannot be done without running code: an unknown name, a
    target that is not a top-level ``def``, a module that is not a plain source file. Defaults are
    not evaluated (each parameter's default is ``inspect.Parameter.empty`` or ``...``).

    ``slimjax`` checks ``model.options`` / ``data.options`` keys with it before JAX is imported.
    """
    entry = registry.loaded(name)
    if entry is not None:
        try:
            return list(inspect.signature(entry).parameters.values())
        except (TypeError, ValueError):
            return None
    target = registry.pending().get(name)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package: walk to the submodule's file
        base = pathlib.Path(next(iter(spec.submodule_search_locations))).joinpath(*parts[1:])
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    elif len(parts) == 1 and spec.origin:
        path = pathlib.Path(spec.origin)
    else:
        return None
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return _ast_parameters(node.args)
    return None


def _ast_parameters(args: ast.arguments) -> list[inspect.Parameter]:
    P = inspect.Parameter
    out = [P(a.arg, P.POSITIONAL_ONLY) for a in args.posonlyargs]
    n_default = len(args.defaults)
    plain = args.args
    for i, a in enumerate(plain):
        has_default = i >= len(plain) - n_default
        out.append(P(a.arg, P.POSITIONAL_OR_KEYWORD, default=... if has_default else P.empty))
    if args.vararg:
        out.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append(P(a.arg, P.KEYWORD_ONLY, default=P.empty if d is None else ...))
    if args.kwarg:
        out.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    return out


def model_option_names(name: str) -> list[str] | None:
    """The keyword options of zoo model ``name`` (``ModelConfig.options`` keys), read without
    importing it; ``None`` when that needs the import (see :func:`declared_parameters`)."""
    params = declared_parameters(MODELS, name)
    if params is None:
        return None
    return sorted(p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name != "rngs")


def dataset_option_names(name: str) -> list[str] | None:
    """The keyword options of data set ``name``'s loader (``DataConfig.options`` keys), read
    without importing it; ``None`` when that needs the import."""
    params = declared_parameters(DATASETS, name)
    if params is None:
        return None
    return sorted(p.name for p in params if p.name != "seed" and p.kind == p.POSITIONAL_OR_KEYWORD)
