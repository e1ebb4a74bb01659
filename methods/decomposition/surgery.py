"""``factorize(model, rules)``: replace dense layers by factorized twins, measured, with a report.

Per-layer choices are :class:`DecompositionRule` objects (``research.tree.rules``) matched by
regular expression against module paths such as ``"blocks/0/conv1"`` or ``"layers/1"``; the
first match wins and a rule that matches no ``nnx.Linear``/``nnx.Conv`` path is an error.

For every matched layer the function picks the rank (fixed, kept energy, parameter/FLOP budget,
EVBMF, or a whole-model budget), builds the factorized layer from the trained weights, measures
the relative reconstruction error, and **times the dense and the factorized layer side by side**
on the current backend at the layer's real input shape. A layer whose factorized form is not
faster stays dense unless its rule says ``keep_if_slower=True``; the report says which and why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.decomposition.decompose import relative_error
from methods.decomposition.layers import CPConv
from methods.decomposition.layers import LowRankLinear
from methods.decomposition.layers import LowRankLinearGeneral
from methods.decomposition.layers import Tucker2Conv
from methods.decomposition.layers import check_factorizable_conv
from methods.decomposition.rank import dense_cost
from methods.decomposition.rank import energy_spectra
from methods.decomposition.rank import factorized_cost
from methods.decomposition.rank import rank_at_energy
from methods.decomposition.rank import select_rank
from methods.decomposition.rules import DecompositionRule
from methods.decomposition.rules import ModelBudget
from methods.decomposition.speed import layer_latencies
from research import recipe as recipe_lib
from research.nn import copy_model
from research.nn import get_module
from research.nn import iter_modules
from research.nn import param_count
from research.nn import replace_module
from research.tree.rules import match_layer_rules

FACTORIZED_TYPES = (LowRankLinear, LowRankLinearGeneral, CPConv, Tucker2Conv)


@dataclasses.dataclass
class LayerReport:
    """One row of the factorization report (times in milliseconds, FLOPs per example)."""

    path: str
    layer: str
    method: str
    rank: Any
    params_dense: int
    params_factorized: int
    flops_dense: int
    flops_factorized: int
    rel_error: float
    dense_ms: float
    factorized_ms: float
    decision: Literal["factorized", "dense"]
    reason: str

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.factorized_ms if self.factorized_ms > 0 else float("nan")


@dataclasses.dataclass
class FactorizationReport:
    """What :func:`factorize_with_report` did, layer by layer, plus whole-model figures."""

    layers: list[LayerReport]
    backend: str
    batch_size: int
    params_before: int
    params_after: int
    model_dense_ms: float = float("nan")
    model_factorized_ms: float = float("nan")

    def rows(self) -> list[dict[str, Any]]:
        """Per-layer rows as plain dicts (for the stage report and JSON)."""
        out = []
        for r in self.layers:
            d = dataclasses.asdict(r)
            d["rank"] = str(r.rank)
            d["speedup"] = r.speedup
            out.append(d)
        return out

    @property
    def factorized(self) -> list[str]:
        return [r.path for r in self.layers if r.decision == "factorized"]

    @property
    def kept_dense(self) -> list[str]:
        return [r.path for r in self.layers if r.decision == "dense"]

    def flops(self) -> tuple[int, int]:
        """FLOPs of the matched layers before and after (dense rows count their dense FLOPs)."""
        before = sum(r.flops_dense for r in self.layers)
        after = sum(r.flops_factorized if r.decision == "factorized" else r.flops_dense for r in self.layers)
        return before, after

    def table(self) -> str:
        """A fixed-width table of the rows and a totals line."""
        head = (
            f"{'layer':<22}{'method':<8}{'rank':>10}{'params':>16}{'MFLOPs':>16}{'rel.err':>8}"
            f"{'dense ms':>10}{'fact ms':>9}{'speedup':>8}  decision"
        )
        lines = [f"backend={self.backend} batch={self.batch_size}", head]
        for r in self.layers:
            p = f"{r.params_dense}->{r.params_factorized}"
            f = f"{r.flops_dense / 1e6:.2f}->{r.flops_factorized / 1e6:.2f}"
            lines.append(
                f"{r.path:<22}{r.method:<8}{str(r.rank):>10}{p:>16}{f:>16}{r.rel_error:>8.3f}"
                f"{r.dense_ms:>10.3f}{r.factorized_ms:>9.3f}{r.speedup:>8.2f}  {r.decision}: {r.reason}"
            )
        fb, fa = self.flops()
        lines.append(
            f"model params {self.params_before} -> {self.params_after} "
            f"({self.params_before / max(self.params_after, 1):.2f}x); matched-layer FLOPs "
            f"{fb / 1e6:.2f}M -> {fa / 1e6:.2f}M ({fb / max(fa, 1):.2f}x); model latency "
            f"{self.model_dense_ms:.3f} ms -> {self.model_factorized_ms:.3f} ms"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- shape capture


class _Recorder(nnx.Module):
    """Wraps a layer to record its input and output shapes while the forward pass is traced."""

    def __init__(self, inner: nnx.Module, record: Callable[[tuple, tuple], None]):
        self.inner = inner
        self.record = record

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        self.record(tuple(x.shape), tuple(y.shape))
        return y


def capture_shapes(model: nnx.Module, paths: Sequence[str], sample_input: jax.Array) -> dict[str, tuple[tuple, tuple]]:
    """Input and output shapes of the modules at ``paths`` for one forward pass (eval mode).

    Raises:
      ValueError: a module at one of ``paths`` was not called by the forward pass.
    """
    probe = nnx.clone(model)
    probe.eval()
    shapes: dict[str, tuple[tuple, tuple]] = {}
    for path in paths:
        inner = _get(probe, path)
        probe = replace_module(
            probe,
            path,
            _Recorder(inner, lambda i, o, p=path: shapes.setdefault(p, (i, o))),
            copy=False,
        )
    graphdef, state = nnx.split(probe)
    spec = jax.ShapeDtypeStruct(tuple(sample_input.shape), sample_input.dtype)
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, spec)  # shapes only, no compute
    missing = [p for p in paths if p not in shapes]
    if missing:
        raise ValueError(f"layers {missing} were not called on sample_input; they cannot be timed or costed")
    return shapes


def _get(model, path):
    from research.nn import get_module

    return get_module(model, path)


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass
class _Plan:
    path: str
    module: nnx.Module
    rule: DecompositionRule
    method: str
    kernel: np.ndarray
    in_shape: tuple
    out_shape: tuple
    rank: Any = None
    skip_reason: str = ""
    x_shape: tuple | None = None  # the layer's real input shape, when in_shape is its matrix view
    spectra: tuple | None = None  # the kernel's singular values, once a budget's bisection needs them

    def timing_shape(self) -> tuple:
        return self.x_shape if self.x_shape is not None else self.in_shape

    def spatial(self) -> dict[str, tuple]:
        """Spatial (conv) or extra token (linear) dims of the input and output, batch excluded."""
        return {"in_spatial": self.in_shape[1:-1], "out_spatial": self.out_shape[1:-1]}

    def bias(self) -> bool:
        return bool(self.module.use_bias)


def _candidates(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """Dense Linear/Conv modules that are not already inside a factorized layer."""
    inside = [p for p, m in iter_modules(model) if isinstance(m, FACTORIZED_TYPES)]
    out = []
    for path, module in iter_modules(model):
        if type(module) not in (nnx.Linear, nnx.LinearGeneral, nnx.Conv):
            continue
        if any(path.startswith(p + "/") for p in inside):
            continue
        out.append((path, module))
    return out


def factorizable_layers(model: nnx.Module) -> list[str]:
    """Module paths of the layers :func:`factorize` can factorize (what its rules are matched against)."""
    return [path for path, _ in _candidates(model)]


def _method_for(path: str, module: nnx.Module, rule: DecompositionRule) -> str:
    if isinstance(module, nnx.Linear | nnx.LinearGeneral):
        if rule.method not in ("auto", "svd"):
            raise ValueError(
                f"rule {rule.pattern!r} asks method={rule.method!r} for linear layer {path!r}; "
                "linear layers take method='svd' (or 'auto'); narrow the pattern to convolutions"
            )
        return "svd"
    if rule.method == "svd":
        raise ValueError(f"rule {rule.pattern!r} asks method='svd' for convolution {path!r}; use 'tucker2' or 'cp'")
    return "tucker2" if rule.method == "auto" else rule.method


def _knob_rank(plan: _Plan, t: float) -> Any:
    """The rank of ``plan`` at a shared budget knob ``t`` in (0, 1]."""
    if plan.method in ("svd", "tucker2"):  # the SVDs once per layer, not once per bisection step
        if plan.spectra is None:
            plan.spectra = energy_spectra(plan.kernel, plan.method)
        return rank_at_energy(plan.spectra, min(max(t, 1e-6), 1.0))
    kw = plan.spatial()
    dense_p = dense_cost(plan.kernel.shape, bias=plan.bias(), **kw)[0]
    per = factorized_cost("cp", plan.kernel.shape, 1, bias=False, **kw)[0]
    return max(1, int(round(t * dense_p / per)))


def _allocate(plans: list[_Plan], budget: ModelBudget) -> None:
    """Bisects the shared knob so the budgeted layers fit ``budget`` together."""
    index, ratio = (0, budget.param_ratio) if budget.param_ratio is not None else (1, budget.flop_ratio)
    dense_total = sum(dense_cost(p.kernel.shape, bias=p.bias(), **p.spatial())[index] for p in plans)

    def total(t: float) -> float:
        return sum(
            factorized_cost(p.method, p.kernel.shape, _knob_rank(p, t), bias=p.bias(), **p.spatial())[index]
            for p in plans
        )

    lo, hi = 1e-6, 1.0
    if total(lo) > ratio * dense_total:
        raise ValueError(
            f"{budget} cannot be met: rank 1 everywhere already costs "
            f"{total(lo) / dense_total:.3f} of the dense layers; raise the ratio"
        )
    if total(hi) > ratio * dense_total:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(mid) <= ratio * dense_total else (lo, mid)
        t = lo
    else:
        t = hi
    for p in plans:
        p.rank = _knob_rank(p, t)


def _build(plan: _Plan) -> nnx.Module:
    kw = {} if plan.rule.n_iter_max is None else {"n_iter_max": plan.rule.n_iter_max}
    if plan.method == "svd" and isinstance(plan.module, nnx.LinearGeneral):
        return LowRankLinearGeneral.from_dense(plan.module, plan.rank)
    if plan.method == "svd":
        return LowRankLinear.from_dense(plan.module, plan.rank)
    if plan.method == "tucker2":
        return Tucker2Conv.from_dense(plan.module, plan.rank, **kw)
    return CPConv.from_dense(plan.module, plan.rank, **kw)


def _general_plan(path: str, module: nnx.LinearGeneral, rule: DecompositionRule, shapes: tuple) -> _Plan:
    """A LinearGeneral planned as the matrix ``(prod(in), prod(out))`` it applies per token."""
    (in_shape, out_shape) = shapes
    n_in, n_out = len(module.in_features), len(module.out_features)
    kernel = np.asarray(module.kernel[...])
    n_batch = len(module.batch_axis)
    matrix = kernel.reshape(math.prod(kernel.shape[: n_batch + n_in]), -1)
    tokens = tuple(in_shape[1 : len(in_shape) - n_in])
    plan = _Plan(
        path,
        module,
        rule,
        "svd",
        matrix,
        (in_shape[0], *tokens, matrix.shape[0]),
        (out_shape[0], *tuple(out_shape[1 : len(out_shape) - n_out]), matrix.shape[1]),
        x_shape=tuple(in_shape),
    )
    if n_batch:
        plan.skip_reason = f"LinearGeneral with batch_axis={dict(module.batch_axis)} has one kernel per batch entry"
    return plan


# ----------------------------------------------------------------------------- entry points


def factorize_with_report(
    model: nnx.Module,
    rules: Sequence[DecompositionRule],
    *,
    sample_input: jax.Array | None = None,
    budget: ModelBudget | None = None,
    check_speed: bool = True,
    min_speedup: float = 1.0,
    warmup: int = 3,
    repeats: int = 20,
    seed: int = 0,
) -> tuple[nnx.Module, FactorizationReport]:
    """Factorizes the layers matched by ``rules``; see :func:`factorize`.

    Returns:
      ``(new_model, report)``; ``model`` itself is left unchanged.
    """
    rules = list(rules)
    if not rules:
        raise ValueError("rules is empty; pass e.g. [DecompositionRule(pattern='conv', vbmf=True)]")
    base = copy_model(model)  # no buffer shared with ``model``: donating training steps stay safe
    base.eval()
    cands = _candidates(base)
    matches = match_layer_rules(rules, [p for p, _ in cands])
    selected = [(p, m, matches[p]) for p, m in cands if matches[p] is not None and not matches[p].skip]
    if sample_input is None:
        if hasattr(base, "input_shape"):
            sample_input = jnp.zeros((1, *base.input_shape), jnp.float32)
        elif all(isinstance(m, nnx.Linear) for _, m, _ in selected):
            sample_input = None
        else:
            raise ValueError(
                "sample_input is needed to know each convolution's spatial size (the model has no "
                "input_shape attribute); pass sample_input=x[:batch]"
            )
    if sample_input is not None:
        shapes = capture_shapes(base, [p for p, _, _ in selected], sample_input)
        batch = int(sample_input.shape[0])
    else:
        shapes = {p: ((1, m.in_features), (1, m.out_features)) for p, m, _ in selected}
        batch = 1

    plans, rows = [], []
    for path, module, rule in selected:
        method = _method_for(path, module, rule)
        if isinstance(module, nnx.LinearGeneral):
            plan = _general_plan(path, module, rule, shapes[path])
        else:
            plan = _Plan(path, module, rule, method, np.asarray(module.kernel[...]), *shapes[path])
        if isinstance(module, nnx.Conv):
            try:
                check_factorizable_conv(module)
            except ValueError as e:
                plan.skip_reason = str(e).split(";")[0]
        if not plan.skip_reason and rule.criteria():
            plan.rank = select_rank(
                plan.kernel,
                method,
                **rule.criteria(),
                bias=plan.bias(),
                where=path,
                **plan.spatial(),
            )
        plans.append(plan)
    budgeted = [p for p in plans if not p.skip_reason and p.rank is None]
    if budgeted:
        if budget is None:
            raise ValueError(
                f"layers {[p.path for p in budgeted]} have rules without a rank criterion and no "
                "budget=ModelBudget(...) was given; set rank/energy/param_ratio/flop_ratio/vbmf or a budget"
            )
        _allocate(budgeted, budget)

    out = base
    key = jax.random.key(seed)
    for plan in plans:
        kw = plan.spatial()
        pd, fd = dense_cost(plan.kernel.shape, bias=plan.bias(), **kw)
        layer_name = type(plan.module).__name__
        if plan.skip_reason:
            rows.append(
                LayerReport(
                    plan.path,
                    layer_name,
                    plan.method,
                    "-",
                    pd,
                    pd,
                    fd,
                    fd,
                    0.0,
                    math.nan,
                    math.nan,
                    "dense",
                    plan.skip_reason,
                )
            )
            continue
        new = _build(plan)
        new.eval()
        pf, ff = factorized_cost(plan.method, plan.kernel.shape, plan.rank, bias=plan.bias(), **kw)
        err = relative_error(plan.kernel, np.asarray(new.dense_kernel()))
        dense_ms = fact_ms = math.nan
        if check_speed:
            key, sub = jax.random.split(key)
            x = jax.random.normal(sub, plan.timing_shape(), jnp.float32)
            d, f, before = layer_latencies(plan.module, new, x, warmup=warmup, repeats=repeats)
            dense_ms, fact_ms = 1e3 * d, 1e3 * f
            faster = d / f >= min_speedup if f > 0 else False
            if faster:
                decision, reason = "factorized", f"{d / f:.2f}x faster"
            elif plan.rule.keep_if_slower:
                decision, reason = "factorized", f"kept although {d / f:.2f}x (keep_if_slower=True)"
            else:
                decision, reason = "dense", f"factorized form measured {d / f:.2f}x (not faster)"
            if before:
                reason += " (timed earlier in this process: same layer shapes)"
        else:
            decision, reason = "factorized", "speed not measured (check_speed=False)"
        rows.append(
            LayerReport(
                plan.path,
                layer_name,
                plan.method,
                plan.rank,
                pd,
                pf,
                fd,
                ff,
                err,
                dense_ms,
                fact_ms,
                decision,
                reason,
            )
        )
        if decision == "factorized":
            out = replace_module(out, plan.path, new, copy=False)

    report = FactorizationReport(
        layers=rows,
        backend=jax.default_backend(),
        batch_size=batch,
        params_before=param_count(model),
        params_after=param_count(out),
    )
    if check_speed and sample_input is not None and report.factorized:
        d, f, _ = layer_latencies(base, out, sample_input, warmup=warmup, repeats=repeats)  # once per architecture
        report.model_dense_ms, report.model_factorized_ms = 1e3 * d, 1e3 * f
    return out, report


def factorize(
    model: nnx.Module,
    rules: Sequence[DecompositionRule],
    **kwargs: Any,
) -> nnx.Module:
    """Returns a copy of ``model`` with the layers matched by ``rules`` factorized.

    Each matched ``nnx.Linear`` becomes a :class:`LowRankLinear` (SVD) and each matched
    ``nnx.Conv`` a :class:`Tucker2Conv` (partial Tucker) or :class:`CPConv` (parafac), initialised
    from the trained weights. With ``check_speed=True`` (default) each layer is timed against
    its dense form (jit, warm-up, median of ``repeats`` alternating calls) and stays dense when
    not at least ``min_speedup`` times faster, unless its rule has ``keep_if_slower=True``.
    Grouped/depthwise convolutions stay dense with the reason in the report.

    Args:
      model: a trained model (not modified).
      rules: :class:`DecompositionRule` list, first match wins; a rule matching no
        Linear/Conv path raises ``research.tree.RuleError``.
      **kwargs: ``sample_input`` (a batch; default zeros of ``model.input_shape`` with batch 1),
        ``budget`` (:class:`ModelBudget`), ``check_speed``, ``min_speedup``, ``warmup``,
        ``repeats``, ``seed``; see :func:`factorize_with_report` for the report.

    Returns:
      The new model.

    Example:
      >>> from research.nn import build_model
      >>> m = build_model("mlp", input_shape=(16,), num_classes=4, widths=(32,), rngs=nnx.Rngs(0))
      >>> f = factorize(m, [DecompositionRule(pattern="layers", rank=4)], check_speed=False)
      >>> type(f.layers[0]).__name__
      'LowRankLinear'
    """
    return factorize_with_report(model, rules, **kwargs)[0]


# ----------------------------------------------------------------------------- recipes


def factorize_recipe_step(layers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The :mod:`research.recipe` step replaying the factorized layers of a report's rows.

    Args:
      layers: rows of :meth:`FactorizationReport.rows` (or ``factorization.json``'s ``"layers"``);
        only ``decision == "factorized"`` rows are kept, as ``{"path", "method", "rank"}``.
    """
    import json

    out = []
    for row in layers:
        if row["decision"] != "factorized":
            continue
        rank = row["rank"]
        if isinstance(rank, str):
            rank = json.loads(rank.replace("(", "[").replace(")", "]"))
        out.append({"path": row["path"], "method": row["method"], "rank": rank})
    return recipe_lib.step("factorize", layers=out)


