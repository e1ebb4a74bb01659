"""HAQ-style search of per-layer bit widths at the bytes of uniform 4-bit, against uniform 4-bit.

Protocol (one :class:`Recipe`):

1. Search (seed ``search_seed`` only, validation split only): ``research.tune.tune`` over one bit
   width in ``bit_choices`` per Linear/Conv layer (``QuantRule`` s in ``stages.qat.rules``, one
   parameter per layer from :func:`research.tune.layer_policy` with ``module_paths=True``). The
   policy's ``budget_bytes`` is the kernels' size at uniform ``budget_bits``: a point over it is
   repaired before it trains (:class:`BitsPolicy`: layers lowered one width at a time, each time
   the one with the smallest saving that covers the excess). A trial is the whole pipeline: dense training, then QAT (calibration and
   quantization-aware fine-tuning, the kernel bits of each layer from the policy; input
   activations at ``act_bits``, int8 by default: the budget is the weights', as in HAQ's
   model-size-constrained setting); its objective is validation accuracy.
2. Final models, for every seed: the same pipeline with the searched bits and with uniform
   ``budget_bits`` bits, same dense model (one run directory per seed; the second arm reuses the
   dense stage), same QAT steps, optimizer and batches; test accuracy reported.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from typing import Any

from experiments.policy_search import pipeline
from experiments.policy_search import run_arms
from experiments.policy_search import search
from experiments.policy_search import train_stage
from experiments.policy_search import trial_rows
from methods.quantization import QATStage
from methods.quantization import QuantRule
from research import tune as tune_lib
from research.automl import Categorical
from research.config import Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """The experiment's knobs; both arms use the same ones.

    Attributes:
      model, options, dataset: the zoo model, its options and the shipped data set.
      pretrain_steps, pretrain_lr: dense (float) training.
      qat_steps, qat_lr: quantization-aware fine-tuning (search trials and both final arms).
      method: the quantizer of kernels and input activations (``ste``, ``lsq``, ``pact``).
      act_bits: the input-activation bits of every layer in both arms (``None``: the layer's
        kernel bits, i.e. activations searched jointly with the weights).
      batch_size: examples per step everywhere.
      bit_choices: the per-layer bit widths searched.
      budget_bits: the uniform bit width whose kernel bytes are the budget (and the baseline).
      trials, sampler: the search (``research.tune``).
      search_seed: the seed (data split, init, batches) of the search.
      limit: training examples kept (``None``: all).
    """

    model: str = "cnn1d"
    options: tuple[tuple[str, Any], ...] = ()
    dataset: str = "mnist1d"
    pretrain_steps: int = 3000
    pretrain_lr: float = 3e-3
    qat_steps: int = 300
    qat_lr: float = 1e-3
    method: str = "lsq"
    act_bits: int | None = 8
    batch_size: int = 128
    bit_choices: tuple[int, ...] = (2, 4, 8)
    budget_bits: int = 4
    trials: int = 30
    sampler: str = "tpe"
    search_seed: int = 0
    limit: int | None = None


#: HAQ's joint setting: each layer's input activations take its kernel bits (``--joint-acts``).
JOINT = Recipe(act_bits=None)

QUICK = Recipe(
    model="mlp",
    options=(("widths", (16, 16)),),
    dataset="digits",
    pretrain_steps=10,
    qat_steps=4,
    trials=2,
    sampler="random",
    limit=300,
)


def make_config(recipe: Recipe, seed: int, rules: tuple = ()) -> Config:
    """The pipeline: dense training, then QAT with ``rules`` (default: uniform ``budget_bits``)."""
    qat = QATStage(
        bits=recipe.budget_bits,
        method=recipe.method,
        rules=tuple(rules),
        train=train_stage(recipe.qat_steps, recipe.qat_lr, recipe.batch_size),
    )
    return pipeline("haq", recipe, seed, qat)


@dataclasses.dataclass(frozen=True)
class BitsPolicy(tune_lib.LayerPolicy):
    """A bit-width :class:`~research.tune.LayerPolicy` whose repair keeps what the point asked for.

    The library's repair lowers the layer whose next lower width saves the most bytes: a point
    that raises one small layer to 8 bits loses a large layer to 2 bits, and most points collapse
    onto a few repaired ones. Here each step lowers one of the layers at the *lowest* width that
    can still go lower (the point asked least of them), choosing among them the smallest saving
    that covers the remaining excess (if none covers it, the largest saving, and repeat): the
    layers the point raised stay raised while the budget allows.
    """

    def repair(self, values) -> list[int]:
        """Bit widths meeting ``budget_bytes`` (unchanged if they do).

        Raises:
          ConfigError: even the lowest widths exceed the budget.
        """
        from research.config import ConfigError

        choices = sorted(self.domain.choices)
        out = [int(v) for v in values]
        while self.cost(out) > self.budget_bytes:
            excess = self.cost(out) - self.budget_bytes
            lowerable = [b for b in out if b > choices[0]]
            if not lowerable:
                raise ConfigError(f"no bit widths in {choices} fit {self.budget_bytes:g} bytes; raise the budget")
            steps = [
                (self.sizes[i] * (b - max(c for c in choices if c < b)) / 8, i)
                for i, b in enumerate(out)
                if b == min(lowerable)
            ]
            covering = [st for st in steps if st[0] >= excess]
            _, i = min(covering) if covering else max(steps)
            out[i] = max(c for c in choices if c < out[i])
        return out


def bits_policy(config: Config, recipe: Recipe) -> BitsPolicy:
    """One bit width per Linear/Conv layer, budget = the kernels at uniform ``budget_bits``."""
    probe = tune_lib.layer_policy(
        config,
        key="stages.qat.rules",
        rule=QuantRule,
        field="bits",
        domain=Categorical(list(recipe.bit_choices)),
        module_paths=True,
    )
    fields = {f.name: getattr(probe, f.name) for f in dataclasses.fields(probe)}
    fields["budget_bytes"] = probe.cost([recipe.budget_bits] * len(probe.layers))
    return BitsPolicy(**fields)


def _rules(policy: BitsPolicy, bits) -> tuple:
    """One rule per layer, built as ``research.tune`` builds a trial's (``policy.rule``)."""
    return tuple(
        policy.rule(pattern="^" + re.escape(layer) + "$", bits=int(b))
        for layer, b in zip(policy.layers, bits, strict=True)
    )


