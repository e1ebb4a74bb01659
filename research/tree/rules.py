"""Per-layer rules: frozen keyword-only dataclasses matched by regular expression.

One mechanism serves every per-layer choice in slimjax: pruning sparsity, quantization bits,
decomposition rank. A method subclasses :class:`Rule` with the fields it needs; a list of rules
is matched against path strings (see :mod:`research.tree.paths`) and the **first** rule whose
``pattern`` matches (``re.search``) wins. Anchor with ``^``/``$`` to match whole paths.

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
) -> dict[str, R | None]:
    """Assigns to each path the first rule that matches it.

    Args:
      rules: ordered rules; the first match wins.
      paths: path strings to match.
      require_all_used: raise if some rule matches no path (usually a typo in a pattern).
      forbid_ambiguous: raise if a path is matched by more than one rule.

    Returns:
      A dict from each path to its rule (``None`` where nothing matched).

    Raises:
      RuleError: naming the rule that matched nothing (with the available paths), or the path
        matched by several rules.
    """
    out: dict[str, R | None] = {}
    used = [False] * len(rules)
    for path in paths:
        hits = [i for i, r in enumerate(rules) if r.matches(path)]
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
                f"{[r.pattern for r in unused]}. Available paths: {shown}{more}"
            )
    return out


def describe_matches(matches: dict[str, Rule | None]) -> str:
    """A readable two-column table: path -> rule (or '-' where nothing matched)."""
    width = max((len(p) for p in matches), default=4)
    lines = [f"{'path':<{width}}  rule"]
    for path, rule in matches.items():
        lines.append(f"{path:<{width}}  {rule if rule is not None else '-'}")
    return "\n".join(lines)