def _shell(dense: nnx.Module, method: str, rank: Any) -> nnx.Module:
    """A factorized layer of ``dense``'s geometry with zero factors (values are loaded later)."""
    if method == "svd" and isinstance(dense, nnx.LinearGeneral):
        rank = int(rank)
        n_in, n_out = math.prod(dense.in_features), math.prod(dense.out_features)
        return LowRankLinearGeneral.from_dense(dense, rank, factors=(np.zeros((n_in, rank)), np.zeros((rank, n_out))))
    if method == "svd":
        rank = int(rank)
        return LowRankLinear.from_dense(
            dense, rank, factors=(np.zeros((dense.in_features, rank)), np.zeros((rank, dense.out_features)))
        )
    k = tuple(dense.kernel_size)
    cin, cout = dense.in_features, dense.out_features
    if method == "tucker2":
        r_in, r_out = (int(r) for r in rank)
        factors = (np.zeros((*k, r_in, r_out)), np.zeros((cin, r_in)), np.zeros((cout, r_out)))
        return Tucker2Conv.from_dense(dense, (r_in, r_out), factors=factors)
    if method == "cp":
        rank = int(rank)
        factors = [np.zeros((n, rank)) for n in k] + [np.zeros((cin, rank)), np.zeros((cout, rank))]
        return CPConv.from_dense(dense, rank, factors=factors)
    raise ValueError(f"unknown factorization method {method!r}; expected 'svd', 'tucker2' or 'cp'")


@recipe_lib.register_step("factorize")
def _replay_factorize(model: nnx.Module, data: dict[str, Any]) -> nnx.Module:
    out = copy_model(model)
    out.eval()
    for layer in data["layers"]:
        new = _shell(get_module(out, layer["path"]), layer["method"], layer["rank"])
        new.eval()
        out = replace_module(out, layer["path"], new, copy=False)
    return out
