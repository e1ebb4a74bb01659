"""Key paths of pytrees as readable strings.

Every per-layer choice in slimjax (sparsity, bits, rank) is keyed by a path string:
the pytree keys joined with ``/``, for example ``"layers/0/kernel"`` for a parameter or
``"layers/0"`` for a module. Rules, masks, reports and AutoML search spaces all use these
same strings.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax

PathKey = Any


def key_to_str(key: PathKey) -> str:
    """Returns the readable form of one pytree key (dict key, attribute, sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: Iterable[PathKey]) -> str:
    """Joins pytree keys with ``/``, dropping NNX's trailing ``.value`` attribute."""
    parts = [key_to_str(k) for k in path]
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """Lists ``(path, leaf)`` pairs of a pytree in its canonical (flatten) order.

    Example:
      >>> flatten_with_paths({"dense": {"kernel": 1, "bias": 2}})
      [('dense/bias', 2), ('dense/kernel', 1)]
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_str(p), leaf) for p, leaf in leaves]


def map_with_paths(fn: Callable[..., Any], tree: Any, *rest: Any, is_leaf=None) -> Any:
    """Like ``jax.tree.map`` but ``fn`` receives the leaf's path string first."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_to_str(p), *xs), tree, *rest, is_leaf=is_leaf)


def tree_paths(tree: Any) -> list[str]:
    """The path strings of a pytree's leaves, in flatten order."""
    return [p for p, _ in flatten_with_paths(tree)]


def get_by_path(tree: Any, path: str) -> Any:
    """Returns the subtree of a nested dict at ``path`` (keys may be str or int).

    Raises:
      KeyError: naming the missing key and the keys that exist at that level.
    """
    node = tree
    if not path:
        return node
    for part in path.split("/"):
        node = node[_lookup_key(node, part, path)]
    return node


def set_by_path(tree: dict, path: str, value: Any) -> dict:
    """Returns a copy of nested dict ``tree`` with the leaf at ``path`` replaced."""
    parts = path.split("/")
    out = dict(tree)
    key = _lookup_key(out, parts[0], path)
    out[key] = value if len(parts) == 1 else set_by_path(out[key], "/".join(parts[1:]), value)
    return out


def _lookup_key(node: Any, part: str, path: str) -> Any:
    keys = list(node.keys()) if hasattr(node, "keys") else list(range(len(node)))
    for k in keys:
        if str(k) == part:
            return k
    raise KeyError(f"no key {part!r} in path {path!r}; keys at this level: {[str(k) for k in keys]}")
