"""Channel scores, the pruning plan, channel masks and physical channel removal.

``remove_channels(model, sample_input, ratio)`` traces the model to find its coupled channel
groups (:mod:`methods.pruning.structured.graph`), scores every group's channels, drops the
lowest-scoring ``ratio`` of each group and returns a new, genuinely smaller NNX model (new Conv,
Linear and BatchNorm modules with fewer features, placed by ``research.nn`` surgery). Its
outputs equal those of the original model with the same channels masked to zero
(:func:`channel_masks`), up to float summation order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import methods.pruning.names as _names
from methods.pruning.rules import ChannelRule
from methods.pruning.rules import check_channel_ratio
from methods.pruning.structured.graph import MODEL_IO
from methods.pruning.structured.graph import ChannelGroup
from methods.pruning.structured.graph import trace_groups
from methods.pruning.structured.rebuild import fix_containers
from methods.pruning.structured.rebuild import rebuild
from research import recipe as recipe_lib
from research.nn import get_module
from research.nn import replace_modules
from research.registry import Registry
from research.registry import same_definition
from research.train import cross_entropy_loss
from research.train import merge_model
from research.train import split_model
from research.tree import flatten_with_paths
from research.tree import get_by_path
from research.tree import map_with_paths
from research.tree import match_layer_rules
from research.tree import set_by_path

PyTree = Any
ChannelScoreFn = Callable[[ChannelGroup, dict[str, np.ndarray], dict[str, np.ndarray] | None], np.ndarray]

# Created (with the built-in names declared) in the standard-library names module, so configs are checked before JAX.
CHANNEL_SCORES: Registry[tuple[ChannelScoreFn, bool]] = _names.CHANNEL_SCORES


def register_channel_score(name: str, *, needs_grad: bool = False) -> Callable[[ChannelScoreFn], ChannelScoreFn]:
    """Registers ``fn(group, params_by_path, grads_by_path_or_None) -> scores[group.size]``.

    Registering the same function again is a no-op.

    Raises:
      DuplicateNameError: another function is registered as ``name`` (a ``ValueError``).
    """

    def deco(fn: ChannelScoreFn) -> ChannelScoreFn:
        old = CHANNEL_SCORES.loaded(name)
        same = old is not None and same_definition(old[0], fn) and old[1] == needs_grad
        CHANNEL_SCORES.register(name, (fn, needs_grad), replace=same)
        return fn

    return deco


def list_channel_scores() -> list[str]:
    """Registered channel-score names."""
    return CHANNEL_SCORES.names()


def _per_channel(arr: np.ndarray, axis: int, fn) -> np.ndarray:
    moved = np.moveaxis(np.asarray(arr), axis, 0)
    return fn(moved.reshape(moved.shape[0], -1))


def _member_channel(arr: np.ndarray, m, size: int, fn) -> np.ndarray:
    """``fn`` of each channel's entries of member ``m`` (summed over a split/flattened axis's copies)."""
    per_entry = _per_channel(arr, m.axis, fn)
    return per_entry.reshape(m.outer, size, m.inner).sum(axis=(0, 2))


def _producer_norm(group, params, p):
    total = np.zeros(group.size)
    for m in group.members:
        if m.role == "out" and m.collection == "params":
            total += _member_channel(params[m.path], m, group.size, lambda a: np.sum(np.abs(a) ** p, axis=1))
    return total


@register_channel_score("l1")
def l1_channel_score(group, params, grads):
    """Sum of the producers' filter L1 norms (Li et al. 2017, https://arxiv.org/abs/1608.08710)."""
    del grads
    return _producer_norm(group, params, 1)


@register_channel_score("l2")
def l2_channel_score(group, params, grads):
    """Root of the summed squared filter norms of the producers."""
    del grads
    return np.sqrt(_producer_norm(group, params, 2))


@register_channel_score("bn_scale")
def bn_scale_channel_score(group, params, grads):
    """Summed ``|gamma|`` of the group's BatchNorm scales (network slimming, Liu et al. 2017,
    https://arxiv.org/abs/1708.06519); groups without BatchNorm fall back to ``l1``."""
    total = np.zeros(group.size)
    found = False
    for m in group.members:
        if m.role == "norm" and m.collection == "params" and m.path.endswith("/scale") and m.outer == 1:
            total += np.abs(np.asarray(params[m.path]))
            found = True
    return total if found else l1_channel_score(group, params, grads)


