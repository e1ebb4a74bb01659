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
from methods.decomposition.surgery import factorize_recipe_step
from methods.decomposition.surgery import factorize_with_report
from research import recipe as recipe_lib
from research.nn import copy_model
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import context_kwargs
from research.stages import register_stage
from research.stages import train_kwargs
from research.train import finetune


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


def _hinton_transform(teacher: nnx.Module, temperature: float, alpha: float):
    from methods.distillation import distill

    return distill(None, teacher, temperature=temperature, alpha=alpha)


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
        model, report = factorize_with_report(
            bundle.model,
            cfg.rules,
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
    if cfg.train is not None:
        transforms = ()
        if cfg.distill:
            transforms = (_hinton_transform(copy_model(bundle.model), cfg.temperature, cfg.alpha),)
            notes.append(f"fine-tuned with Hinton KD from the pre-decomposition model (T={cfg.temperature})")
        model, _ = finetune(model, ds, **context_kwargs(ctx), **train_kwargs(cfg.train), loss_transforms=transforms)
    recipe = recipe_lib.append(bundle.recipe, factorize_recipe_step(rows))
    return StageResult(
        bundle=dataclasses.replace(bundle, model=model, recipe=recipe),
        metrics=metrics,
        tables={"layers": rows},
        artifacts=[str(record)],
        notes=notes,
    )
