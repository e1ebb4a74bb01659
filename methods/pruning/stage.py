"""The ``prune`` stage's run function: optional channel removal, then fine-tuning with pruning masks.

Example config entry (the config class is :class:`methods.pruning.config.PruneStage`)::

    PruneStage(sparsity=0.9, schedule="polynomial", train=TrainStage(steps=300))  # unstructured
    PruneStage(channel_ratio=0.5, sparsity=0.0, train=TrainStage(steps=200))      # remove half the channels
    PruneStage(pattern="nm", n=2, m=4, rules=(SparsityRule(pattern="head", sparsity=0.0),
                                              SparsityRule(pattern="kernel$")))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from methods.pruning.config import PruneStage
from methods.pruning.encoding import leaf_sparse_bytes
from methods.pruning.encoding import sparse_bytes
from methods.pruning.masks import mask_sparsity
from methods.pruning.patterns import NM
from methods.pruning.patterns import Block
from methods.pruning.patterns import Unstructured
from methods.pruning.schedules import iterative_schedule
from methods.pruning.schedules import one_shot_schedule
from methods.pruning.schedules import polynomial_schedule
from methods.pruning.schedules import program_key
from methods.pruning.scores import get_scorer
from methods.pruning.structured import remove_channels
from methods.pruning.structured.channels import plan_recipe_step
from methods.pruning.wrapper import masked
from research import constraints as constraints_lib
from research import recipe as recipe_lib
from research.nn import iter_modules
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import fine_tune
from research.stages import register_stage
from research.train import merge_model
from research.train import split_model
from research.train.masking import combine_masks
from research.train.masking import find_all_masks
from research.tree import flatten_with_paths


def _schedule(cfg: PruneStage, sparsity: float):
    end = max(1, int(cfg.ramp_fraction * cfg.steps))
    freq = cfg.frequency or max(1, cfg.steps // 20)
    makers = {
        "polynomial": lambda: polynomial_schedule(sparsity, begin_step=0, end_step=end, frequency=min(freq, end)),
        "iterative": lambda: iterative_schedule(sparsity, cfg.rounds, begin_step=0, end_step=end),
        "one_shot": lambda: one_shot_schedule(sparsity, 0),
    }
    return makers[cfg.schedule]()


def _pattern(cfg: PruneStage):
    return {
        "unstructured": Unstructured,
        "nm": lambda: NM(n=cfg.n, m=cfg.m),
        "block": lambda: Block(block=tuple(cfg.block)),
    }[cfg.pattern]()


def layer_table(model: nnx.Module, original: nnx.Module | None = None, masks=None) -> list[dict]:
    """Per-leaf rows: path, shape, sparsity (exact zeros), kept channels of Conv/Linear outputs."""
    _, params, _ = split_model(nnx.clone(model))
    out_feats = {p: getattr(m, "out_features", None) for p, m in iter_modules(model)}
    orig_feats = {p: getattr(m, "out_features", None) for p, m in iter_modules(original)} if original else {}
    pruned = None
    if masks is not None:
        pruned = {p for p, mk in flatten_with_paths(masks, is_leaf=lambda x: x is None) if mk is not None}
    rows = []
    for path, x in flatten_with_paths(params):
        x = np.asarray(x)
        mod = path.rpartition("/")[0]
        b = leaf_sparse_bytes(x)
        row = {
            "path": path,
            "shape": "x".join(map(str, x.shape)),
            "sparsity": round(1.0 - b["nonzeros"] / max(b["size"], 1), 4),
            "nonzeros": b["nonzeros"],
            "masked": pruned is not None and path in pruned,
        }
        if path.endswith("kernel") and out_feats.get(mod) is not None:
            row["kept_channels"] = f"{out_feats[mod]}/{orig_feats.get(mod, out_feats[mod])}"
        rows.append(row)
    return rows


@register_stage(PruneStage)
def run_prune(bundle: Bundle, cfg: PruneStage, ctx: StageContext) -> StageResult:
    """Removes channels (if asked), fine-tunes with masks, reports per-layer sparsity and bytes."""
    cfg.validate()
    original = bundle.model
    model = original
    notes, metrics = [], {}
    ds = bundle.dataset
    recipe = bundle.recipe
    if cfg.channel_ratio > 0 or cfg.channel_rules:
        sample = jnp.asarray(ds.x_train[:8])
        batch = {"x": sample, "y": jnp.asarray(ds.y_train[:8])}
        model, plan = remove_channels(
            model,
            sample,
            cfg.channel_ratio,
            cfg.channel_score,
            rules=cfg.channel_rules or None,
            batch=batch if cfg.channel_score == "taylor" else None,
            return_plan=True,
        )
        recipe = recipe_lib.append(recipe, plan_recipe_step(plan))
        bundle = dataclasses.replace(bundle, recipe=recipe)
        removed = sum(g.removed for g in plan.groups)
        notes.append(f"removed {removed} channels in {len(plan.groups)} coupled groups ({cfg.channel_score} score)")
    wrap = wrap_key = None
    if cfg.sparsity > 0 or cfg.pattern == "nm":
        pattern = _pattern(cfg)
        target = pattern.sparsity if isinstance(pattern, NM) else cfg.sparsity
        sched = _schedule(cfg, target)
        rules = cfg.rules or None

        def wrap(tx):
            return masked(
                tx,
                sched,
                rules=rules,
                scorer=cfg.scorer,
                allocation=cfg.allocation,
                pattern=pattern,
                seed=ctx.seed,
            )

        # What the wrapper's update bakes into the compiled step: runs with equal keys share it. The
        # targets (the schedule's and the rules' sparsities) are values in its state.
        wrap_key = ("masked", program_key(sched), get_scorer(cfg.scorer), cfg.allocation, pattern, ctx.seed)

    if cfg.train is None:
        return _prune_without_training(bundle, cfg, ctx, model, original, wrap, notes)
    done = fine_tune(bundle, model, cfg.train, ctx, input_model=original, wrap_tx=wrap, wrap_key=wrap_key)
    model, masks = done.model, done.masks
    notes += done.notes
    metrics.update(done.metrics)
    extras = _declare(bundle.extras, masks, cfg, ctx, own=wrap is not None)
    if masks is not None:
        metrics["mask_sparsity"] = mask_sparsity(masks)["__global__"]
    _, params, _ = split_model(nnx.clone(model))
    enc = sparse_bytes(params, masks)
    metrics.update({k: float(v) for k, v in enc.items()})
    metrics["sparsity"] = 1.0 - enc["nonzeros"] / max(enc["params"], 1)
    table = layer_table(model, original, masks)
    new_bundle = dataclasses.replace(bundle, model=model, extras=extras)
    return StageResult(bundle=new_bundle, metrics=metrics, tables={"layers": table}, notes=notes)


def _declare(extras, masks, cfg: PruneStage, ctx: StageContext, *, own: bool) -> dict:
    """``extras`` with this stage's sparsity constraint (its masks, combined with any kept earlier ones)."""
    if masks is None or not own:
        return dict(extras)  # no masks of its own: the earlier constraints (if any) are checked by the runner
    pattern = {"pattern": cfg.pattern}
    if cfg.pattern == "nm":
        pattern.update(n=cfg.n, m=cfg.m)
    elif cfg.pattern == "block":
        pattern["block"] = list(cfg.block)
    return constraints_lib.declare_sparsity(extras, masks, stage=ctx.label, **pattern)