@register_channel_score("taylor", needs_grad=True)
def taylor_channel_score(group, params, grads):
    """First-order Taylor importance ``(sum_s g_s w_s)^2`` over each channel's producer and
    normalisation parameters (Molchanov et al. 2019, https://arxiv.org/abs/1906.10771)."""
    total = np.zeros(group.size)
    for m in group.members:
        if m.collection == "params" and m.role in ("out", "norm", "bias") and not (m.role == "norm" and m.outer > 1):
            gw = np.asarray(params[m.path]) * np.asarray(grads[m.path])
            total += _member_channel(gw, m, group.size, lambda a: np.sum(a, axis=1))
    return total**2


@dataclasses.dataclass
class GroupPlan:
    """The decision for one group: which channels stay."""

    group: ChannelGroup
    keep: np.ndarray  # sorted kept channel indices
    scores: np.ndarray

    @property
    def removed(self) -> int:
        return self.group.size - len(self.keep)


@dataclasses.dataclass
class ChannelPlan:
    """All groups of a model with the channels each keeps."""

    groups: list[GroupPlan]

    def table(self) -> list[dict]:
        """One row per group: name, producers, channels before/after."""
        return [
            {
                "group": g.group.name,
                "producers": ",".join(g.group.producers),
                "channels": g.group.size,
                "kept": len(g.keep),
            }
            for g in self.groups
        ]


def _gradients(model, batch, loss_fn):
    defs, params, state = split_model(nnx.clone(model))

    def loss(p):
        return loss_fn(merge_model(defs.eval, p, state), batch, jax.random.key(0))[0]

    # Jitted: an eager grad of a whole model dispatches (and compiles) every op one by one.
    return jax.jit(jax.grad(loss))(params)


def plan_channels(
    model: nnx.Module,
    sample_input: jax.Array,
    ratio: float,
    score: str = "l1",
    rules: Sequence[ChannelRule] | None = None,
    *,
    batch: dict | None = None,
    loss_fn=None,
    round_to: int = 1,
) -> ChannelPlan:
    """Decides which channels each coupled group keeps.

    Args:
      model: the NNX model.
      sample_input: a batch of inputs for tracing (batch size >= 2).
      ratio: default fraction of each group's channels to remove, in [0, 1).
      score: a registered channel score (``l1``, ``l2``, ``bn_scale``, ``taylor``).
      rules: :class:`ChannelRule` s matched against producer paths (first match wins); groups
        no rule matches are not pruned. ``None`` prunes every group by ``ratio``.
      batch: ``{"x", "y"}`` for gradient-based scores.
      loss_fn: loss for gradient-based scores (default cross-entropy).
      round_to: the number of kept channels is rounded up to a multiple of this (hardware-friendly).

    Raises:
      ValueError: bad ratio; a gradient score without ``batch``.
      KeyError: unknown score.
      research.tree.RuleError: a rule matches no producer path (the message lists them).
    """
    ratio = check_channel_ratio(ratio)
    fn, needs_grad = CHANNEL_SCORES.get(score)
    groups, skipped = trace_groups(model, sample_input, return_skipped=True)
    _warn_skipped(model, groups, skipped)
    _, params, _ = split_model(nnx.clone(model))
    flat = {p: np.asarray(x) for p, x in flatten_with_paths(params)}
    grads = None
    if needs_grad:
        if batch is None:
            raise ValueError(f"channel score {score!r} needs gradients; pass batch={{'x': ..., 'y': ...}}")
        grads = {
            p: np.asarray(g) for p, g in flatten_with_paths(_gradients(model, batch, loss_fn or cross_entropy_loss))
        }
    ratios = {g.name: ratio for g in groups}
    if rules is not None:
        producers = [p for g in groups for p in g.producers]
        matches = match_layer_rules(list(rules), producers)
        for g in groups:
            rule = next((matches[p] for p in g.producers if matches[p] is not None), None)
            ratios[g.name] = 0.0 if rule is None else (ratio if rule.ratio is None else rule.ratio)
    plans = []
    for g in groups:
        s = np.asarray(fn(g, flat, grads), dtype=np.float64)
        n_keep = max(1, g.size - int(np.floor(ratios[g.name] * g.size)))
        n_keep = min(g.size, int(np.ceil(n_keep / round_to) * round_to))
        keep = np.sort(np.argsort(-s, kind="stable")[:n_keep])
        plans.append(GroupPlan(g, keep, s))
    return ChannelPlan(plans)


