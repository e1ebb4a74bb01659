"""The ``decompose`` stage: factorize the current model, then fine-tune (optionally distilling).

The factorization decisions (which layers, which ranks) are written to
``ctx.workdir / "factorization.json"`` before fine-tuning. A killed stage started again rebuilds
exactly that structure from the file (no re-timing, whose outcome could differ) so the
fine-tuning checkpoints under ``ctx.workdir`` still fit the model and training resumes.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.decomposition.config import DecomposeStage
from methods.decomposition.surgery import DecompositionRule
from methods.decomposition.surgery import factorizable_layers
from methods.decomposition.surgery import factorize_recipe_step
from methods.decomposition.surgery import factorize_with_report
from research import constraints as constraints_lib
from research import recipe as recipe_lib
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import TrainStage
from research.stages import fine_tune
from research.stages import register_stage
from research.teacher import INPUT
from research.teacher import KDTermConfig
from research.teacher import TeacherConfig
from research.train import split_model
from research.tree import flatten_with_paths


def _pinned_rules(rows: list[dict]) -> list[DecompositionRule]:
    """Rules that rebuild exactly the recorded factorized layers (resume path)."""
    rules = []
    for row in rows:
        if row["decision"] != "factorized":
            continue
        rank = json.loads(row["rank"].replace("(", "[").replace(")", "]"))
        rank = tuple(rank) if isinstance(rank, list) else int(rank)
        rules.append(DecompositionRule(pattern=f"^{re.escape(row['path'])}$", method=row["method"], rank=rank))
    return rules


def _train_schedule(cfg: DecomposeStage) -> TrainStage | None:
    """``cfg.train`` with ``distill=True`` spelled as its teacher (Hinton KD from the input model)."""
    if cfg.train is None or not cfg.distill:
        return cfg.train
    term = KDTermConfig(name="hinton", weight=cfg.alpha, options={"temperature": cfg.temperature})
    teacher = TeacherConfig(stage=INPUT, terms=(term,), hard_weight=1.0 - cfg.alpha)
    return dataclasses.replace(cfg.train, teacher=teacher)


def _constrained_modules(bundle: Bundle, model: nnx.Module) -> tuple[list[str], str]:
    """Module paths of ``model`` whose kernels carry earlier sparsity masks, and the stage that declared them."""
    cons = constraints_lib.declared(bundle.extras)
    masks = bundle.extras.get(constraints_lib.MASKS)
    if constraints_lib.SPARSITY not in cons or masks is None:
        return [], ""
    _, params, _ = split_model(nnx.clone(model))
    aligned, _ = constraints_lib.align_masks(masks, params)
    paths = sorted({p.rpartition("/")[0] for p, m in flatten_with_paths(aligned) if m is not None})
    return paths, str(cons[constraints_lib.SPARSITY].get("stage"))


@register_stage(DecomposeStage)
def run_decompose(bundle: Bundle, cfg: DecomposeStage, ctx: StageContext) -> StageResult:
    """Factorizes ``bundle.model`` by ``cfg.rules`` and fine-tunes it (see :class:`DecomposeStage`)."""
    cfg.validate()
    ds = bundle.dataset
    sample = jnp.asarray(np.resize(ds.x_test, (cfg.speed_batch_size, *ds.x_test.shape[1:])))
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    record = ctx.workdir / "factorization.json"
    notes = []
    if record.exists():  # resume: the same structure as the interrupted attempt
        saved = json.loads(record.read_text())
        rules = _pinned_rules(saved["layers"])
        model = bundle.model
        if rules:
            model, _ = factorize_with_report(bundle.model, rules, sample_input=sample, check_speed=False)
        rows, summary = saved["layers"], saved["summary"]
        notes.append("resumed: structure rebuilt from factorization.json")
    else:
        rules = tuple(cfg.rules)
        train = _train_schedule(cfg)
        keep = train.keep_constraints if train is not None else True
        sparse, declared_by = _constrained_modules(bundle, bundle.model)
        if sparse and keep:
            # Factors of a pruned kernel are dense: keep such layers as they are (sparse). A rule
            # that selects only such layers has nothing left to do: it is dropped (and said so).
            others = [p for p in factorizable_layers(bundle.model) if p not in sparse]
            usable = tuple(r for r in rules if any(r.matches(p) or r.matches(f"{p}/kernel") for p in others))
            dropped = [r for r in rules if r not in usable]
            if dropped:
                notes.append(f"rules that select only layers kept sparse, not applied: {dropped}")
            rules = tuple(DecompositionRule(pattern=f"^{re.escape(p)}$", skip=True) for p in sparse) + usable
            notes.append(
                f"kept {len(sparse)} layers dense (unfactorized) that carry the sparsity masks of {declared_by}: "
                f"{', '.join(sparse)}; train.keep_constraints=False factorizes them and releases their masks"
            )
        model, report = factorize_with_report(
            bundle.model,
            rules,
            sample_input=sample,
            budget=cfg.budget(),
            check_speed=cfg.check_speed,
            min_speedup=cfg.min_speedup,
            repeats=cfg.repeats,
            seed=ctx.seed,
        )
        rows = report.rows()
        fb, fa = report.flops()
        summary = {
            "params_before": report.params_before,
            "params_after": report.params_after,
            "layer_flops_before": fb,
            "layer_flops_after": fa,
            "model_dense_ms": report.model_dense_ms,
            "model_factorized_ms": report.model_factorized_ms,
            "backend": report.backend,
            "speed_batch_size": report.batch_size,
        }
        record.write_text(json.dumps({"layers": rows, "summary": summary}, indent=1, default=float))
        if ctx.progress:
            print(report.table())
    for row in rows:
        if row["decision"] == "dense":
            notes.append(f"{row['path']} kept dense: {row['reason']}")
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    metrics["layers_factorized"] = float(sum(r["decision"] == "factorized" for r in rows))
    metrics["layers_kept_dense"] = float(sum(r["decision"] == "dense" for r in rows))
    train = _train_schedule(cfg)
    if train is not None:
        done = fine_tune(bundle, model, train, ctx, input_model=bundle.model)
        model = done.model
        notes += done.notes
        metrics.update(done.metrics)
    recipe = recipe_lib.append(bundle.recipe, factorize_recipe_step(rows))
    factorized = [r["path"] for r in rows if r["decision"] == "factorized"]
    extras = bundle.extras
    if factorized:
        _, params, _ = split_model(nnx.clone(model))
        extras = constraints_lib.declare_factorized(extras, params, factorized, stage=ctx.label)
    return StageResult(
        bundle=dataclasses.replace(bundle, model=model, recipe=recipe, extras=extras),
        metrics=metrics,
        tables={"layers": rows},
        artifacts=[str(record)],
        notes=notes,
    )
