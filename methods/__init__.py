"""Compression methods built on ``research``: pruning, distillation, decomposition, quantization, NAS.

The packages export their names lazily (importing ``methods`` or a stage's config class does not
import JAX). :func:`register_stages` imports every method's stage module, which registers its
stage kinds (``prune``, ``distill``, ``decompose``, ``quantize``, ``qat``, ``nas``) and recipe
steps with ``research``; ``research`` calls it through the ``slimjax.stages`` entry point
(``pyproject.toml``), never by importing this package by name.
"""

import importlib

#: The method packages, each with a ``stage`` module that registers its stages.
PACKAGES = ("decomposition", "distillation", "nas", "pruning", "quantization")


def register_stages() -> None:
    """Registers every method's stages, and everything else its modules register on import
    (recipe steps, deploy hooks, scorers, observers...): imports every module each package exports
    and its ``stage`` module.

    This is the ``slimjax.stages`` entry point of the distribution (``methods:register_stages``);
    calling it again does nothing.
    """
    for name in PACKAGES:
        package = importlib.import_module(f"methods.{name}")
        for module in sorted(set(package._EXPORTS.values())):  # pylint: disable=protected-access
            importlib.import_module(module)
        importlib.import_module(f"methods.{name}.stage")


#: The standard-library modules that create the method registries a config names and declare
#: their built-in names (``methods.pruning.names``...).
NAMES_MODULES = ("methods.distillation.names", "methods.pruning.names", "methods.quantization.names")


def declare_names() -> None:
    """Declares every registry name the methods register, without importing JAX: imports the
    standard-library ``names`` modules. ``slimjax`` calls it (the ``declare_names`` of the
    ``slimjax.stages`` entry point's module, :func:`research.config.declare_plugin_names`) before
    checking a config's names, so a misspelt scorer or observer is reported before JAX loads.
    """
    for module in NAMES_MODULES:
        importlib.import_module(module)


def __getattr__(name: str):
    """The method packages are imported on first use (PEP 562)."""
    if name in PACKAGES:
        return importlib.import_module(f"methods.{name}")
    raise AttributeError(f"module 'methods' has no attribute {name!r}")


__all__ = [
    "NAMES_MODULES",
    "PACKAGES",
    "declare_names",
    "decomposition",
    "distillation",
    "nas",
    "pruning",
    "quantization",
    "register_stages",
]