class StructuredPruningWarning(UserWarning):
    """Some layers' output channels cannot be removed (the message names them and why)."""


def _warn_skipped(model: nnx.Module, groups: list[ChannelGroup], skipped: dict[str, str]) -> None:
    left = {p: r for p, r in skipped.items() if r != f"pinned by {MODEL_IO}"}

    def by_reason(items: dict[str, str]) -> str:
        reasons: dict[str, list[str]] = {}
        for p, r in items.items():
            reasons.setdefault(r, []).append(p)
        return "; ".join(f"{', '.join(repr(p) for p in ps)}: {r}" for r, ps in reasons.items())

    listed = by_reason(left)
    if not groups:
        reasons = listed or by_reason(skipped) or "it has no Conv/Linear layer"
        warnings.warn(
            f"structured pruning found nothing prunable in {type(model).__name__}, so the model is returned "
            f"unchanged: {reasons}. Channels can be removed where a Conv/Linear/LinearGeneral output reaches "
            "only rebuildable layers through ops the tracer understands (register_rebuilder, PRIMITIVE_RULES)",
            StructuredPruningWarning,
            stacklevel=3,
        )
    elif left:
        warnings.warn(
            f"structured pruning keeps the output channels of {len(left)} layer(s) of {type(model).__name__} "
            f"whole: {listed}",
            StructuredPruningWarning,
            stacklevel=3,
        )


def _leaf_indices(plan: ChannelPlan) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """For every sliced leaf, the kept indices per axis."""
    out: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for gp in plan.groups:
        if gp.removed == 0:
            continue
        for m in gp.group.members:
            idx = m.indices(gp.keep, gp.group.size)
            axes = out.setdefault((m.collection, m.path), {})
            if m.axis in axes:
                raise ValueError(f"axis {m.axis} of {m.path!r} is claimed by two channel groups")
            axes[m.axis] = idx
    return out


def channel_masks(model: nnx.Module, plan: ChannelPlan) -> PyTree:
    """Masks (shaped like the params, ``None`` where untouched) zeroing the removed channels.

    The masked model (``apply_masks(params, masks)``) computes what the smaller model of
    :func:`remove_channels` computes: every weight that reads or writes a removed channel is 0.
    """
    _, params, _ = split_model(nnx.clone(model))
    idx = _leaf_indices(plan)

    def mask(path, leaf):
        axes = idx.get(("params", path))
        if not axes:
            return None
        m = np.ones(np.shape(leaf), bool)
        for ax, keep in axes.items():
            sel = np.zeros(np.shape(leaf)[ax], bool)
            sel[keep] = True
            shape = [1] * m.ndim
            shape[ax] = -1
            m &= sel.reshape(shape)
        return jax.device_put(m)

    return map_with_paths(mask, params)


def apply_plan(model: nnx.Module, plan: ChannelPlan) -> nnx.Module:
    """The smaller model: every sliced Conv/Linear/BatchNorm rebuilt with fewer features."""
    return _apply_indices(model, _leaf_indices(plan))


def plan_recipe_step(plan: ChannelPlan) -> dict[str, Any]:
    """The :mod:`research.recipe` step that replays ``plan``'s removal (kept indices per sliced axis)."""
    leaves = [
        {"collection": coll, "path": path, "axes": [[int(ax), [int(i) for i in keep]] for ax, keep in axes.items()]}
        for (coll, path), axes in _leaf_indices(plan).items()
    ]
    return recipe_lib.step("remove_channels", leaves=leaves)


