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
from collections.abc import Mapping
from typing import ClassVar

import jax

from methods.nas.evaluate import bn_momentum
from methods.nas.evaluate import calibration_batches
from methods.nas.evaluate import evaluate_subnets
from methods.nas.sandwich import train_supernet
from methods.nas.search import pareto_front
from methods.nas.search import search
from methods.nas.supernet import extract
from methods.nas.supernet import split_supernet
from methods.nas.supernet import stack_masks
from research import nn
from research import recipe as recipe_lib
from research.automl import list_samplers
from research.config import Check
from research.config import ConfigError
from research.config import OneOf
from research.config import Range
from research.config import ValidationContext
from research.config import at_least_one
from research.config import nonnegative
from research.config import positive
from research.stages import Bundle
from research.stages import StageConfig
from research.stages import StageContext
from research.stages import StageResult
from research.stages import TrainStage
from research.stages import finetune
from research.stages import register_stage
from research.stages import train_kwargs


@dataclasses.dataclass(frozen=True, kw_only=True)
class NASStage(StageConfig):
    """One-shot NAS on the current (family) model.

    Attributes:
      supernet_steps: sandwich-rule optimizer steps.
      n_random: random sub-networks per step besides the largest and smallest.
      learning_rate: peak Adam learning rate of the supernet.
      batch_size: supernet batch size.
      temperature: in-place distillation temperature.
      trials: sub-networks the search evaluates.
      batch: sub-networks evaluated together (vmapped) per search round.
      sampler: a registered ``research.automl`` sampler (``tpe``, ``gp``, ``random``, ``sobol``, ...).
      calib_batches: BatchNorm recalibration batches per sub-network (families with BatchNorm).
      max_flops: pick the most accurate front member within this many FLOPs (0: no limit).
      finetune: the fine-tuning schedule of the chosen member.
    """

    kind: ClassVar[str] = "nas"
    checks: ClassVar[Mapping[str, Check]] = {
        "supernet_steps": at_least_one,
        "n_random": nonnegative,
        "learning_rate": positive,
        "batch_size": at_least_one,
        "temperature": positive,
        "trials": Range(lo=2),
        "batch": at_least_one,
        "sampler": OneOf(list_samplers, "sampler"),
        "calib_batches": at_least_one,
        "max_flops": nonnegative,
    }
    supernet_steps: int = 1000
    n_random: int = 2
    learning_rate: float = 3e-3
    batch_size: int = 128
    temperature: float = 1.0
    trials: int = 48
    batch: int = 16
    sampler: str = "tpe"
    calib_batches: int = 4
    max_flops: float = 0.0
    finetune: TrainStage = dataclasses.field(default_factory=lambda: TrainStage(steps=300, learning_rate=1e-3))

    def check(self, key: str, context: ValidationContext) -> None:
        if self.batch > self.trials:
            raise ConfigError(f"{key}.batch={self.batch} is more than {key}.trials={self.trials}; lower batch")


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
    model, _ = finetune(member, ds, ctx, **train_kwargs(cfg.finetune))
    # The chosen member is an ordinary zoo model: its recipe starts anew from that member, so the
    # finished stage is stored and rebuilt like any other (research.store / research.recipe).
    recipe = (recipe_lib.zoo_step(fam.name, cands[chosen].options, ds.input_shape, ds.num_classes, bundle.seed),)
    return StageResult(
        bundle=dataclasses.replace(bundle, model=model, recipe=recipe),
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
        notes=[f"chosen {fam.name} member: " + ", ".join(f"{k}={v}" for k, v in cands[chosen].options.items())],
    )
