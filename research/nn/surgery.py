"""Model surgery: list modules by path, find and replace them, count parameters.

Surgery is explicit selection and replacement, never monkeypatching. Replacement functions
return a **new** model (the input is cloned first) so the original keeps working, e.g. as a
distillation teacher.

Paths are ``/``-joined attribute names and list indices, e.g. ``"blocks/0/conv1"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def iter_modules(model: nnx.Module, include_root: bool = False) -> list[tuple[str, nnx.Module]]:
    """All sub-modules with their paths, parents after children as NNX orders them.

    Containers (``nnx.List``) are left out; the root is included as ``""`` on request.
    """
    out = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.List) or (not path and not include_root):
            continue
        out.append((_path_str(path), module))
    return out


def find_modules(model: nnx.Module, module_type: type | tuple[type, ...]) -> list[tuple[str, nnx.Module]]:
    """The ``(path, module)`` pairs whose module is an instance of ``module_type``."""
    return [(p, m) for p, m in iter_modules(model) if isinstance(m, module_type)]


def get_module(model: nnx.Module, path: str) -> Any:
    """The sub-module (or attribute) at ``path``.

    Raises:
      KeyError: naming the missing part of the path and the module paths that exist.
    """
    node: Any = model
    if not path:
        return node
    for part in path.split("/"):
        try:
            node = (
                node[int(part)] if part.isdigit() and isinstance(node, (nnx.List, list, tuple)) else getattr(node, part)
            )
        except (AttributeError, IndexError) as e:
            known = [p for p, _ in iter_modules(model)]
            raise KeyError(f"no module at path {path!r} (failed at {part!r}); module paths: {known}") from e
    return node


def _set_in_place(model: nnx.Module, path: str, new: Any) -> None:
    parent_path, _, last = path.rpartition("/")
    parent = get_module(model, parent_path)
    if last.isdigit() and isinstance(parent, (nnx.List, list)):
        parent[int(last)] = new
    else:
        if not hasattr(parent, last):
            raise KeyError(f"no attribute {last!r} at {parent_path or '<root>'!r} for path {path!r}")
        setattr(parent, last, new)


def copy_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose arrays are fresh buffers.

    ``nnx.clone`` shares the (immutable) jax arrays with the original, and the jitted train
    steps donate the state's buffers: training a clone would delete the arrays of the model it
    was cloned from (a teacher, an earlier stage's model). Training a copy leaves them intact.
    """
    graphdef, state = nnx.split(model)
    # A device copy compiles nothing (Array.copy compiled one program per shape and dtype).
    state = jax.tree.map(lambda a: jax.device_put(a, may_alias=False) if isinstance(a, jax.Array) else a, state)
    return nnx.merge(graphdef, state)


def replace_module(model: nnx.Module, path: str, new: Any, *, copy: bool = True) -> nnx.Module:
    """Returns a model whose module at ``path`` is ``new``.

    Args:
      model: the model; left untouched when ``copy`` is True.
      path: where to put ``new`` (see :func:`iter_modules` for the paths).
      new: the replacement module.
      copy: clone ``model`` first (default). With False the model is changed in place.
    """
    if not path:
        raise ValueError("path '' is the root; build a new model instead of replacing the root")
    out = nnx.clone(model) if copy else model
    _set_in_place(out, path, new)
    return out


def replace_modules(
    model: nnx.Module,
    select: Callable[[str, nnx.Module], bool] | type | tuple[type, ...],
    make: Callable[[str, nnx.Module], Any],
    *,
    copy: bool = True,
) -> tuple[nnx.Module, list[str]]:
    """Replaces every selected module by ``make(path, module)``.

    Args:
      model: the model (cloned unless ``copy=False``).
      select: a module type (or tuple of types), or a predicate ``(path, module) -> bool``.
      make: builds the replacement; it may return the module itself to leave it alone.

    Returns:
      ``(new_model, replaced_paths)``.
    """
    out = nnx.clone(model) if copy else model
    if isinstance(select, (type, tuple)):
        types = select

        def select(path, module):  # noqa: F811
            return isinstance(module, types)

    targets = [(p, m) for p, m in iter_modules(out) if select(p, m)]
    # Deepest first so a replaced parent never invalidates a child's path.
    targets.sort(key=lambda pm: -pm[0].count("/"))
    replaced = []
    for path, module in targets:
        new = make(path, module)
        if new is not module:
            _set_in_place(out, path, new)
            replaced.append(path)
    return out, sorted(replaced)


def replace_by_type(model: nnx.Module, module_type, make, *, copy: bool = True):
    """Replaces every instance of ``module_type``; see :func:`replace_modules`."""
    return replace_modules(model, module_type, make, copy=copy)


def param_count(model_or_state: Any) -> int:
    """Number of parameter scalars (``nnx.Param`` only) in a model, or of all leaves in a pytree.

    The same count as :func:`research.metrics.count_params` (this name is kept for ``research.nn``).
    """
    from research.metrics.counting import count_params  # noqa: PLC0415 (lazy: no import cycle whatever research.metrics grows to import)

    return count_params(model_or_state)


def params_per_module(model: nnx.Module) -> dict[str, int]:
    """Parameters held directly by each module (not counting its children), by path."""
    counts = {}
    for path, module in iter_modules(model, include_root=True):
        own = 0
        for _name, value in vars(module).items():
            if isinstance(value, nnx.Param):
                own += int(np.prod(np.shape(value.value)))
        if own:
            counts[path] = own
    return counts


def summary(model: nnx.Module) -> str:
    """A table of modules with their type and own parameter count."""
    counts = params_per_module(model)
    rows = [(p, type(m).__name__, counts.get(p, 0)) for p, m in iter_modules(model)]
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{width}}  {'type':<16}{'params':>10}"]
    lines += [f"{p:<{width}}  {t:<16}{c:>10,}" for p, t, c in rows]
    lines.append(f"{'total':<{width}}  {'':<16}{param_count(model):>10,}")
    return "\n".join(lines)
