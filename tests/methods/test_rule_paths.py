"""One path convention for every rule (research/tree/rules.py): a regex names the same layer to every method.

Layer rules (QuantRule, DecompositionRule, ChannelRule) match a layer's module path or its kernel
path; parameter rules (SparsityRule) match a parameter's path or its module's path. So a pattern
written either way selects the same layer for pruning, quantization, decomposition and channel
removal, and errors list the paths of the convention in use.
"""

import jax.numpy as jnp
import pytest
from flax import nnx

from methods.decomposition import DecompositionRule
from methods.decomposition import factorize
from methods.pruning import SparsityRule
from methods.pruning import leaf_targets
from methods.pruning.structured import ChannelRule
from methods.pruning.structured import plan_channels
from methods.quantization import QuantRule
from methods.quantization import quant_layers
from methods.quantization import quantize_model
from research.nn import build_model
from research.nn import iter_modules
from research.train import split_model
from research.tree import RuleError
from research.tree import match_layer_rules
from research.tree import match_param_rules
from research.tree import module_of


def _mlp():
    return build_model("mlp", input_shape=(6,), num_classes=3, widths=(8, 8), rngs=nnx.Rngs(0))


# The layer layers/0 written as a module path, as a module prefix, and as its kernel's path.
@pytest.mark.parametrize("pattern", [r"layers/0$", r"^layers/0/", r"layers/0/kernel$"])
def test_one_pattern_names_the_same_layer_to_every_method(pattern):
    model = _mlp()
    _, params, _ = split_model(nnx.clone(model))
    pruned = leaf_targets(params, 0.5, [SparsityRule(pattern=pattern)])
    assert {module_of(p) for p in pruned} == {"layers/0"}
    assert "layers/0/kernel" in pruned

    quantized = quantize_model(model, [QuantRule(pattern=pattern, bits=4)])
    assert [p for p, _ in quant_layers(quantized)] == ["layers/0"]

    factorized = factorize(model, [DecompositionRule(pattern=pattern, rank=2)], check_speed=False)
    changed = [p for p, m in iter_modules(factorized) if type(m).__name__ == "LowRankLinear"]
    assert changed == ["layers/0"]

    plan = plan_channels(model, jnp.ones((1, 6)), 0.5, rules=[ChannelRule(pattern=pattern)])
    cut = [g.group.producers for g in plan.groups if len(g.keep) < g.group.size]
    assert cut == [["layers/0"]]


def test_both_forms_and_their_limits():
    layers = ["conv1", "blocks/0/conv"]
    params = ["conv1/kernel", "conv1/bias", "blocks/0/conv/kernel"]
    for pattern in ("conv1$", "conv1/kernel"):
        assert match_layer_rules([SparsityRule(pattern=pattern)], layers, require_all_used=False)["conv1"]
    assert match_param_rules([SparsityRule(pattern="conv1$")], params, require_all_used=False) == {
        "conv1/kernel": SparsityRule(pattern="conv1$"),
        "conv1/bias": SparsityRule(pattern="conv1$"),
        "blocks/0/conv/kernel": None,
    }
    # a layer is named through its kernel only: "bias$" selects bias parameters and no layer
    with pytest.raises(RuleError, match="matched no path"):
        match_layer_rules([SparsityRule(pattern="bias$")], layers)


def test_errors_list_the_paths_of_the_convention_in_use():
    model = _mlp()
    with pytest.raises(RuleError, match=r"Available layer paths \(module paths; .*'conv1/kernel'\).*'layers/0'"):
        quantize_model(model, [QuantRule(pattern="nonexistent")])
    _, params, _ = split_model(nnx.clone(model))
    with pytest.raises(RuleError, match=r"Available parameter paths \(a pattern may also name .*'layers/0/kernel'"):
        leaf_targets(params, 0.5, [SparsityRule(pattern="nonexistent")])
