"""Swapping fake-quant twins into a model by rules (mixed precision per layer).

Rules are :class:`QuantRule` objects (a :class:`research.tree.Rule`) matched by regular
expression against **module paths** of the Linear/Conv layers (``"conv1"``,
``"blocks/0/conv2"``, ``"head"``); the first match wins. A rule that matches no layer raises
:class:`research.tree.RuleError`. Layers that no rule matches, that a rule marks
``keep_float``, or that ``skip_first``/``skip_last`` exclude stay in float; they are logged
and listed by :func:`float_layers` and in :func:`methods.quantization.layer_table`.

Example (8-bit first and last layers, 4-bit LSQ elsewhere)::

    rules = [
        QuantRule(pattern=r"^(conv1|head)$", bits=8),
        QuantRule(pattern=r".*", bits=4, method="lsq"),
    ]
    qmodel = calibrate(quantize_model(fold_batchnorm(model), rules), batches)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from methods.quantization.folding import layer_order
from methods.quantization.modules import QuantConv
from methods.quantization.modules import QuantEinsum
from methods.quantization.modules import QuantLayer
from methods.quantization.modules import QuantLinear
from methods.quantization.modules import QuantLinearGeneral
from methods.quantization.modules import find_quantizers
from methods.quantization.rules import QuantRule
from research import recipe as recipe_lib
from research.nn import copy_model
from research.nn import get_module
from research.nn import iter_modules
from research.nn import replace_module
from research.registry import DuplicateNameError
from research.registry import Registry
from research.registry import same_definition
from research.tree import RuleError
from research.tree import match_layer_rules

log = logging.getLogger(__name__)

# Keyed by the float layer's "module.QualName" (a registry name is a string).
TWINS: Registry[type[QuantLayer]] = Registry(
    "fake-quant twin of a layer type", hint="register one with @register_twin(FloatLayerType)"
)


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def register_twin(float_type: type) -> Any:
    """Class decorator: registers a :class:`QuantLayer` subclass as the twin of ``float_type``.

    Raises:
      DuplicateNameError: ``float_type`` already has another twin (a ``ValueError``).
    """

    def deco(cls):
        if _type_name(float_type) in TWINS and not same_definition(TWINS.get(_type_name(float_type)), cls):
            raise DuplicateNameError(
                f"{float_type.__name__} already has fake-quant twin {TWINS.get(_type_name(float_type)).__name__}; "
                "pass a subclass of the layer type to register another"
            )
        TWINS.register(_type_name(float_type), cls)
        return cls

    return deco


register_twin(nnx.Linear)(QuantLinear)
register_twin(nnx.Conv)(QuantConv)
register_twin(nnx.LinearGeneral)(QuantLinearGeneral)
register_twin(nnx.Einsum)(QuantEinsum)


def _twin_of(module: Any) -> type[QuantLayer] | None:
    for t in type(module).__mro__:
        if _type_name(t) in TWINS:
            return TWINS.get(_type_name(t))
    return None


def quantizable_layers(model: nnx.Module) -> list[str]:
    """Paths of the float layers that have a registered fake-quant twin."""
    mods = iter_modules(model)
    quant_paths = [p for p, m in mods if isinstance(m, QuantLayer)]
    return [
        p
        for p, m in mods
        if _twin_of(m) is not None
        and not isinstance(m, QuantLayer)
        and not any(p.startswith(q + "/") for q in quant_paths)
    ]


def float_layers(model: nnx.Module) -> list[str]:
    """Paths of the Linear/Conv layers that are not fake-quantized (left in float)."""
    return quantizable_layers(model)


def quantize_model(
    model: nnx.Module,
    rules: Sequence[QuantRule],
    *,
    sample_input: Any = None,
    skip_first: bool = False,
    skip_last: bool = False,
    seed: int = 0,
) -> nnx.Module:
    """Returns a copy of ``model`` with fake-quant twins swapped in by ``rules``.

    Weights are copied: each twin wraps a copy of the float layer. Kernel quantizers start from
    the kernel's min/max (per channel); input quantizers need :func:`calibrate` before the
    model is run. Fold BatchNorm first (:func:`fold_batchnorm`) so the deployed, folded
    weights are what gets quantized.

    Args:
      model: the float model (left untouched).
      rules: ordered :class:`QuantRule` list; first match wins.
      sample_input: an input batch, needed for ``skip_first``/``skip_last`` when the model has
        no ``input_shape`` attribute (the execution order is traced).
      skip_first: keep the first layer to run in float.
      skip_last: keep the last layer to run in float.
      seed: seed of the stochastic-rounding streams.

    Returns:
      The fake-quant model. Layers left in float are logged (warning) and listed by
      :func:`float_layers`.

    Raises:
      ValueError: empty ``rules``, or a model that already has fake-quant layers.
      RuleError: a rule that matches no layer (the message lists the layer paths).

    Example:
      >>> from research.nn import build_model
      >>> m = build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
      >>> q = quantize_model(m, [QuantRule(pattern=".*", bits=4)], skip_last=True)
      >>> float_layers(q)
      ['head']
    """
    if not rules:
        raise ValueError("no rules given; pass e.g. [QuantRule(pattern='.*', bits=8)]")
    already = [p for p, m in iter_modules(model) if isinstance(m, QuantLayer)]
    if already:
        raise ValueError(f"model already has fake-quant layers at {already}; quantize the float model")
    paths = quantizable_layers(model)
    if not paths:
        raise RuleError(f"{type(model).__name__} has no Linear/Conv layer to quantize")
    matches = match_layer_rules(list(rules), paths, require_all_used=True)
    skipped: dict[str, str] = {}
    if skip_first or skip_last:
        order = [p for p in layer_order(model, sample_input) if p in matches]
        if skip_first:
            skipped[order[0]] = "skip_first"
        if skip_last:
            skipped[order[-1]] = "skip_last"
    # own buffers: a train step that donates the quantized model's arrays must not delete the float model's
    out = copy_model(model)
    rngs = nnx.Rngs(seed)
    reasons: dict[str, str] = {}
    for path in sorted(paths, key=lambda p: -p.count("/")):
        rule = matches[path]
        if path in skipped:
            reasons[path] = skipped[path]
            continue
        if rule is None:
            reasons[path] = "no rule matched"
            continue
        if rule.keep_float:
            reasons[path] = f"rule {rule.pattern!r} keep_float"
            continue
        layer = get_module(out, path)
        twin = _twin_of(layer)(layer, weight=rule.weight_spec(), input=rule.input_spec(), rngs=rngs.fork())
        out = replace_module(out, path, twin, copy=False)
    # the reasons travel with the model (a static attribute of its root), for float_report
    out.slimjax_float_reasons = tuple(sorted(reasons.items()))
    if reasons:
        log.warning("layers left in float: %s", ", ".join(f"{p} ({r})" for p, r in sorted(reasons.items())))
    return out


def _holds_weights(module: nnx.Module) -> bool:
    own = getattr(module, "__dict__", {})
    return any(isinstance(v, nnx.Param) and getattr(v, "ndim", 0) >= 2 for v in own.values())


def float_report(model: nnx.Module) -> list[dict[str, str]]:
    """What computes in float in a fake-quant model, and why: one row per layer or operation.

    Rows (``path``, ``type``, ``reason``), sorted by path:

    * layers with a fake-quant twin that were left in float, with the reason
      :func:`quantize_model` recorded (no rule matched, ``keep_float``, ``skip_first``/``skip_last``);
    * modules holding a weight matrix that no twin covers (a user layer type: register a twin with
      :func:`register_twin`);
    * the activation x activation products inside every ``nnx.MultiHeadAttention`` (query . key
      scores and attention-weights . value): no weights to quantize; their inputs (the
      projections' outputs) are computed by quantized layers and they run in float here (TFLite's
      int8 converter quantizes them at export).

    Args:
      model: a model returned by :func:`quantize_model` (or any NNX model: then every layer is float).
    """
    recorded = dict(getattr(model, "slimjax_float_reasons", ()) or ())
    rows = []
    for path in float_layers(model):
        layer = get_module(model, path)
        reason = recorded.get(path, "not quantized (the model did not go through quantize_model)")
        rows.append({"path": path, "type": type(layer).__name__, "reason": reason})
    quant = [p for p, m in iter_modules(model) if isinstance(m, QuantLayer)]
    covered = set(float_layers(model)) | set(quant)
    for path, module in iter_modules(model):
        inside = any(path == q or path.startswith(q + "/") for q in quant)
        if inside or path in covered or isinstance(module, QuantLayer):
            continue
        if isinstance(module, nnx.MultiHeadAttention):
            rows.append(
                {
                    "path": path,
                    "type": type(module).__name__,
                    "reason": "attention scores (query . key) and weights . value multiply two activations: "
                    "no weights to quantize, computed in float from the quantized projections",
                }
            )
        elif _twin_of(module) is None and _holds_weights(module):
            rows.append(
                {
                    "path": path,
                    "type": type(module).__name__,
                    "reason": f"no fake-quant twin for {type(module).__name__}; register one with "
                    "methods.quantization.surgery.register_twin",
                }
            )
    return sorted(rows, key=lambda r: r["path"])


# ----------------------------------------------------------------------------- recipes


def quantize_recipe_step(
    rules: Sequence[QuantRule], *, input_shape: Sequence[int], skip_first: bool, skip_last: bool, seed: int
) -> dict[str, Any]:
    """The :mod:`research.recipe` step replaying :func:`quantize_model` with these arguments."""
    return recipe_lib.step(
        "quantize_model",
        rules=[dataclasses.asdict(r) for r in rules],
        input_shape=list(input_shape),
        skip_first=bool(skip_first),
        skip_last=bool(skip_last),
        seed=int(seed),
    )


@recipe_lib.register_step("quantize_model")
def _replay_quantize(model: nnx.Module, data: dict[str, Any]) -> nnx.Module:
    rules = [QuantRule(**r) for r in data["rules"]]
    sample = jnp.zeros((2, *data["input_shape"]), jnp.float32)
    return quantize_model(
        model,
        rules,
        sample_input=sample,
        skip_first=data["skip_first"],
        skip_last=data["skip_last"],
        seed=data["seed"],
    )


#: Static (non-array) settings of a quantizer that calibration or training decides.
_QUANT_STATIC = ("signed", "calibrated")


def quant_static_recipe_step(model: nnx.Module) -> dict[str, Any]:
    """The :mod:`research.recipe` step restoring each quantizer's calibrated sign and state.

    Ranges, LSQ steps and PACT clips are arrays (stored with the state); whether a quantizer is
    calibrated and the sign calibration chose for it are Python attributes, recorded here.
    """
    return recipe_lib.step(
        "quant_static",
        quantizers={p: {a: getattr(fq, a) for a in _QUANT_STATIC} for p, fq in find_quantizers(model)},
    )


@recipe_lib.register_step("quant_static")
def _replay_quant_static(model: nnx.Module, data: dict[str, Any]) -> nnx.Module:
    found = dict(find_quantizers(model))
    for path, attrs in data["quantizers"].items():
        if path not in found:
            raise ValueError(f"no quantizer at {path!r}; quantizers: {sorted(found)}")
        for a in _QUANT_STATIC:
            setattr(found[path], a, attrs[a])
    return model
