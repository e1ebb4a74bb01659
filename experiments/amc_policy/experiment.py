"""AMC-style search of per-group kept-channel ratios at a fixed FLOPs budget, against uniform.

Protocol (one :class:`Recipe`):

1. Search (seed ``search_seed`` only, validation split only): ``research.tune.tune`` over one
   removal ratio per coupled channel group of the model (``methods.pruning.ChannelRule`` s in
   ``stages.prune.channel_rules``, one parameter per group from :func:`research.tune.layer_policy`).
   Every sampled point is repaired to the FLOPs budget before it trains (:class:`FlopsPolicy`:
   AMC's scaling of every group's kept fraction by one factor, found by bisection, on an exact
   model of the conv/linear FLOPs as a function of the kept channel counts). A trial is the whole
   pipeline: dense training, channel removal, a short fine-tuning; its objective is validation
   accuracy. The uniform policy is the same repair applied to ratio 0 in every group (every group
   keeps the same fraction of its channels, the largest that meets the budget).
2. Final models, for every seed: the same pipeline with the searched ratios and with the uniform
   ratios, same dense model (one run directory per seed; the second arm reuses the dense stage),
   same fine-tuning steps, optimizer and batches; test accuracy reported, FLOPs measured by the run
   report (XLA cost analysis of the pruned model).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import numpy as np

from experiments.policy_search import pipeline
from experiments.policy_search import run_arms
from experiments.policy_search import search
from experiments.policy_search import train_stage
from experiments.policy_search import trial_rows
from methods.pruning import ChannelRule
from methods.pruning import PruneStage
from research import tune as tune_lib
from research.automl import Float
from research.config import Config

#: Coupled channel groups searched per model (their first producer's module path).
GROUP_PATTERN = r"(^|/)(conv1|conv2|convs/\d+|layers/\d+)/kernel$"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """The experiment's knobs; both arms use the same ones.

    Attributes:
      model, options, dataset: the zoo model, its options and the shipped data set.
      pretrain_steps, pretrain_lr: dense training (both arms and every search trial).
      search_finetune_steps: fine-tuning steps after channel removal in a search trial.
      finetune_steps, finetune_lr: fine-tuning of the final models (both arms).
      batch_size: examples per step everywhere.
      flops_budget: pruned FLOPs / dense FLOPs (0.5 = AMC's 50%).
      max_ratio: the largest removal ratio a group may take.
      trials, sampler: the search (``research.tune``).
      search_seed: the seed (data split, init, batches) of the search.
      limit: training examples kept (``None``: all).
    """

    model: str = "cnn1d"
    options: tuple[tuple[str, Any], ...] = ()
    dataset: str = "mnist1d"
    pretrain_steps: int = 3000
    pretrain_lr: float = 3e-3
    search_finetune_steps: int = 300
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    batch_size: int = 64
    flops_budget: float = 0.5
    max_ratio: float = 0.8
    trials: int = 30
    sampler: str = "gp"
    search_seed: int = 0
    limit: int | None = None


#: ResNet-20 on the 8x8 digits (``--resnet20``): the issue's model, on the one shipped image set it
#: trains on in CPU minutes.
RESNET20 = Recipe(model="resnet20", dataset="digits", pretrain_steps=600, search_finetune_steps=100, finetune_steps=100)

QUICK = Recipe(
    model="mlp",
    options=(("widths", (16, 16)),),
    dataset="digits",
    pretrain_steps=10,
    search_finetune_steps=4,
    finetune_steps=6,
    trials=2,
    sampler="random",
    limit=300,
)


def make_config(recipe: Recipe, seed: int, finetune_steps: int, rules: tuple = ()) -> Config:
    """The pipeline: dense training, then channel removal by ``rules`` and fine-tuning."""
    prune = PruneStage(
        sparsity=0.0,
        channel_rules=tuple(rules),
        channel_score="l1",
        train=train_stage(finetune_steps, recipe.finetune_lr, recipe.batch_size),
    )
    return pipeline("amc", recipe, seed, prune)


@dataclasses.dataclass(frozen=True)
class FlopsPolicy(tune_lib.LayerPolicy):
    """A :class:`research.tune.LayerPolicy` of channel removal ratios whose budget is FLOPs.

    ``budget_bytes`` holds the FLOPs budget, :meth:`cost` is the FLOPs model and :meth:`repair`
    scales every group's kept fraction by one factor until the budget is filled.

    Attributes:
      channels: channels of each searched group, in layer order.
      terms: ``(flops, input group index or -1, output group index or -1)`` per conv/linear
        layer: its dense FLOPs (XLA's count) and the groups its input and output channels belong
        to (-1: a dimension no searched group prunes).
      rest: FLOPs of everything else (normalisation, activations, pooling), held constant (an
        overestimate once channels are removed, so the measured FLOPs stay under the budget).
    """

    channels: tuple[int, ...] = ()
    terms: tuple[tuple[float, int, int], ...] = ()
    rest: float = 0.0

    def kept(self, values) -> np.ndarray:
        """Kept fraction per group, with the channel counts ``plan_channels`` keeps."""
        c = np.asarray(self.channels, float)
        r = np.asarray(values, float)
        return np.maximum(1.0, c - np.floor(r * c)) / c

    def cost(self, values) -> float:
        """Modelled FLOPs of the model with these removal ratios."""
        keep = np.append(self.kept(values), 1.0)  # index -1: not pruned
        return float(self.rest + sum(f * keep[i] * keep[o] for f, i, o in self.terms))

    def repair(self, values) -> list[float]:
        """Ratios whose FLOPs fill the budget: every kept fraction scaled by one factor.

        Unlike the bytes repair of :class:`~research.tune.LayerPolicy` (which only shrinks points
        over the budget), points under the budget are scaled up too, so every trial spends the same
        FLOPs (up to whole channels: the largest factor whose FLOPs do not exceed the budget).

        Raises:
          ConfigError: even the largest ratios of the domain exceed the budget.
        """
        from research.config import ConfigError

        lo, hi = self.domain.low, self.domain.high
        keep = 1.0 - np.asarray([float(v) for v in values])

        def ratios(alpha: float) -> np.ndarray:
            return 1.0 - np.clip(alpha * keep, 1.0 - hi, 1.0 - lo)

        if self.cost(ratios(0.0)) > self.budget_bytes:
            raise ConfigError(
                f"even ratio {hi} in every group gives {self.cost(ratios(0.0)):,.0f} FLOPs > budget "
                f"{self.budget_bytes:,.0f}; raise the budget or the domain's upper bound"
            )
        a, b = 0.0, 1.0 / max(float(np.min(keep)), 1e-6)
        if self.cost(ratios(b)) <= self.budget_bytes:
            return [float(v) for v in ratios(b)]
        for _ in range(60):
            mid = 0.5 * (a + b)
            a, b = (mid, b) if self.cost(ratios(mid)) <= self.budget_bytes else (a, mid)
        return [float(v) for v in ratios(a)]


def flops_policy(config: Config, budget: float, max_ratio: float) -> tuple[FlopsPolicy, float]:
    """``(policy, dense FLOPs)``: one ratio per coupled group of ``config``'s model at ``budget``.

    The groups, their channel counts and which groups feed and leave each conv/linear layer are
    read from the channel tracer (``methods.pruning.trace_groups``); per-layer and total FLOPs
    are XLA's cost analysis (``research.metrics.flops``), as in the run report.
    """
    import jax.numpy as jnp
    from flax import nnx

    from methods.pruning import trace_groups
    from research.metrics import flops
    from research.nn import build_model
    from research.run import load_data

    ds = load_data(config)
    model = build_model(
        config.model.name,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        rngs=nnx.Rngs(0),
        **dict(config.model.options),
    )
    model.eval()
    x = jnp.zeros((2, *ds.input_shape), jnp.float32)
    groups = trace_groups(model, x)
    base = tune_lib.layer_policy(
        config,
        key="stages.prune.channel_rules",
        rule=ChannelRule,
        field="ratio",
        domain=Float(0.0, max_ratio),
        module_paths=True,
        include=GROUP_PATTERN,
    )
    names = [g.name for g in groups]
    missing = sorted(set(names) - set(base.layers))
    if missing:
        raise ValueError(f"coupled groups {missing} are not matched by GROUP_PATTERN={GROUP_PATTERN!r}")
    keep_layers = [layer for layer in base.layers if layer in names]
    order = {name: i for i, name in enumerate(keep_layers)}
    member_group = {}  # (kernel leaf path, axis) -> searched group index
    for g in groups:
        for m in g.members:
            member_group[(m.path, m.axis)] = order[g.name]

    # Each Conv/Linear layer's input shape, recorded in one forward pass; its dense FLOPs are XLA's
    # count for that layer alone (XLA skips the taps that fall on padding, so no formula is used).
    shapes: dict[int, tuple[int, ...]] = {}
    originals = {}
    for cls in (nnx.Conv, nnx.Linear):
        originals[cls] = cls.__call__

        def call(self, inputs, _orig=originals[cls]):
            shapes[id(self)] = (1, *inputs.shape[1:])
            return _orig(self, inputs)

        cls.__call__ = call
    try:
        model(x)
    finally:
        for cls, fn in originals.items():
            cls.__call__ = fn
    terms = []
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, (nnx.Conv, nnx.Linear)) or id(module) not in shapes:
            continue
        kpath = "/".join(str(p) for p in path) + "/kernel"
        nd = module.kernel.value.ndim
        f = float(flops(module, jnp.zeros(shapes[id(module)], jnp.float32)))
        terms.append((f, member_group.get((kpath, nd - 2), -1), member_group.get((kpath, nd - 1), -1)))
    dense = float(flops(model, x[:1]))
    rest = dense - sum(t[0] for t in terms)
    idx = [base.layers.index(layer) for layer in keep_layers]
    policy = FlopsPolicy(
        key=base.key,
        rule=ChannelRule,
        field="ratio",
        layers=tuple(keep_layers),
        sizes=tuple(base.sizes[i] for i in idx),
        domain=base.domain,
        budget_bytes=budget * dense,
        channels=tuple(next(g.size for g in groups if g.name == layer) for layer in keep_layers),
        terms=tuple(terms),
        rest=max(0.0, rest),
    )
    return policy, dense


def run_experiment(recipe: Recipe, seeds: tuple[int, ...], workdir: str) -> dict:
    """Search once, then train both arms for every seed; returns the results dict."""
    t_start = time.time()
    search_cfg = make_config(recipe, recipe.search_seed, recipe.search_finetune_steps)
    policy, dense_flops = flops_policy(search_cfg, recipe.flops_budget, recipe.max_ratio)
    uniform = policy.repair([0.0] * len(policy.layers))
    print(
        f"{len(policy.layers)} groups; dense {dense_flops:,.0f} FLOPs; budget {policy.budget_bytes:,.0f}; "
        f"uniform kept fraction {1 - uniform[0]:.3f} (modelled FLOPs {policy.cost(uniform) / dense_flops:.3f})",
        flush=True,
    )

    result, best, search_seconds = search(
        search_cfg, policy, workdir, trials=recipe.trials, sampler=recipe.sampler, seed=recipe.search_seed
    )
    searched = [float(best["repaired"][n]) for n in policy.names]
    trials = trial_rows(result, lambda t: {"flops": (t.get("metrics") or {}).get("flops")})

    def config(seed, ratios):
        rules = tuple(
            ChannelRule(pattern="^" + re.escape(layer) + "$", ratio=float(r))
            for layer, r in zip(policy.layers, ratios, strict=True)
        )
        return make_config(recipe, seed, recipe.finetune_steps, rules)

    def extra(ratios, m, d):
        return {
            "flops": m["flops"],
            "flops_ratio": m["flops"] / d["flops"],
            "params": m.get("params"),
            "dense_flops": d["flops"],
        }

    rows = run_arms(seeds, workdir, {"uniform": uniform, "searched": searched}, config, extra)
    return {
        "recipe": dataclasses.asdict(recipe),
        "seeds": list(seeds),
        "groups": list(policy.layers),
        "channels": list(policy.channels),
        "dense_flops_model": dense_flops,
        "flops_budget": recipe.flops_budget,
        "uniform_ratios": [float(r) for r in uniform],
        "searched_ratios": searched,
        "uniform_kept": [float(k) for k in policy.kept(uniform)],
        "searched_kept": [float(k) for k in policy.kept(searched)],
        "modelled_flops_ratio": {
            "uniform": policy.cost(uniform) / dense_flops,
            "searched": policy.cost(searched) / dense_flops,
        },
        "best_trial": best["number"],
        "best_val_accuracy": best["values"][0],
        "trials": trials,
        "rows": rows,
        "search_seconds": search_seconds,
        "total_seconds": time.time() - t_start,
    }
