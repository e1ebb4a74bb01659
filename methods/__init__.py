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


def __getattr__(name: str):
    """The method packages are imported on first use (PEP 562)."""
    if name in PACKAGES:
        return importlib.import_module(f"methods.{name}")
    raise AttributeError(f"module 'methods' has no attribute {name!r}")


__all__ = [
    "PACKAGES",
    "decomposition",
    "distillation",
    "nas",
    "pruning",
    "quantization",
    "register_stages",
]
