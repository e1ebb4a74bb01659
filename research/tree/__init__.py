"""Pytree helpers: key-path strings, rules matched by regex, counting.

Names are imported on first use (PEP 562): :mod:`research.tree.rules` (``Rule``, the rule
matching) is standard library only, so a rule class that a config file constructs loads without
JAX; :mod:`research.tree.paths` imports JAX.
"""

from research.lazy import lazy_exports

_EXPORTS = {
    "flatten_with_paths": "research.tree.paths",
    "get_by_path": "research.tree.paths",
    "map_with_paths": "research.tree.paths",
    "path_to_str": "research.tree.paths",
    "set_by_path": "research.tree.paths",
    "tree_paths": "research.tree.paths",
    "Rule": "research.tree.rules",
    "RuleError": "research.tree.rules",
    "describe_matches": "research.tree.rules",
    "first_match": "research.tree.rules",
    "match_layer_rules": "research.tree.rules",
    "match_param_rules": "research.tree.rules",
    "match_rules": "research.tree.rules",
    "module_of": "research.tree.rules",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Rule",
    "RuleError",
    "describe_matches",
    "first_match",
    "flatten_with_paths",
    "get_by_path",
    "map_with_paths",
    "match_layer_rules",
    "match_param_rules",
    "match_rules",
    "module_of",
    "path_to_str",
    "set_by_path",
    "tree_paths",
]
