"""Once-for-all on MNIST-1D: one supernet, search, fine-tuned Pareto members vs scratch vs the zoo.

``run_experiment(cfg)`` per seed: trains the ``conv1d_family`` supernet once with the sandwich rule,
times K sub-networks evaluated as one vmapped program against the same K one by one, searches the
family (TPE over accuracy inside the supernet, FLOPs, bytes) on the validation split, extracts up to
``front_size`` Pareto members, fine-tunes each from the supernet's weights and trains the same
architecture from scratch, trains the zoo's hand-designed ``cnn1d`` and ``mlp`` from scratch, and
reports test accuracy, FLOPs and Kendall's tau between the supernet's ranking (validation) and the
from-scratch ranking (test) of the front members.
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
    """Sizes of one run (defaults: the full run; :func:`quick_config` for a smoke test)."""

    seeds: tuple[int, ...] = (0,)
    supernet_steps: int = 1500
    n_random: int = 2
    trials: int = 48
    batch: int = 16
    front_size: int = 4
    finetune_steps: int = 300
    scratch_steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 3e-3
    sampler: str = "tpe"


def quick_config() -> OFAConfig:
    """A run of seconds-to-a-minute for tests."""
    return OFAConfig(
        supernet_steps=10, trials=4, batch=2, front_size=2, finetune_steps=5, scratch_steps=10, batch_size=32
    )


def _test_acc(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
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


def run_seed(cfg: OFAConfig, seed: int, log=print) -> dict[str, Any]:
    """One seed of the experiment; returns its rows and figures."""
    ds = data.load_dataset("mnist1d", seed=seed)
    shape, classes = ds.input_shape, ds.num_classes
    fam = nn.get_family("conv1d_family")
    sample = jnp.zeros((1, *shape), jnp.float32)
    t0 = time.perf_counter()
    net = nas.split_supernet(nas.build_supernet(fam, shape, classes, seed=seed), fam, shape, classes)
    net, ce = nas.train_supernet(
        net,
        ds.x_train,
        ds.y_train,
        steps=cfg.supernet_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        n_random=cfg.n_random,
        seed=seed,
    )
    t_supernet = time.perf_counter() - t0
    log(
        f"seed {seed}: supernet trained in {t_supernet:.0f} s; final CE largest {ce[-1, 0]:.3f} smallest {ce[-1, 1]:.3f}"
    )
    rng = np.random.default_rng(seed)
    timing_opts = [fam.sample(rng) for _ in range(max(cfg.batch, 2))]
    t_vm, t_one = _time_eval(net, timing_opts, ds)
    t0 = time.perf_counter()
    cands = nas.search(net, ds.x_val, ds.y_val, trials=cfg.trials, batch=cfg.batch, sampler=cfg.sampler, seed=seed)
    t_search = time.perf_counter() - t0
    front = nas.pareto_front(cands)
    if len(front) > cfg.front_size:  # spread over the front by FLOPs
        front = [front[i] for i in np.linspace(0, len(front) - 1, cfg.front_size).round().astype(int)]
    rows = []
    for i in front:
        c = cands[i]
        tuned = train_scan(
            nas.extract(net, c.options),
            ds.x_train,
            ds.y_train,
            steps=cfg.finetune_steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate / 3,
            seed=seed,
        )
        scratch = nn.build_model(fam.name, input_shape=shape, num_classes=classes, rngs=nnx.Rngs(seed), **c.options)
        scratch = train_scan(
            scratch, ds.x_train, ds.y_train, steps=cfg.scratch_steps, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, seed=seed,
        )  # fmt: skip
        rows.append(
            {
                "model": "found " + _short(c.options),
                "flops": c.flops,
                "params": c.params,
                "supernet_val": c.accuracy,
                "finetuned_test": _test_acc(tuned, ds.x_test, ds.y_test),
                "scratch_test": _test_acc(scratch, ds.x_test, ds.y_test),
            }
        )
        log(f"  {rows[-1]}")
    for name, opts in (("cnn1d", {}), ("mlp", {})):
        model = nn.build_model(name, input_shape=shape, num_classes=classes, rngs=nnx.Rngs(seed), **opts)
        model = train_scan(
            model, ds.x_train, ds.y_train, steps=cfg.scratch_steps, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, seed=seed,
        )  # fmt: skip
        model.eval()
        rows.append(
            {
                "model": f"zoo {name}",
                "flops": metrics.flops(model, sample),
                "params": metrics.count_params(model),
                "supernet_val": None,
                "finetuned_test": None,
                "scratch_test": _test_acc(model, ds.x_test, ds.y_test),
            }
        )
        log(f"  {rows[-1]}")
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
        "supernet_seconds": t_supernet,
        "search_seconds": t_search,
        "candidates": len(cands),
        "eval_k": len(timing_opts),
        "eval_vmapped_s": t_vm,
        "eval_one_by_one_s": t_one,
        "supernet_subnet_steps": cfg.supernet_steps * (2 + cfg.n_random),
        "scratch_steps_per_arch": cfg.scratch_steps,
    }


def _short(o: dict[str, Any]) -> str:
    return "w{}-{}-{} d{}{}{} k{}{}{}".format(*(o[f"{k}_{s}"] for k in ("width", "depth", "kernel") for s in range(3)))


def format_table(result: dict[str, Any]) -> str:
    """The result of one seed as a text table."""
    head = f"{'model':<28} {'FLOPs':>9} {'params':>7} {'supernet val':>12} {'fine-tuned':>10} {'scratch':>8}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(
            f"{r['model']:<28} {r['flops']:>9,.0f} {r['params']:>7,} {f(r['supernet_val']):>12} "
            f"{f(r['finetuned_test']):>10} {f(r['scratch_test']):>8}"
        )
    lines.append(
        f"Kendall tau (supernet val vs scratch test, front members): {result['kendall_tau']:.3f}; "
        f"evaluation of K={result['eval_k']} sub-networks: vmapped {result['eval_vmapped_s'] * 1e3:.1f} ms, "
        f"one by one {result['eval_one_by_one_s'] * 1e3:.1f} ms "
        f"({result['eval_one_by_one_s'] / result['eval_vmapped_s']:.2f}x); supernet {result['supernet_seconds']:.0f} s, "
        f"search {result['search_seconds']:.0f} s for {result['candidates']} candidates"
    )
    return "\n".join(lines)


def plot_results(results: list[dict[str, Any]], path: str) -> str:
    """Test accuracy against FLOPs for every seed: the found Pareto members fine-tuned from the
    supernet and trained from scratch, and the zoo's hand-designed models; writes a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = (
        ("found, fine-tuned from the supernet", "finetuned_test", "found", "o", "tab:blue"),
        ("found, trained from scratch", "scratch_test", "found", "s", "tab:green"),
        ("zoo (hand-designed), from scratch", "scratch_test", "zoo", "*", "tab:red"),
    )
    for label, key, kind, marker, color in styles:
        pts = [
            (r["flops"], 100 * r[key], res["seed"])
            for res in results
            for r in res["rows"]
            if r["model"].startswith(kind) and r[key] is not None
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=70, color=color, label=label)
    for res in results:
        for r in res["rows"]:
            if r["model"].startswith("zoo"):
                ax.annotate(f"{r['model'][4:]} s{res['seed']}", (r["flops"], 100 * r["scratch_test"]), fontsize=7)
    ax.set(xscale="log", xlabel="FLOPs per input (log)", ylabel="test accuracy (%)",
           title=f"MNIST-1D: searched sub-networks vs the zoo ({len(results)} seed(s))")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dominance(results: list[dict[str, Any]], key: str = "scratch_test") -> list[dict[str, Any]]:
    """Per seed and zoo model: the found members with accuracy above it at no more FLOPs."""
    out = []
    for res in results:
        found = [r for r in res["rows"] if r["model"].startswith("found") and r[key] is not None]
        for z in (r for r in res["rows"] if r["model"].startswith("zoo")):
            better = [f["model"] for f in found if f["flops"] <= z["flops"] and f[key] > z["scratch_test"]]
            out.append({"seed": res["seed"], "zoo": z["model"], "dominated_by": better})
    return out


def run_experiment(cfg: OFAConfig, log=print) -> list[dict[str, Any]]:
    """Runs every seed of ``cfg`` and logs each seed's table."""
    out = []
    for seed in cfg.seeds:
        res = run_seed(cfg, seed, log)
        log(format_table(res))
        out.append(res)
    return out
