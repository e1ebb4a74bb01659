"""Pytree helpers: key-path strings, rules matched by regex, counting."""

from research.tree.paths import flatten_with_paths
from research.tree.paths import get_by_path
from research.tree.paths import map_with_paths
from research.tree.paths import path_to_str
from research.tree.paths import set_by_path
from research.tree.paths import tree_paths
from research.tree.rules import Rule
from research.tree.rules import RuleError
from research.tree.rules import describe_matches
from research.tree.rules import first_match
from research.tree.rules import match_layer_rules
from research.tree.rules import match_param_rules
from research.tree.rules import match_rules
from research.tree.rules import module_of

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
