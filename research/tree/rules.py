"""Per-layer rules: frozen keyword-only dataclasses matched by regular expression.

One mechanism serves every per-layer choice in slimjax: pruning sparsity, quantization bits,
decomposition rank, channel ratios. A method subclasses :class:`Rule` with the fields it needs;
a list of rules is matched against path strings (see :mod:`research.tree.paths`) and the
**first** rule whose ``pattern`` matches (``re.search``) wins. Anchor with ``^``/``$`` to match
whole paths.

Path convention (the same for every method):
  A layer is named by its **module path** (``conv1``, ``blocks/0/conv``) and a parameter by its
  **parameter path** (``conv1/kernel``, ``conv1/bias``). A pattern is searched in both forms:

  * layer rules (``QuantRule``, ``DecompositionRule``, ``ChannelRule``; :func:`match_layer_rules`)
    select a layer when the pattern is found in its module path or in its kernel's path
    (``<module>/kernel``, the weight those methods change);
  * parameter rules (``SparsityRule``; :func:`match_param_rules`) select a parameter when the
    pattern is found in its own path or in its module's path.

  So ``conv1$``, ``^conv1/`` and ``conv1/kernel$`` name the same layer to every method,
  ``kernel$`` means every layer with a kernel, and ``bias$`` selects bias parameters (and no
  layer). Errors list the paths in the form the method matches, with the other form named.

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True, kw_only=True)
  ... class SparsityRule(Rule):
  ...   sparsity: float = 0.5
  >>> rules = [SparsityRule(pattern=r"bias$", sparsity=0.0), SparsityRule(pattern=r"kernel$")]
  >>> match_rules(rules, ["dense/kernel", "dense/bias"])["dense/kernel"].sparsity
  0.5
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TypeVar

R = TypeVar("R", bound="Rule")


class RuleError(ValueError):
    """A rule set that matches nothing, is ambiguous where ambiguity is forbidden, or is malformed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Base rule: a regular expression over module/parameter path strings.

    Attributes:
      pattern: regular expression searched (``re.search``) in the path string.
    """

    pattern: str = ".*"

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise RuleError(f"rule pattern {self.pattern!r} must be a string (a regular expression over paths)")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise RuleError(f"rule pattern {self.pattern!r} is not a valid regular expression: {e}") from e

    def matches(self, path: str) -> bool:
        """Whether this rule's pattern is found in ``path``."""
        return re.search(self.pattern, path) is not None


def first_match(rules: Sequence[R], path: str) -> R | None:
    """The first rule matching ``path``, or ``None``."""
    for rule in rules:
        if rule.matches(path):
            return rule
    return None


def match_rules(
    rules: Sequence[R],
    paths: Sequence[str],
    *,
    require_all_used: bool = True,
    forbid_ambiguous: bool = False,
    also: Mapping[str, Sequence[str]] | None = None,
    what: str = "paths",
) -> dict[str, R | None]:
    """Assigns to each path the first rule that matches it.

    Args:
      rules: ordered rules; the first match wins.
      paths: path strings to match.
      require_all_used: raise if some rule matches no path (usually a typo in a pattern).
      forbid_ambiguous: raise if a path is matched by more than one rule.
      also: other strings naming the same thing as a path (a layer's kernel path, a parameter's
        module path); a rule matches the path when its pattern is found in any of them.
      what: how the error message describes the paths (``"layer paths (module paths; ...)"``).

    Returns:
      A dict from each path to its rule (``None`` where nothing matched).

    Raises:
      RuleError: naming the rule that matched nothing (with the available paths), or the path
        matched by several rules.
    """
    out: dict[str, R | None] = {}
    used = [False] * len(rules)
    also = also or {}
    for path in paths:
        names = (path, *also.get(path, ()))
        hits = [i for i, r in enumerate(rules) if any(r.matches(n) for n in names)]
        if forbid_ambiguous and len(hits) > 1:
            raise RuleError(
                f"path {path!r} is matched by {len(hits)} rules "
                f"{[rules[i].pattern for i in hits]}; make the patterns disjoint or reorder them"
            )
        out[path] = rules[hits[0]] if hits else None
        if hits:
            used[hits[0]] = True
    if require_all_used:
        unused = [rules[i] for i, u in enumerate(used) if not u]
        if unused:
            shown = list(paths)[:40]
            more = "" if len(paths) <= 40 else f" ... ({len(paths) - 40} more)"
            raise RuleError(
                f"rule(s) matched no path (or were shadowed by earlier rules): "
                f"{[r.pattern for r in unused]}. Available {what}: {shown}{more}"
            )
    return out


def module_of(param_path: str) -> str:
    """The module path of a parameter path (``"blocks/0/conv/kernel"`` -> ``"blocks/0/conv"``)."""
    return param_path.rpartition("/")[0]


def match_layer_rules(rules: Sequence[R], module_paths: Sequence[str], **kwargs) -> dict[str, R | None]:
    """:func:`match_rules` for layer rules: a pattern may name the module path or its kernel path.

    ``QuantRule(pattern="conv1$")`` and ``QuantRule(pattern="conv1/kernel")`` both select the layer
    ``conv1`` (see the path convention in this module's docstring). Returns module path -> rule.
    """
    also = {m: (f"{m}/kernel" if m else "kernel",) for m in module_paths}
    what = "layer paths (module paths; a pattern may also name the kernel, 'conv1/kernel')"
    return match_rules(rules, module_paths, also=also, what=what, **kwargs)


def match_param_rules(rules: Sequence[R], param_paths: Sequence[str], **kwargs) -> dict[str, R | None]:
    """:func:`match_rules` for parameter rules: a pattern may name the parameter or its module.

    ``SparsityRule(pattern="conv1$")`` selects ``conv1/kernel`` and ``conv1/bias`` (see the path
    convention in this module's docstring). Returns parameter path -> rule.
    """
    also = {p: (module_of(p),) for p in param_paths if module_of(p)}
    what = "parameter paths (a pattern may also name the module, 'conv1')"
    return match_rules(rules, param_paths, also=also, what=what, **kwargs)


def describe_matches(matches: dict[str, Rule | None]) -> str:
    """A readable two-column table: path -> rule (or '-' where nothing matched)."""
    width = max((len(p) for p in matches), default=4)
    lines = [f"{'path':<{width}}  rule"]
    for path, rule in matches.items():
        lines.append(f"{path:<{width}}  {rule if rule is not None else '-'}")
    return "\n".join(lines)
