import dataclasses

import jax.numpy as jnp
import pytest

from research.tree import Rule
from research.tree import RuleError
from research.tree import describe_matches
from research.tree import first_match
from research.tree import flatten_with_paths
from research.tree import get_by_path
from research.tree import map_with_paths
from research.tree import match_rules
from research.tree import set_by_path


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityRule(Rule):
    sparsity: float = 0.5


TREE = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)}, "layers": {0: {"kernel": jnp.ones(2)}}}


def test_paths_are_slash_joined_in_flatten_order():
    assert [p for p, _ in flatten_with_paths(TREE)] == ["conv/bias", "conv/kernel", "layers/0/kernel"]


def test_map_with_paths_passes_path():
    out = map_with_paths(lambda p, x: p, TREE)
    assert out["layers"][0]["kernel"] == "layers/0/kernel"


def test_get_and_set_by_path_with_int_keys():
    assert get_by_path(TREE, "layers/0/kernel").shape == (2,)
    new = set_by_path(TREE, "layers/0/kernel", 7)
    assert new["layers"][0]["kernel"] == 7 and TREE["layers"][0]["kernel"].shape == (2,)
    with pytest.raises(KeyError, match="keys at this level"):
        get_by_path(TREE, "conv/weight")


def test_first_match_wins():
    rules = [SparsityRule(pattern=r"bias$", sparsity=0.0), SparsityRule(pattern=r"conv", sparsity=0.9)]
    m = match_rules(rules, ["conv/bias", "conv/kernel", "layers/0/kernel"], require_all_used=True)
    assert m["conv/bias"].sparsity == 0.0
    assert m["conv/kernel"].sparsity == 0.9
    assert m["layers/0/kernel"] is None
    assert first_match(rules, "conv/bias") is rules[0]
    assert "conv/kernel" in describe_matches(m)


def test_unmatched_rule_is_reported_with_available_paths():
    rules = [SparsityRule(pattern=r"^dense")]
    with pytest.raises(RuleError, match=r"matched no path.*conv/kernel"):
        match_rules(rules, ["conv/kernel"])
    assert match_rules(rules, ["conv/kernel"], require_all_used=False) == {"conv/kernel": None}


def test_shadowed_rule_is_reported():
    rules = [SparsityRule(pattern="kernel"), SparsityRule(pattern="conv/kernel")]
    with pytest.raises(RuleError, match="shadowed"):
        match_rules(rules, ["conv/kernel"])


def test_ambiguous_rules_can_be_forbidden():
    rules = [SparsityRule(pattern="kernel"), SparsityRule(pattern="conv")]
    with pytest.raises(RuleError, match="matched by 2 rules"):
        match_rules(rules, ["conv/kernel"], forbid_ambiguous=True, require_all_used=False)


def test_rule_is_frozen_keyword_only_and_checks_regex():
    with pytest.raises(TypeError):
        SparsityRule("kernel")  # positional arguments are refused
    r = SparsityRule(pattern="kernel")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sparsity = 0.1
    with pytest.raises(RuleError, match="not a valid regular expression"):
        SparsityRule(pattern="(")
