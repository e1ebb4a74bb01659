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
import types
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose exported name may equal one of its submodules (``automl.hypervolume``).

    Importing a submodule binds it on its package under the submodule's name. When the package
    exports a function of the same name from that submodule, that binding would shadow the
    function for the rest of the process, depending on which import ran first; this class keeps
    the exported function instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        exports = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, types.ModuleType) and exports.get(name) == value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package`` exporting ``exports`` lazily.

    Args:
      package: the package's name (``__name__``).
      exports: public name -> the module that defines it.

    Returns:
      ``(__getattr__, __dir__)`` to assign in the package's ``__init__``.
    """

    module_object = sys.modules[package]
    module_object._lazy_exports = dict(exports)
    module_object.__class__ = _LazyPackage

    def __getattr__(name: str) -> Any:  # noqa: N807 - the PEP 562 hook
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip the hook
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted((set(exports) | set(vars(sys.modules[package]))) - {"_lazy_exports"})

    return __getattr__, __dir__
