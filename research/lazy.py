"""Lazy package exports (PEP 562): a package's public names, each imported on first use.

A package's ``__init__`` lists its public names and the module of each; a name's module (and
with it JAX and Flax) is imported on first access. The method packages use it, so a config file
that names ``PruneStage`` loads only its light config module and ``slimjax`` checks the
config's values before JAX loads::

    from research.lazy import lazy_exports

    _EXPORTS = {"PruneStage": "methods.pruning.config", "masked": "methods.pruning.wrapper"}
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
    __all__ = sorted(_EXPORTS)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package`` exporting ``exports`` lazily.

    Args:
      package: the package's name (``__name__``).
      exports: public name -> the module that defines it.

    Returns:
      ``(__getattr__, __dir__)`` to assign in the package's ``__init__``.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 - the PEP 562 hook
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip the hook
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
