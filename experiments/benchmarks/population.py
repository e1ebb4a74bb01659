"""Trials per second of the population executor against the sequential executor, through the public
sweep API, with a hand-written plain-JAX vmapped loop as the reference ratio; one table, one run.

For each model (LeNet-300-100 ``lenet300`` and LeNet-5 ``lenet5``) and each K, the sweep runs K
learning rates of a train-only config (digits; the same steps and batches for every trial):

- ``seq trials/s``: :func:`research.sweep.sweep` with ``executor="sequential"``, on the same K
  trials per round by default (a sweep's own fixed work, its table, plot and directory, is then
  shared out over as many trials in both executors); ``--seq-trials N`` measures it on N trials
  instead (faster, but biased for K far from N).
- ``pop trials/s``: the same sweep with ``executor="population"`` (``max_k=K``); the chooser
  measures its chunk size (``chosen K``; 1 means it fell back to one after another) and times the
  sequential executor's own jitted step against the best population program (``runner``: ``pop``
  trains with the population's programs, ``seq`` exactly as the sequential executor trains).
- ``pop 1st``: the first population sweep of that K in the process (compiling its programs and
  measuring its chunk size), after the sequential warm-up sweep compiled the sequential step; the
  warm figures reuse both, as the sequential sweep reuses its jitted step after the warm-up sweep.
- ``seq cold`` / ``pop cold`` / ``cold p/s``: each executor's sweep of the K trials as the first
  sweep of a fresh process (``--cold``, the default; one subprocess each, ``--cold-repeats`` times
  alternating which goes first, the fastest of each kept), so both pay their compilations: what a
  one-shot ``slimjax sweep`` pays. Only the sweep call is timed, not the interpreter's start.
  The rounds printed after the table give each fresh population sweep's choice (``K=32 pop``,
  ``K=1 seq``: the sequential path; ``stored``: read back from an earlier process).
- ``ovl cold`` / ``ovl/seq`` (``--overlap``): a third fresh process per round, the population
  executor with ``overlap=True`` (its program compiled in a background thread while its first
  trials train one after another), against the same sequential figure.
- ``seq rerun`` / ``pop rerun`` / ``rerun p/s`` (``--rerun``): the same fresh-process sweeps with a
  persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, every program kept) that one untimed
  fresh sweep of each executor filled first: what running the sweep again (other learning rates,
  same population) pays. Both load their compiled programs; the population executor also reads its
  measured chunk size back (:mod:`research.population.choices`) instead of measuring it.
- ``plain K`` / ``plain chosen``: a hand-written plain-JAX loop (the whole training as one
  ``lax.scan``, Adam with the learning rate as a traced value; on a CPU a model with convolutions
  steps one compiled step per call instead, as :func:`research.train.scan_steps` does), K (or the
  chosen K) trials vmapped in one program against the same program called K times; compilation
  excluded.
- ``kept`` = ``pop/seq`` over ``plain chosen``: how much of the plain vmap gain at the chunk size
  it trains with the executor keeps (the issue's target: at least 90% on the MLP); ``kept@K`` =
  ``pop/seq`` over ``plain K``, against the plain gain at the K the row allows (stricter when
  the plain loop gains more at K than at the chosen K).

Every timing is the fastest of ``--repeats`` rounds (more for small K: at least ``--min-trials``
trials per executor), sequential and population interleaved, the
order alternating from round to round (other processes on a shared machine only ever add time);
every round's figures are printed after the table, so the noise is visible. Both sweeps count everything a sweep does per
trial: training, measuring each run (accuracy, FLOPs, latency) and writing its run directory.

Run:
  python -m experiments.benchmarks.population                      # CPU: 200 steps, K in 1 8 32 128
  python -m experiments.benchmarks.population --steps 1000 --ks 1 8 32 128   # a GPU
  python -m experiments.benchmarks.population --models lenet300 --ks 1 8 --steps 10 --seq-trials 2 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
import time


def _config(model: str, steps: int, batch_size: int):
    from research import config as C
    from research.stages import TrainStage

    return C.Config(
        name=f"pop-{model}",
        model=C.ModelConfig(name=model),
        data=C.DataConfig(name="digits"),
        stages=(
            TrainStage(
                steps=steps, batch_size=batch_size, learning_rate=1e-3, checkpoint_every=0, eval_every=0, log_every=0
            ),
        ),
    )


def _lrs(k: int) -> list[float]:
    import numpy as np

    return [float(f"{v:.6g}") for v in np.geomspace(1e-4, 1e-2, k)]


def _sweep_seconds(config, k: int, executor) -> tuple[float, object]:
    """``(sweep seconds, report)`` of a K-trial sweep."""
    from research.sweep import sweep

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        t0 = time.perf_counter()
        report = sweep(config, {"stages.train.learning_rate": _lrs(k)}, tmp, progress=False, executor=executor)
        seconds = time.perf_counter() - t0
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} trials failed: {report.failed[0].error}")
    return seconds, report


def _plain_programs(model_name: str, steps: int, batch_size: int):
    """``(one, many, params)``: one plain-JAX training, and the same vmapped over learning rates.

    Each is a step loop of :func:`research.train.scan_steps`: one ``lax.scan`` over the steps,
    except on a CPU for a model with convolutions, where both run one compiled step per call (XLA's
    CPU backend runs convolution gradients many times slower inside a loop: ``conv_in_loop.py``),
    so the reference is the fastest plain loop on either side, not one that carries the penalty.
    """
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from research.data import load_dataset
    from research.nn import build_model
    from research.train import scan_steps

    ds = load_dataset("digits", seed=0)
    model = build_model(model_name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    xs, ys = jax.numpy.asarray(ds.x_train), jax.numpy.asarray(ds.y_train)
    idx = jax.numpy.asarray(np.random.default_rng(0).integers(0, len(ds.x_train), (steps, batch_size)))
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

    def init(params, lr):
        opt = tx.init(params)
        opt.hyperparams["learning_rate"] = lr
        return params, opt

    def body(carry, i):
        p, o = carry

        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return optax.softmax_cross_entropy_with_integer_labels(m(xs[i]), ys[i]).mean()

        value, grads = jax.value_and_grad(loss)(p)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), value

    def program(init, body):
        init, loop = jax.jit(init), scan_steps(body)

        def train(params, lr):
            _, losses = loop(init(params, lr), idx)
            return losses[-1]

        return train

    many_init = jax.vmap(init, in_axes=(None, 0))
    many_body = jax.vmap(body, in_axes=(0, None))  # K trials, the same batch
    return program(init, body), program(many_init, many_body), params


def _plain_ratio(programs, k: int, repeats: int) -> float:
    """Seconds of K one-after-another plain-JAX trainings over seconds of the K vmapped in one
    program, each the fastest of ``repeats`` interleaved rounds (compilation excluded)."""
    import jax
    import jax.numpy as jnp

    if k <= 1:
        return 1.0
    one, many, params = programs
    lrs = jnp.asarray(_lrs(k), jnp.float32)
    jax.block_until_ready(one(params, lrs[0]))
    jax.block_until_ready(many(params, lrs))
    seq, vm = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for lr in lrs:
            jax.block_until_ready(one(params, lr))
        seq.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(many(params, lrs))
        vm.append(time.perf_counter() - t0)
    return min(seq) / min(vm)


def _cold_seconds(model: str, k: int, executor: str, args, cache_dir: str | None = None) -> tuple[float, str]:
    """Seconds of a K-trial sweep run as the first sweep of a fresh Python process (``cache_dir``:
    with that persistent compilation cache, where the population executor also keeps its choices),
    and what its populations chose (:func:`_chosen`; empty for the sequential executor)."""
    from experiments.benchmarks.fresh import fresh_timing  # pylint: disable=import-outside-toplevel

    budget = "none" if args.measure_budget is None else str(args.measure_budget)
    return fresh_timing(
        "experiments.benchmarks.population", "--one-sweep", model, str(k), executor, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--measure-budget", budget, "--search", args.search,
        what=f"the cold {executor} sweep", cache_dir=cache_dir,
    )  # fmt: skip


def _chosen(summary: dict) -> str:
    """What an executor summary's populations chose: ``K=32 pop``, ``K=1 seq`` (the sequential
    path), ``stored`` when read back from an earlier process; ``""`` without populations."""
    out = []
    for p in summary.get("populations", []):
        choice = p.get("choice") or {}
        runner = "seq" if choice.get("runner", "sequential") == "sequential" else "pop"
        out.append(f"K={p.get('k', 1)} {runner}" + (" stored" if choice.get("stored") else ""))
    return ", ".join(out)


def _times(runs: list[tuple[float, str]]) -> str:
    """Seconds of fresh-process sweeps, each with what it chose when it says."""
    return "[" + ", ".join(f"{t:.2f}" + (f" ({note})" if note else "") for t, note in runs) + "]"


def _fastest(runs: list[tuple[float, str]]) -> float:
    return min(t for t, _ in runs)


def _rerun_cells(model: str, k: int, args, rounds: list[str]) -> str:
    """``seq rerun``, ``pop rerun`` (trials/s) and their ratio: each executor's K-trial sweep in fresh
    processes sharing one persistent compilation cache, after one untimed fresh sweep of each filled it."""
    names = ("sequential", "population")
    with tempfile.TemporaryDirectory(prefix="population-rerun-") as cache:
        for name in names:
            _cold_seconds(model, k, name, args, cache_dir=cache)
        reruns: dict[str, list[tuple[float, str]]] = {name: [] for name in names}
        for r in range(args.cold_repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                reruns[name].append(_cold_seconds(model, k, name, args, cache_dir=cache))
    rounds.append(
        f"{model} K={k}: rerun seconds per fresh process (compilation cache filled), "
        + ", ".join(f"{name} {_times(reruns[name])}" for name in names)
    )
    seq, pop = k / _fastest(reruns["sequential"]), k / _fastest(reruns["population"])
    return f" {seq:>9.2f} {pop:>9.2f} {pop / seq:>9.2f}"


def _population_options(args, k: int) -> dict:
    """The population executor's options for a K-trial sweep (``--measure-budget``, ``--search``)."""
    options: dict = {"max_k": k}
    if args.measure_budget != "default":
        options["measure_budget"] = args.measure_budget
    if args.search != "auto":
        options["largest_first"] = args.search == "largest"
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=200, help="train steps per trial")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--seq-trials",
        type=int,
        default=0,
        help="trials the sequential sweep runs per round (default 0: K, as the population)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per figure (the fastest is kept)")
    parser.add_argument(
        "--cold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each executor's sweep as the first of a fresh process (one subprocess each)",
    )
    parser.add_argument(
        "--cold-repeats",
        type=int,
        default=1,
        help="fresh processes per executor for the cold figures (alternating which goes first; fastest kept)",
    )
    parser.add_argument(
        "--measure-budget",
        type=lambda v: v if v == "default" else None if v == "none" else float(v),
        default="default",
        help="the population executor's measure_budget (fraction of the estimated sequential training the "
        "chooser may spend measuring; 'none': no limit; default: the executor's, 0.1 on a CPU, 0.5 on a GPU/TPU)",
    )
    parser.add_argument(
        "--search",
        choices=("auto", "ascending", "largest"),
        default="auto",
        help="the chooser's search: every power of two from K=1 up, or only the largest K against the sequential "
        "step (auto: the executor's default, largest on a GPU/TPU and for a CPU population with convolutions)",
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="cold figures also for the population executor with overlap=True (its program compiled in a "
        "background thread while the first trials train)",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="cold figures also for a fresh process with a persistent compilation cache that one earlier fresh "
        "sweep of each executor filled (every program kept; the population executor's measured choice beside it)",
    )
    parser.add_argument("--verbose", action="store_true", help="print the chooser's figures as each K finishes")
    parser.add_argument("--one-sweep", nargs=3, metavar=("MODEL", "K", "EXECUTOR"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--min-trials",
        type=int,
        default=8,
        help="at least this many trials per executor over the rounds: small K get more rounds (less noise)",
    )
    args = parser.parse_args(argv)

    import os

    import jax

    from research.executors import make_executor
    from research.run import register_all_stages
    from research.sweep import report_populations

    register_all_stages()
    if args.one_sweep:  # a cold sweep in this fresh process (for --cold): prints its seconds
        from experiments.benchmarks.fresh import seconds_line  # pylint: disable=import-outside-toplevel

        model, k, name = args.one_sweep
        options = _population_options(args, int(k)) if name.startswith("population") else {}
        if name == "population-overlap":
            name, options["overlap"] = "population", True
        executor = make_executor(name, **options)
        seconds, report = _sweep_seconds(_config(model, args.steps, args.batch_size), int(k), executor)
        print(seconds_line(seconds, _chosen(report.executor)))
        return 0
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}) x {jax.device_count()}; jax {jax.__version__}")
    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"digits, train-only, {args.steps} steps of batch {args.batch_size} per trial; fastest of {args.repeats}\n")
    header = (
        f"{'model':<9} {'K':>4} {'chosen K':>8} {'runner':>6} {'seq trials/s':>12} {'pop trials/s':>12} "
        f"{'pop 1st':>8} {'pop/seq':>8} {'plain K':>7} {'plain chosen':>12} {'kept':>6} {'kept@K':>7}"
        f"{' seq cold':>9} {'pop cold':>8} {'cold p/s':>8}"
        + (f" {'ovl cold':>8} {'ovl/seq':>7}" if args.overlap else "")
        + (f" {'seq rerun':>9} {'pop rerun':>9} {'rerun p/s':>9}" if args.rerun else "")
    )
    print(header)
    print("-" * len(header))
    notes, rounds = [], []

    def population():
        return make_executor("population", **_population_options(args, k))

    for model in args.models:
        config = _config(model, args.steps, args.batch_size)
        programs = _plain_programs(model, args.steps, args.batch_size)
        _sweep_seconds(config, 1, make_executor("sequential"))  # warm-up: data loading, first compilations
        for k in args.ks:
            cold, report = _sweep_seconds(config, k, population())
            chosen = max((p.get("k", 1) for p in report.executor["populations"]), default=1)
            # a population without a measured choice (a single trial) ran as the sequential executor runs
            runners = {p.get("choice", {}).get("runner", "sequential") for p in report.executor["populations"]}
            runner = "seq" if runners == {"sequential"} else "pop"
            notes += [f"{model} K={k}: {line}" for line in report_populations(report.executor)]
            if args.verbose:  # the chooser's figures now, not only after the table (a run cut short keeps them)
                print("\n".join(f"    {line}" for line in notes if line.startswith(f"{model} K={k}:")), flush=True)
            n_seq = args.seq_trials or k
            seq_s, pop_s = [], []
            for r in range(max(args.repeats, math.ceil(args.min_trials / k))):
                order = ("seq", "pop") if r % 2 == 0 else ("pop", "seq")
                for which in order:
                    if which == "seq":
                        seq_s.append(_sweep_seconds(config, n_seq, make_executor("sequential"))[0])
                    else:
                        pop_s.append(_sweep_seconds(config, k, population())[0])
            rounds.append(
                f"{model} K={k}: seq trials/s per round ({n_seq} trials) {[round(n_seq / t, 2) for t in seq_s]}, "
                f"pop trials/s per round {[round(k / t, 2) for t in pop_s]} (rounds alternate seq-first, pop-first)"
            )
            seq_tps, pop_tps = n_seq / min(seq_s), k / min(pop_s)
            plain = _plain_ratio(programs, k, args.repeats)
            plain_chosen = plain if chosen == k else _plain_ratio(programs, chosen, args.repeats)
            ratio = pop_tps / seq_tps
            cold_cells = ""
            if args.cold:
                names = ["sequential", "population"] + (["population-overlap"] if args.overlap else [])
                colds: dict[str, list[tuple[float, str]]] = {name: [] for name in names}
                for r in range(args.cold_repeats):
                    for name in names if r % 2 == 0 else names[::-1]:
                        colds[name].append(_cold_seconds(model, k, name, args))
                rounds.append(
                    f"{model} K={k}: cold seconds per fresh process, "
                    + ", ".join(f"{name} {_times(colds[name])}" for name in names)
                )
                seq_cold, pop_cold = k / _fastest(colds["sequential"]), k / _fastest(colds["population"])
                cold_cells = f" {seq_cold:>8.2f} {pop_cold:>8.2f} {pop_cold / seq_cold:>8.2f}"
                if args.overlap:
                    ovl_cold = k / _fastest(colds["population-overlap"])
                    cold_cells += f" {ovl_cold:>8.2f} {ovl_cold / seq_cold:>7.2f}"
            if args.rerun:
                cold_cells += _rerun_cells(model, k, args, rounds)
            print(
                f"{model:<9} {k:>4} {chosen:>8} {runner:>6} {seq_tps:>12.2f} {pop_tps:>12.2f} {k / cold:>8.2f} {ratio:>8.2f} "
                f"{plain:>7.2f} {plain_chosen:>12.2f} {ratio / plain_chosen:>6.0%} {ratio / plain:>7.0%}{cold_cells}",
                flush=True,
            )
    print(f"\nload average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("rounds:")
    for line in rounds:
        print(f"  {line}")
    print("chooser:")
    for line in notes:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
