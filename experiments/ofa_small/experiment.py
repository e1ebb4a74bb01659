"""Once-for-all on MNIST-1D: one supernet, search, fine-tuned Pareto members vs scratch vs the zoo.

``run_experiment(cfg)`` per seed: trains the zoo's hand-designed ``cnn1d`` and ``mlp`` from scratch;
trains the ``conv1d_family`` supernet once (progressive shrinking, then the sandwich rule with
in-place distillation); times K sub-networks evaluated as one vmapped program against the same K
one by one; searches the family (TPE over accuracy inside the supernet, FLOPs, bytes and measured
latency) on the validation split and, per zoo model, searches it again under that model's FLOPs;
trains up to ``front_size`` Pareto members, the ``constrained_top`` best constrained candidates per
zoo model and enough other candidates for ``tau_members`` from scratch with the zoo models' budget,
fine-tunes the front and constrained members from the supernet's weights, and reports test
accuracy, FLOPs, TFLite latency, the validation-chosen found model per zoo model
(:func:`dominance`) and Kendall's tau between the supernet's ranking (validation) and the
from-scratch ranking (test) of every trained member.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats as scipy_stats

from methods import nas
from research import data
from research import metrics
from research import nn
from research.train import train_scan


@dataclasses.dataclass(frozen=True)
class OFAConfig:
    """Sizes of one run (defaults: the full run; :func:`quick_config` for a smoke test).

    Attributes:
      progressive: train the supernet with progressive shrinking (largest alone for the first
        ``first_phase`` of the steps, then kernel, depth and width choices freed in turn) instead of the
        plain sandwich rule over the whole family from the first step.
      constrained_trials: per zoo model, sub-networks the FLOPs-constrained search evaluates
        (FLOPs at most the zoo model's); 0 turns the constrained searches off.
      constrained_top: per zoo model, the most accurate (inside the supernet) constrained
        candidates trained from scratch; the one with the best from-scratch *validation* accuracy
        is the found model compared with the zoo model.
      tau_members: at least this many found members are trained from scratch for Kendall's tau
        (candidates of the main search spread over its supernet accuracies fill the count).
      search_latency: the main search's latency objective: ``"jax"`` (the jitted member at
        ``latency_batch`` inputs), ``"tflite"`` (the exported file; ~10 s per candidate) or ``""``
        (no latency objective).
      tflite_latency: time the exported TFLite file of every front member, validation-chosen
        member (:func:`dominance`) and zoo model (for the accuracy-vs-latency plot).
      scratch_repeats: from-scratch trainings (initialisation and batch-order seeds ``seed``,
        ``seed + 1000``, ...) of each zoo model and of each found member with no more FLOPs than
        the largest zoo model (the members :func:`dominance` can choose); their mean validation
        accuracy chooses the found model and their mean test accuracies are compared. The first
        training is the single run of ``scratch_repeats=1``.
    """

    seeds: tuple[int, ...] = (0,)
    supernet_steps: int = 1500
    n_random: int = 2
    progressive: bool = True
    first_phase: float = 0.1
    supernet_batch_size: int = 128
    trials: int = 48
    batch: int = 16
    front_size: int = 4
    constrained_trials: int = 24
    constrained_top: int = 4
    tau_members: int = 10
    finetune_steps: int = 300
    scratch_steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 3e-3
    sampler: str = "tpe"
    search_latency: str = "jax"
    latency_batch: int = 256
    tflite_latency: bool = True
    scratch_repeats: int = 1

    def __post_init__(self):
        if self.scratch_repeats < 1:
            raise ValueError(f"scratch_repeats={self.scratch_repeats} must be at least 1 (1 = one training per model)")


def quick_config() -> OFAConfig:
    """A run of seconds-to-a-minute for tests."""
    return OFAConfig(
        supernet_steps=12, trials=4, batch=2, front_size=2, constrained_trials=3, constrained_top=2, tau_members=3,
        finetune_steps=5, scratch_steps=10, batch_size=32, supernet_batch_size=32, latency_batch=8, tflite_latency=False,
    )  # fmt: skip


ZOO = ("cnn1d", "mlp")


def _acc(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def _time_eval(net, masks_list, ds, repeats: int = 3) -> tuple[float, float]:
    vm = nas.make_evaluator(net, calibrate=False)
    one = nas.make_evaluator(net, calibrate=False)
    stacked = nas.stack_masks(net, masks_list)
    singles = [nas.stack_masks(net, [o]) for o in masks_list]
    nas.evaluate_subnets(net, stacked, ds.x_val, ds.y_val, evaluator=vm)  # compile
    nas.evaluate_subnets(net, singles[0], ds.x_val, ds.y_val, evaluator=one)
    t_vm, t_one = [], []
    for _ in range(repeats):  # interleaved, median
        t = time.perf_counter()
        nas.evaluate_subnets(net, stacked, ds.x_val, ds.y_val, evaluator=vm)
        t_vm.append(time.perf_counter() - t)
        t = time.perf_counter()
        for m in singles:
            nas.evaluate_subnets(net, m, ds.x_val, ds.y_val, evaluator=one)
        t_one.append(time.perf_counter() - t)
    return float(np.median(t_vm)), float(np.median(t_one))


def _tflite_ms(model: nnx.Module, sample: np.ndarray, log=print) -> float | None:
    """Median ms per call of the model's exported fp32 TFLite file (batch 1, one thread); ``None``
    (and a logged line naming the error) when the export fails, so one failure does not lose a run."""
    from research.export.latency import artifact_latency  # noqa: PLC0415 (TensorFlow only when asked)

    try:
        return artifact_latency(model, "tflite", sample=sample, batch=1, threads=1, repeats=200, warmup=20)
    except Exception as e:  # noqa: BLE001 (reported, and the row keeps tflite_ms=None)
        log(f"  TFLite latency not measured: {type(e).__name__}: {e}")
        return None


def _spread(cands: list, n: int, exclude: set, key) -> list:
    """Up to ``n`` candidates whose ``key(options)`` is not in ``exclude``, spread evenly over the
    ranks of supernet accuracy."""
    pool = sorted((c for c in cands if key(c.options) not in exclude), key=lambda c: c.accuracy)
    if len(pool) <= n:
        return pool
    return [pool[i] for i in np.linspace(0, len(pool) - 1, n).round().astype(int)]


def _scratch(name: str, options: dict, ds, cfg: OFAConfig, seed: int, repeats: int) -> tuple[nnx.Module, dict]:
    """Trains model ``name(**options)`` from scratch ``repeats`` times (seeds ``seed + 1000 * r``);
    returns the first trained model and the row fields: mean and per-run validation and test accuracy."""
    val, test, first = [], [], None
    for r in range(repeats):
        s = seed + 1000 * r
        model = nn.build_model(
            name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(s), **options
        )
        model = train_scan(
            model, ds.x_train, ds.y_train, steps=cfg.scratch_steps, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, seed=s,
        )  # fmt: skip
        val.append(_acc(model, ds.x_val, ds.y_val))
        test.append(_acc(model, ds.x_test, ds.y_test))
        first = model if first is None else first
    return first, {
        "scratch_val": float(np.mean(val)), "scratch_test": float(np.mean(test)),
        "scratch_val_runs": val, "scratch_test_runs": test,
    }  # fmt: skip


def run_seed(cfg: OFAConfig, seed: int, log=print) -> dict[str, Any]:
    """One seed of the experiment; returns its rows and figures."""
    ds = data.load_dataset("mnist1d", seed=seed)
    shape, classes = ds.input_shape, ds.num_classes
    fam = nn.get_family("conv1d_family")
    sample = jnp.zeros((1, *shape), jnp.float32)
    train = dict(batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=seed)

    # the zoo's hand-designed models, from scratch, with the budget every found model also gets
    zoo_rows = []
    for name in ZOO:
        model, runs = _scratch(name, {}, ds, cfg, seed, cfg.scratch_repeats)
        zoo_rows.append(
            {
                "model": f"zoo {name}", "role": "zoo", "flops": metrics.flops(model, sample),
                "params": metrics.count_params(model), "supernet_val": None, "finetuned_test": None, **runs,
                "tflite_ms": _tflite_ms(model, ds.x_val[:1], log) if cfg.tflite_latency else None,
            }
        )  # fmt: skip
        log(f"  {zoo_rows[-1]}")
    contest_flops = max(z["flops"] for z in zoo_rows)

    t0 = time.perf_counter()
    net = nas.split_supernet(nas.build_supernet(fam, shape, classes, seed=seed), fam, shape, classes)
    phases = nas.progressive_phases(fam, cfg.supernet_steps, first=cfg.first_phase) if cfg.progressive else None
    net, ce = nas.train_supernet(
        net, ds.x_train, ds.y_train, steps=cfg.supernet_steps, n_random=cfg.n_random, phases=phases,
        **{**train, "batch_size": cfg.supernet_batch_size},
    )  # fmt: skip
    t_supernet = time.perf_counter() - t0
    log(
        f"seed {seed}: supernet trained in {t_supernet:.0f} s ({'progressive shrinking' if phases else 'sandwich'}); "
        f"final CE largest {ce[-1, 0]:.3f} smallest {ce[-1, 1]:.3f}"
    )
    rng = np.random.default_rng(seed)
    timing_opts = [fam.sample(rng) for _ in range(max(cfg.batch, 2))]
    t_vm, t_one = _time_eval(net, timing_opts, ds)

    t0 = time.perf_counter()
    cost = nas.CostModel(net, latency_runtime=cfg.search_latency or None, latency_batch=cfg.latency_batch)
    search = dict(trials=cfg.trials, batch=cfg.batch, sampler=cfg.sampler, seed=seed, cost=cost)
    cands = nas.search(net, ds.x_val, ds.y_val, **search)
    objectives = ("accuracy", "flops", "latency") if cfg.search_latency else ("accuracy", "flops")
    front = [cands[i] for i in nas.pareto_front(cands, objectives)]
    front = sorted(front, key=lambda c: c.flops)
    if len(front) > cfg.front_size:  # spread over the front by FLOPs
        front = [front[i] for i in np.linspace(0, len(front) - 1, cfg.front_size).round().astype(int)]
    roles: dict[tuple, list[str]] = {fam.key(c.options): ["front"] for c in front}
    chosen: dict[tuple, Any] = {fam.key(c.options): c for c in front}
    constrained: dict[str, list] = {}
    for z in zoo_rows if cfg.constrained_trials else ():
        within = nas.search(
            net, ds.x_val, ds.y_val, **{**search, "trials": cfg.constrained_trials, "batch": min(cfg.batch, cfg.constrained_trials)},
            max_flops=z["flops"],
        )  # fmt: skip
        top = sorted(within, key=lambda c: -c.accuracy)[: cfg.constrained_top]
        constrained[z["model"]] = [fam.key(c.options) for c in top]
        for c in top:
            chosen.setdefault(fam.key(c.options), c)
            roles.setdefault(fam.key(c.options), []).append(f"<= {z['model'][4:]}")
    t_search = time.perf_counter() - t0
    if len(chosen) < cfg.tau_members:  # fill the tau set with members spread over the supernet's ranking
        for c in _spread(cands, cfg.tau_members - len(chosen), set(chosen), fam.key):
            chosen[fam.key(c.options)] = c
            roles[fam.key(c.options)] = ["tau"]

    rows, models = [], {}
    for key, c in sorted(chosen.items(), key=lambda kv: kv[1].flops):
        repeats = cfg.scratch_repeats if c.flops <= contest_flops else 1
        scratch, runs = _scratch(fam.name, c.options, ds, cfg, seed, repeats)
        tuned = None
        if roles[key] != ["tau"]:
            tuned = train_scan(
                nas.extract(net, c.options), ds.x_train, ds.y_train, steps=cfg.finetune_steps,
                **{**train, "learning_rate": cfg.learning_rate / 3},
            )  # fmt: skip
        rows.append(
            {
                "model": "found " + _short(c.options), "role": ", ".join(roles[key]), "options": c.options,
                "flops": c.flops, "params": c.params, "supernet_val": c.accuracy, "search_latency_ms": c.latency,
                "finetuned_test": None if tuned is None else _acc(tuned, ds.x_test, ds.y_test),
                **runs, "tflite_ms": None,
            }
        )  # fmt: skip
        models[rows[-1]["model"]] = scratch
        log(f"  {rows[-1]}")
    rows += zoo_rows
    if cfg.tflite_latency:  # the exported file of every front member and every validation-chosen member
        picks = {d["pick"] for d in dominance([{"seed": seed, "rows": rows}])}
        for r in rows:
            if r["model"] in models and ("front" in r["role"] or r["model"] in picks):
                r["tflite_ms"] = _tflite_ms(models[r["model"]], ds.x_val[:1], log)
    found = [r for r in rows if r["model"].startswith("found")]
    tau = (
        float(scipy_stats.kendalltau([r["supernet_val"] for r in found], [r["scratch_test"] for r in found])[0])
        if len(found) > 1
        else float("nan")
    )
    return {
        "seed": seed,
        "rows": rows,
        "kendall_tau": tau,
        "tau_members": len(found),
        "progressive": bool(phases),
        "final_ce_largest": float(ce[-1, 0]),
        "final_ce_smallest": float(ce[-1, 1]),
        "supernet_seconds": t_supernet,
        "search_seconds": t_search,
        "candidates": len(cands),
        "search_latency": cfg.search_latency,
        "eval_k": len(timing_opts),
        "eval_vmapped_s": t_vm,
        "eval_one_by_one_s": t_one,
        "supernet_subnet_steps": cfg.supernet_steps * (2 + cfg.n_random),
        "scratch_steps_per_arch": cfg.scratch_steps,
        "scratch_trained": len(found),
        "scratch_repeats": cfg.scratch_repeats,
        "scratch_trainings": sum(len(r["scratch_test_runs"]) for r in found),
    }


def _short(o: dict[str, Any]) -> str:
    body = "w{}-{}-{} d{}{}{} k{}{}{}".format(*(o[f"{k}_{s}"] for k in ("width", "depth", "kernel") for s in range(3)))
    return body + (" max" if o.get("head") == "max" else "")


def format_table(result: dict[str, Any]) -> str:
    """The result of one seed as a text table."""
    head = (
        f"{'model':<30} {'role':<22} {'FLOPs':>9} {'params':>7} {'supernet val':>12} {'fine-tuned':>10} "
        f"{'scratch val':>11} {'scratch test':>12} {'runs':>4} {'TFLite ms':>9}"
    )
    lines = [head, "-" * len(head)]
    f = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in result["rows"]:
        lines.append(
            f"{r['model']:<30} {r['role']:<22} {r['flops']:>9,.0f} {r['params']:>7,} {f(r['supernet_val']):>12} "
            f"{f(r['finetuned_test']):>10} {f(r.get('scratch_val')):>11} {f(r['scratch_test']):>12} "
            f"{len(r.get('scratch_test_runs') or [0]):>4} {f(r.get('tflite_ms'), 4):>9}"
        )
    lines.append(
        f"Kendall tau (supernet val vs scratch test, {result.get('tau_members', '?')} found members): "
        f"{result['kendall_tau']:.3f}; evaluation of K={result['eval_k']} sub-networks: vmapped "
        f"{result['eval_vmapped_s'] * 1e3:.1f} ms, one by one {result['eval_one_by_one_s'] * 1e3:.1f} ms "
        f"({result['eval_one_by_one_s'] / result['eval_vmapped_s']:.2f}x); supernet {result['supernet_seconds']:.0f} s, "
        f"searches {result['search_seconds']:.0f} s ({result['candidates']} candidates in the main search)"
    )
    return "\n".join(lines)


def plot_results(results: list[dict[str, Any]], path: str) -> str:
    """Test accuracy against FLOPs (and, when measured, against TFLite latency) for every seed: the
    found members fine-tuned from the supernet and trained from scratch, and the zoo's
    hand-designed models; writes a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    axes_keys = [("flops", "FLOPs per input (log)")]
    if any(r.get("tflite_ms") is not None for res in results for r in res["rows"]):
        axes_keys.append(("tflite_ms", "TFLite latency, batch 1, 1 thread (ms, log)"))
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(7 * len(axes_keys), 4.5), squeeze=False)
    styles = (
        ("found, fine-tuned from the supernet", "finetuned_test", "found", "o", "tab:blue"),
        ("found, trained from scratch", "scratch_test", "found", "s", "tab:green"),
        ("zoo (hand-designed), from scratch", "scratch_test", "zoo", "*", "tab:red"),
    )
    for ax, (xkey, xlabel) in zip(axes[0], axes_keys, strict=True):
        for label, key, kind, marker, color in styles:
            pts = [
                (r[xkey], 100 * r[key])
                for res in results
                for r in res["rows"]
                if r["model"].startswith(kind) and r[key] is not None and r.get(xkey) is not None
            ]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=60, color=color, label=label)
        for res in results:
            for r in res["rows"]:
                if r["model"].startswith("zoo") and r.get(xkey) is not None:
                    ax.annotate(f"{r['model'][4:]} s{res['seed']}", (r[xkey], 100 * r["scratch_test"]), fontsize=7)
        ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST-1D: searched sub-networks vs the zoo ({len(results)} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dominance(results: list[dict[str, Any]], key: str = "scratch_test", run: int | None = None) -> list[dict[str, Any]]:
    """Per seed and zoo model: the found model compared with it, and whether it dominates.

    The found model is chosen without test data: among the found members with no more FLOPs than
    the zoo model, the one with the best from-scratch validation accuracy (the mean over its
    ``scratch_repeats`` trainings). It dominates when its ``key`` accuracy (test) is above the zoo
    model's test accuracy (means again). ``run=r`` (with ``key="scratch_test"``) instead uses only
    the ``r``-th training of every model, validation and test: ``run=0`` is the single-training
    protocol. ``any_better`` lists every member more accurate at no more FLOPs (a selection on test
    data, for information only); ``paired_wins`` is ``(k, R)`` when the pick and the zoo model were
    both trained ``R > 1`` times: the pick was more accurate on test in ``k`` of the ``R`` trainings
    paired by seed (means only, else ``None``).

    Raises:
      ValueError: ``run`` is given with another ``key``, or a model has fewer than ``run + 1`` trainings.
    """
    if run is not None and key != "scratch_test":
        raise ValueError(f"run={run} selects one from-scratch training; it needs key='scratch_test', not {key!r}")

    def val(r):
        return (r.get("scratch_val") or 0.0) if run is None else _nth(r, "scratch_val_runs", run)

    def acc(r, key=key):
        return r[key] if run is None else _nth(r, "scratch_test_runs", run)

    out = []
    for res in results:
        found = [r for r in res["rows"] if r["model"].startswith("found") and r[key] is not None]
        for z in (r for r in res["rows"] if r["model"].startswith("zoo")):
            within = [f for f in found if f["flops"] <= z["flops"]]
            pick = max(within, key=lambda f: (val(f), -f["flops"]), default=None)
            zoo_test = acc(z, "scratch_test")
            out.append(
                {
                    "seed": res["seed"],
                    "zoo": z["model"],
                    "zoo_flops": z["flops"],
                    "zoo_test": zoo_test,
                    "pick": None if pick is None else pick["model"],
                    "pick_flops": None if pick is None else pick["flops"],
                    "pick_test": None if pick is None else acc(pick),
                    "dominates": pick is not None and acc(pick) > zoo_test,
                    "any_better": [f["model"] for f in within if acc(f) > zoo_test],
                    "runs": "mean" if run is None else run,
                    "pick_trainings": None if pick is None else len(pick.get("scratch_test_runs") or [0]),
                    "paired_wins": None if pick is None or run is not None or key != "scratch_test" else _wins(pick, z),
                }
            )
    return out


def _wins(pick: dict[str, Any], zoo: dict[str, Any]) -> tuple[int, int] | None:
    """``(k, R)``: in ``k`` of the ``R`` trainings (paired by seed) the pick beat the zoo model on
    test; ``None`` when either was trained once or their numbers of trainings differ."""
    a, b = pick.get("scratch_test_runs") or [], zoo.get("scratch_test_runs") or []
    if len(a) < 2 or len(a) != len(b):
        return None
    return sum(x > y for x, y in zip(a, b, strict=True)), len(a)


def _nth(row: dict[str, Any], field: str, run: int) -> float:
    runs = row.get(field) or [row[field.removesuffix("_runs")]]  # results of older runs: one training
    if run >= len(runs):
        raise ValueError(f"{row['model']} has {len(runs)} from-scratch training(s); run={run} is not one of them")
    return runs[run]


def format_dominance(d: dict[str, Any]) -> str:
    """One line of :func:`dominance`'s result."""
    if d["pick"] is None:
        return f"seed {d['seed']}: {d['zoo']}: no found member within its {d['zoo_flops']:,.0f} FLOPs"
    verdict = "dominates" if d["dominates"] else "does NOT dominate"
    n = d.get("pick_trainings") or 1
    runs = d.get("runs", "mean")
    how = f"training {runs} only" if runs != "mean" else f"mean of {n} trainings" if n > 1 else "one training"
    wins = d.get("paired_wins")
    paired = f" (more accurate in {wins[0]} of the {wins[1]} trainings paired by seed)" if wins else ""
    return (
        f"seed {d['seed']}: {d['zoo']} ({d['zoo_flops']:,.0f} FLOPs, test {d['zoo_test']:.3f}): {d['pick']} "
        f"({d['pick_flops']:,.0f} FLOPs = {d['pick_flops'] / d['zoo_flops']:.2f}x, test {d['pick_test']:.3f}; "
        f"chosen by validation, {how}) {verdict}{paired}; members more accurate at <= FLOPs: "
        f"{', '.join(d['any_better']) or 'none'}"
    )


def run_experiment(cfg: OFAConfig, log=print) -> list[dict[str, Any]]:
    """Runs every seed of ``cfg`` and logs each seed's table."""
    out = []
    for seed in cfg.seeds:
        res = run_seed(cfg, seed, log)
        log(format_table(res))
        out.append(res)
    return out
