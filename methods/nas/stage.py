"""The ``nas`` stage: train the config's family model as a supernet, search, extract and fine-tune.

The config's model must be a searchable family (``model.name=conv1d_family`` etc.) at its largest
options (the defaults). The stage trains it with the sandwich rule, searches the family on the
validation split, writes every candidate and the Pareto front to ``nas.json`` in the stage
directory, extracts the front's most accurate member within ``max_flops`` and fine-tunes it; that
member (an ordinary zoo model) is what later stages prune, quantize or export.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax

from methods.nas.config import NASStage
from methods.nas.evaluate import bn_momentum
from methods.nas.evaluate import calibration_batches
from methods.nas.evaluate import evaluate_subnets
from methods.nas.sandwich import progressive_phases
from methods.nas.sandwich import train_supernet
from methods.nas.search import pareto_front
from methods.nas.search import search
from methods.nas.supernet import extract
from methods.nas.supernet import split_supernet
from methods.nas.supernet import stack_masks
from research import nn
from research import recipe as recipe_lib
from research.config import ConfigError
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import fine_tune
from research.stages import register_stage


@register_stage(NASStage)
def run_nas(bundle: Bundle, cfg: NASStage, ctx: StageContext) -> StageResult:
    """Trains the supernet, searches, and fine-tunes the chosen member (see the module docstring)."""
    ds = bundle.dataset
    name = getattr(bundle.model, "family_name", None)
    if name not in nn.list_families():
        raise ConfigError(
            f"the nas stage needs a searchable family model; model.name is a {type(bundle.model).__name__}. "
            f"Set model.name to one of {nn.list_families()}"
        )
    fam = nn.get_family(name)
    net = split_supernet(bundle.model, fam, ds.input_shape, ds.num_classes)
    t0 = time.perf_counter()
    net, ce = train_supernet(
        net,
        ds.x_train,
        ds.y_train,
        steps=cfg.supernet_steps,
        batch_size=min(cfg.batch_size, len(ds.x_train)),
        learning_rate=cfg.learning_rate,
        n_random=cfg.n_random,
        temperature=cfg.temperature,
        seed=bundle.seed,
        phases=progressive_phases(fam, cfg.supernet_steps) if cfg.progressive else None,
    )
    t_train = time.perf_counter() - t0
    calib = None
    if bn_momentum(net) is not None:
        calib = calibration_batches(ds.x_train, cfg.calib_batches, min(64, len(ds.x_train) // cfg.calib_batches))
    t0 = time.perf_counter()
    cands = search(
        net, ds.x_val, ds.y_val, calib_x=calib, trials=cfg.trials, batch=cfg.batch, sampler=cfg.sampler, seed=ctx.seed
    )
    t_search = time.perf_counter() - t0
    front = pareto_front(cands)
    allowed = [i for i in front if cfg.max_flops <= 0 or cands[i].flops <= cfg.max_flops]
    if not allowed:
        raise ConfigError(
            f"no member of the Pareto front has at most max_flops={cfg.max_flops:g} FLOPs (smallest: "
            f"{min(cands[i].flops for i in front):g}); raise stages.nas.max_flops"
        )
    chosen = max(allowed, key=lambda i: cands[i].accuracy)
    stats = None
    if calib is not None:
        _, per = evaluate_subnets(net, stack_masks(net, [cands[chosen].options]), ds.x_val, ds.y_val, calib_x=calib)
        stats = jax.tree.map(lambda a: a[0], per)
    member = extract(net, cands[chosen].options, stats=stats)
    rows = [
        dict(c.options, accuracy=c.accuracy, flops=c.flops, bytes=c.bytes, pareto=i in front)
        for i, c in enumerate(cands)
    ]
    path = ctx.workdir / "nas.json"
    path.write_text(json.dumps({"family": fam.name, "chosen": cands[chosen].options, "candidates": rows}, indent=2))
    # A fresh member: it carries no earlier stage's constraints (extras={}), but its schedule's
    # teacher, if any, is used like in every fine-tuning stage.
    done = fine_tune(bundle, member, cfg.train, ctx, extras={})
    model = done.model
    # The chosen member is an ordinary zoo model: its recipe starts anew from that member, so the
    # finished stage is stored and rebuilt like any other (research.store / research.recipe).
    recipe = (recipe_lib.zoo_step(fam.name, cands[chosen].options, ds.input_shape, ds.num_classes, bundle.seed),)
    return StageResult(
        bundle=dataclasses.replace(bundle, model=model, recipe=recipe, extras={}),
        metrics={
            "supernet_final_ce_largest": float(ce[-1, 0]),
            "supernet_final_ce_smallest": float(ce[-1, 1]),
            "supernet_seconds": t_train,
            "search_seconds": t_search,
            "candidates": len(cands),
            "chosen_supernet_val_acc": cands[chosen].accuracy,
        },
        tables={"nas_front": [rows[i] for i in front]},
        artifacts=[str(path)],
        notes=[f"chosen {fam.name} member: " + ", ".join(f"{k}={v}" for k, v in cands[chosen].options.items())]
        + done.notes,
        base_extras={},
    )