def _prune_without_training(bundle, cfg, ctx, model, original, wrap, notes) -> StageResult:
    """``train=None``: one update of the mask wrapper around a zero optimizer, i.e. the one-shot
    masks of a training run, applied to the weights without any training step."""
    metrics: dict[str, float] = {}
    defs, params, model_state = split_model(nnx.clone(model))
    masks = None
    if wrap is not None:
        # The earlier stages' masks are kept here too (the same wrapper as in training).
        carry = constraints_lib.carried(bundle.extras, params)
        notes.extend(carry.notes)
        tx = carry.wrap(wrap(optax.set_to_zero()))
        state = tx.init(params)
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
        masks = combine_masks(*find_all_masks(state))
        metrics["mask_sparsity"] = mask_sparsity(masks)["__global__"]
    model = merge_model(defs.eval, params, model_state)
    notes.append("one-shot masks applied without fine-tuning (train=None)")
    enc = sparse_bytes(params, masks)
    metrics.update({k: float(v) for k, v in enc.items()})
    metrics["sparsity"] = 1.0 - enc["nonzeros"] / max(enc["params"], 1)
    extras = _declare(bundle.extras, masks, cfg, ctx, own=masks is not None)
    return StageResult(
        bundle=dataclasses.replace(bundle, model=model, extras=extras),
        metrics=metrics,
        tables={"layers": layer_table(model, original, masks)},
        notes=notes,
    )