def run_experiment(recipe: Recipe, seeds: tuple[int, ...], workdir: str) -> dict:
    """Search once, then train both arms for every seed; returns the results dict."""
    t_start = time.time()
    search_cfg = make_config(recipe, recipe.search_seed)
    policy = bits_policy(search_cfg, recipe)
    # tune builds each layer's rule as ``rule(pattern=..., bits=...)``: fix the quantizer here.
    policy = dataclasses.replace(
        policy, rule=functools.partial(QuantRule, method=recipe.method, act_bits=recipe.act_bits)
    )
    uniform = [recipe.budget_bits] * len(policy.layers)
    print(
        f"{len(policy.layers)} layers {list(policy.layers)}; kernel weights {list(policy.sizes)}; "
        f"budget {policy.budget_bytes:,.0f} bytes (uniform {recipe.budget_bits}-bit)",
        flush=True,
    )
    result, best, search_seconds = search(
        search_cfg, policy, workdir, trials=recipe.trials, sampler=recipe.sampler, seed=recipe.search_seed
    )
    searched = [int(best["repaired"][n]) for n in policy.names]

    def repaired(t):
        bits = [(t.get("repaired") or {}).get(n, 0) for n in policy.names]
        return {"bits": [int(b) for b in bits], "modelled_bytes": policy.cost(bits)}

    def extra(bits, m, d):
        return {
            "modelled_bytes": policy.cost(bits),
            "bytes": tune_lib.metric_value(m, "bytes"),
            "dense_bytes": d.get("bytes_fp32"),
        }

    trials = trial_rows(result, repaired)
    rows = run_arms(
        seeds,
        workdir,
        {"uniform": uniform, "searched": searched},
        lambda seed, bits: make_config(recipe, seed, _rules(policy, bits)),
        extra,
    )
    return {
        "recipe": dataclasses.asdict(recipe),
        "seeds": list(seeds),
        "layers": list(policy.layers),
        "kernel_weights": list(policy.sizes),
        "budget_bytes": policy.budget_bytes,
        "uniform_bits": uniform,
        "searched_bits": searched,
        "best_trial": best["number"],
        "best_val_accuracy": best["values"][0],
        "trials": trials,
        "rows": rows,
        "search_seconds": search_seconds,
        "total_seconds": time.time() - t_start,
    }


def maximal_points(policy: BitsPolicy) -> list[list[int]]:
    """Every point of the domain within the budget that no single layer can be raised from.

    These are the candidates a search at this budget chooses among (a point below one of them
    wastes budget); few for a small model, so they can be checked one by one.
    """
    import itertools

    choices = sorted(policy.domain.choices)
    out = []
    for point in itertools.product(choices, repeat=len(policy.layers)):
        if policy.cost(point) > policy.budget_bytes:
            continue
        raisable = any(
            policy.cost([*point[:i], c, *point[i + 1 :]]) <= policy.budget_bytes
            for i, b in enumerate(point)
            for c in choices
            if c > b
        )
        if not raisable:
            out.append(list(point))
    return out


def exhaustive(recipe: Recipe, workdir: str) -> list[dict]:
    """Validation accuracy of every :func:`maximal_points` policy on the search seed (a check of
    the search, not part of it: the same pipeline as a search trial, one run directory)."""
    from research.run import run

    cfg = make_config(recipe, recipe.search_seed)
    policy = bits_policy(cfg, recipe)
    policy = dataclasses.replace(
        policy, rule=functools.partial(QuantRule, method=recipe.method, act_bits=recipe.act_bits)
    )
    rows = []
    for bits in maximal_points(policy):
        report = run(make_config(recipe, recipe.search_seed, _rules(policy, bits)), os.path.join(workdir, "exhaustive"),
                     progress=False, echo=False)  # fmt: skip
        m = report["stages"][-1]["metrics"]
        rows.append({"bits": bits, "kernel_bytes": policy.cost(bits), "val_accuracy": m["val_accuracy"]})
        print(f"exhaustive {bits} {policy.cost(bits):,.0f} bytes: val {m['val_accuracy']:.4f}", flush=True)
    return rows