@recipe_lib.register_step("remove_channels")
def _replay_remove_channels(model: nnx.Module, data: dict[str, Any]) -> nnx.Module:
    idx = {
        (leaf["collection"], leaf["path"]): {int(ax): np.asarray(keep, np.int64) for ax, keep in leaf["axes"]}
        for leaf in data["leaves"]
    }
    small = _apply_indices(model, idx)
    small.eval()
    return small


def _apply_indices(model: nnx.Module, idx: dict[tuple[str, str], dict[int, np.ndarray]]) -> nnx.Module:
    model = nnx.clone(model)
    _, params, state = split_model(model)
    trees = {"params": params, "state": state}
    for (coll, path), axes in idx.items():
        arr = np.asarray(get_by_path(trees[coll], path))
        for ax, keep in axes.items():
            arr = np.take(arr, keep, axis=ax)
        trees[coll] = set_by_path(trees[coll], path, arr)
    changed = sorted({path.rpartition("/")[0] for _, path in idx})

    def make(path, module):
        leaves = {}
        for coll in ("params", "state"):
            node = get_by_path(trees[coll], path) if _has_path(trees[coll], path) else {}
            leaves.update({k: v for k, v in node.items() if not isinstance(v, dict)})
        return rebuild(module, leaves)

    new, _ = replace_modules(model, lambda p, m: p in changed, make, copy=False)
    for p in changed:
        get_module(new, p)  # every rebuilt path must exist
    fix_containers(new)
    return new


def _has_path(tree, path):
    try:
        get_by_path(tree, path)
        return True
    except (KeyError, TypeError, IndexError):
        return False


def remove_channels(
    model: nnx.Module,
    sample_input: jax.Array,
    ratio: float,
    score: str = "l1",
    rules: Sequence[ChannelRule] | None = None,
    *,
    batch: dict | None = None,
    loss_fn=None,
    round_to: int = 1,
    return_plan: bool = False,
):
    """Removes the lowest-scoring ``ratio`` of channels from every coupled group, for real.

    Args:
      model: an NNX model built from Conv / Linear / BatchNorm layers (any wiring: residual adds,
        depthwise convs, flatten before Linear are understood); not modified.
      sample_input: a batch of inputs (batch >= 2) used to trace the forward pass.
      ratio: fraction of channels to remove in [0, 1).
      score: ``l1``, ``l2``, ``bn_scale`` or ``taylor`` (needs ``batch``).
      rules: per-group ratios by producer path (see :class:`ChannelRule`).
      batch, loss_fn: for gradient-based scores.
      round_to: keep a multiple of this many channels.
      return_plan: also return the :class:`ChannelPlan`.

    Returns:
      The smaller model (evaluation mode), or ``(model, plan)``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from research.nn import build_model, param_count
      >>> m = build_model("mlp", input_shape=(8,), num_classes=3, widths=(16,), rngs=nnx.Rngs(0))
      >>> small = remove_channels(m, jnp.zeros((2, 8)), 0.5)
      >>> small.layers[0].out_features
      8
    """
    plan = plan_channels(model, sample_input, ratio, score, rules, batch=batch, loss_fn=loss_fn, round_to=round_to)
    small = apply_plan(model, plan)
    small.eval()
    _check_runs(small, sample_input, plan)
    return (small, plan) if return_plan else small


def _check_runs(small: nnx.Module, sample_input: jax.Array, plan: ChannelPlan) -> None:
    """Shapes only: the smaller model must still run (a size hard-coded in the model's code fails)."""
    graphdef, state = nnx.split(small)
    spec = jax.ShapeDtypeStruct(tuple(np.shape(sample_input)), jnp.asarray(sample_input).dtype)
    try:
        jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x), state, spec)
    except Exception as err:  # noqa: BLE001 - any failure means the rebuilt model is unusable
        pruned = [g.group.name for g in plan.groups if g.removed]
        raise ValueError(
            f"the model with channels removed from {pruned} no longer runs ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}). A size is probably hard-coded in the model's code (e.g. "
            "a recurrent carry jnp.zeros((batch, 16))): derive it from the layer (cell.hidden_features, "
            "cell.initialize_carry) or keep that group whole with ChannelRule(pattern=..., ratio=0.0)"
        ) from err
