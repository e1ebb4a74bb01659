"""Pruning benchmark: masked train-step overhead, gradual vs one-shot, channel removal speed.

Prints three tables, each measured side by side in one run:

(a) **Masked train step against the dense step** (lenet300, lenet5, resnet20): the same model,
    batch and Adam, built with ``research.train.make_train_step``; the masked step wraps Adam in
    :func:`methods.pruning.masked` (fixed 90% masks, and a polynomial schedule whose mask
    recomputation sits in a ``lax.cond``). Steps are timed interleaved (dense, fixed, schedule,
    dense, ...) so machine noise hits all alike; median step time and ratio (target <= 1.05x).
(b) **Gradual (polynomial, Zhu & Gupta) against one-shot magnitude pruning** at 90% sparsity:
    LeNet-300-100 trained dense on the shipped MNIST subset, then each method fine-tunes with the
    same budget through the ``prune`` stage (``PruneStage``); test accuracy over seeds.
(c) **Half the channels removed** from ResNet-20 and VGG-small: FLOPs and CPU inference latency
    against dense, from :func:`experiments.benchmarks.pruning_structured.main` (target latency
    <= 0.6x).

Run from the repository root:
  python -m experiments.benchmarks.pruning            # about 3-4 minutes on 2 CPU cores
  python -m experiments.benchmarks.pruning --quick    # smoke run
  python -m experiments.benchmarks.pruning --tables a --batch 128 --repeats 100

References:
  Zhu & Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.benchmarks import pruning_structured
from methods.pruning import PruneStage
from methods.pruning import magnitude_masks
from methods.pruning import masked
from methods.pruning import polynomial_schedule
from methods.pruning.stage import run_prune
from research.data import load_dataset
from research.metrics import accuracy
from research.nn import build_model
from research.report import format_table
from research.stages import Bundle
from research.stages import StageContext
from research.stages import TrainStage
from research.train import create_train_state
from research.train import finetune
from research.train import make_train_step

STEP_MODELS = {"lenet300": (28, 28, 1), "lenet5": (28, 28, 1), "resnet20": (32, 32, 3)}


# ----------------------------------------------------------------------------- (a) step time


def step_overhead(name: str, *, batch: int, repeats: int, sparsity: float = 0.9) -> dict:
    """Median train-step seconds of dense Adam and of ``masked(adam)`` (fixed masks / schedule)."""
    shape = STEP_MODELS[name]
    rng = np.random.default_rng(0)
    data = {
        "x": jnp.asarray(rng.normal(size=(batch, *shape)).astype(np.float32)),
        "y": jnp.asarray(rng.integers(0, 10, size=batch).astype(np.int32)),
    }
    model = build_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0))
    adam = optax.adam(1e-3)
    masks = magnitude_masks(create_train_state(nnx.clone(model), adam)[1].params, sparsity)
    # The schedule ramps over steps 0..2 (so masks exist), then holds: the timed steps are past
    # it and pay only the lax.cond that skips mask recomputation, as most training steps do.
    sched = polynomial_schedule(sparsity, begin_step=0, end_step=2, frequency=1)
    variants = {
        "dense": adam,
        "masked_fixed": masked(adam, masks=masks),
        "masked_schedule": masked(adam, sched),
    }
    steps, states = {}, {}
    for key, tx in variants.items():
        defs, state = create_train_state(nnx.clone(model), tx)
        steps[key] = make_train_step(defs, tx)  # donates its input state, as in training
        for _ in range(4):  # compile, then run past the schedule's ramp
            state, _ = steps[key](state, data)
        jax.block_until_ready(state)
        states[key] = state
    times = {k: [] for k in variants}
    if repeats <= 0:  # auto: about 6 s of timed rounds, at least 10 and at most 500
        t0 = time.perf_counter()
        for key in variants:
            states[key], metrics = steps[key](states[key], data)
            jax.block_until_ready((states[key], metrics))
        repeats = int(np.clip(6.0 / (time.perf_counter() - t0), 10, 500))
    for _ in range(repeats):
        for key in variants:
            t0 = time.perf_counter()
            states[key], metrics = steps[key](states[key], data)
            jax.block_until_ready((states[key], metrics))
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "batch": batch,
        "repeats": repeats,
        "dense_ms": 1e3 * med["dense"],
        "fixed_ms": 1e3 * med["masked_fixed"],
        "fixed_x": med["masked_fixed"] / med["dense"],
        "schedule_ms": 1e3 * med["masked_schedule"],
        "schedule_x": med["masked_schedule"] / med["dense"],
    }


STEP_COLUMNS = (
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("repeats", "steps timed", "{}"),
    ("dense_ms", "dense ms", "{:.3f}"),
    ("fixed_ms", "masked (fixed) ms", "{:.3f}"),
    ("fixed_x", "x dense", "{:.3f}"),
    ("schedule_ms", "masked (schedule) ms", "{:.3f}"),
    ("schedule_x", "x dense", "{:.3f}"),
)


# ----------------------------------------------------------------------------- (b) accuracy


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradualConfig:
    """Settings of table (b)."""

    dataset: str = "mnist5k"
    seeds: tuple[int, ...] = (0, 1, 2)
    dense_steps: int = 1500
    finetune_steps: int = 1000
    sparsity: float = 0.9
    learning_rate: float = 1e-3
    batch_size: int = 100
    limit: int | None = None


def gradual_vs_one_shot(cfg: GradualConfig, workdir: str) -> list[dict]:
    """Test accuracy of dense, one-shot and gradual pruning per seed (same fine-tuning budget)."""
    ds = load_dataset(cfg.dataset, seed=0, limit=cfg.limit)
    rows = []
    for seed in cfg.seeds:
        model = build_model("lenet300", input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(seed))
        dense, _ = finetune(
            model,
            ds,
            workdir=pathlib.Path(workdir, f"dense_{seed}"),
            seed=seed,
            progress=False,
            steps=cfg.dense_steps,
            learning_rate=cfg.learning_rate,
            batch_size=cfg.batch_size,
            checkpoint_every=0,
        )
        row = {"seed": seed, "dense": accuracy(dense, ds.x_test, ds.y_test)}
        for schedule in ("one_shot", "polynomial"):
            stage = PruneStage(
                sparsity=cfg.sparsity,
                schedule=schedule,
                train=TrainStage(
                    steps=cfg.finetune_steps,
                    learning_rate=cfg.learning_rate,
                    batch_size=cfg.batch_size,
                    checkpoint_every=0,
                    eval_every=0,
                ),
            )
            label = f"{schedule}_{seed}"
            res = run_prune(
                Bundle(model=dense, dataset=ds, seed=seed),
                stage,
                StageContext(1, label, pathlib.Path(workdir, label), seed, False),
            )
            row[schedule] = accuracy(res.bundle.model, ds.x_test, ds.y_test)
            row[f"{schedule}_sparsity"] = res.metrics["mask_sparsity"]
        rows.append(row)
    mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "seed"}
    rows.append({"seed": "mean", **mean})
    if len(cfg.seeds) > 1:
        std = {k: statistics.pstdev(r[k] for r in rows[:-1]) for k in mean}
        rows.append({"seed": "std", **std})
    return rows


GRADUAL_COLUMNS = (
    ("seed", "seed", "{}"),
    ("dense", "dense acc", "{:.4f}"),
    ("one_shot", "one-shot acc", "{:.4f}"),
    ("polynomial", "gradual acc", "{:.4f}"),
    ("one_shot_sparsity", "one-shot sparsity", "{:.3f}"),
    ("polynomial_sparsity", "gradual sparsity", "{:.3f}"),
)


# ----------------------------------------------------------------------------- (c) channels


def channel_removal(*, batch: int, repeats: int, ratio: float = 0.5) -> list[dict]:
    """Dense and half-channel ResNet-20 / VGG-small via ``pruning_structured.main``."""
    with contextlib.redirect_stdout(io.StringIO()):
        rows = pruning_structured.main(
            [
                "--models",
                "resnet20,vgg_small",
                "--ratios",
                f"0,{ratio}",
                "--batch",
                str(batch),
                "--repeats",
                str(repeats),
            ]
        )
    return rows


CHANNEL_COLUMNS = (
    ("model", "model", "{}"),
    ("ratio", "channels removed", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("flops", "FLOPs/example", "{:,.0f}"),
    ("flops_x", "FLOPs x dense", "{:.3f}"),
    ("latency_ms", "latency ms", "{:.3f}"),
    ("lat_x", "latency x dense", "{:.3f}"),
    ("max_err", "max|small - masked|", "{:.1e}"),
)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--tables", default="abc", help="which tables to run, e.g. 'a' or 'bc'")
    p.add_argument("--step-models", default=",".join(STEP_MODELS), help="models of table (a)")
    p.add_argument("--batch", type=int, default=32, help="batch of the step timing (a)")
    p.add_argument("--repeats", type=int, default=0, help="timed steps per variant in (a); 0 = about 6 s")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of table (b) (default 0 1 2)")
    p.add_argument("--latency-batch", type=int, default=32, help="inference batch of (c)")
    p.add_argument("--latency-repeats", type=int, default=30, help="timed calls of (c)")
    p.add_argument("--workdir", help="where (b) writes its stage directories (default: temp)")
    args = p.parse_args(argv)
    gcfg = GradualConfig()
    if args.quick:
        args.batch, args.repeats, args.latency_batch, args.latency_repeats = 16, 5, 4, 3
        args.step_models = "lenet300,lenet5"
        gcfg = GradualConfig(dataset="digits", seeds=(0,), dense_steps=40, finetune_steps=40, limit=500)
    if args.seeds:
        gcfg = dataclasses.replace(gcfg, seeds=tuple(args.seeds))
    out: dict = {}
    platform = jax.devices()[0].platform
    if "a" in args.tables:
        t0 = time.perf_counter()
        out["step"] = [step_overhead(m, batch=args.batch, repeats=args.repeats) for m in args.step_models.split(",")]
        print(
            f"(a) train step: dense Adam vs masked(Adam) at 90% sparsity, batch {args.batch}, "
            f"median of interleaved steps on {platform} (target <= 1.05x)"
        )
        print(format_table(out["step"], STEP_COLUMNS))
        print(f"    [{time.perf_counter() - t0:.0f} s]\n")
    if "b" in args.tables:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pruning_bench_") as tmp:
            out["gradual"] = gradual_vs_one_shot(gcfg, args.workdir or tmp)
        print(
            f"(b) LeNet-300-100 on {gcfg.dataset}: {gcfg.sparsity:.0%} sparsity, every kernel, "
            f"after {gcfg.dense_steps} dense steps; each method fine-tunes "
            f"{gcfg.finetune_steps} steps (PruneStage, Adam, cosine). One-shot prunes at step 0; "
            "gradual ramps cubically over the first 70% (Zhu & Gupta). Test accuracy:"
        )
        print(format_table(out["gradual"], GRADUAL_COLUMNS))
        print(f"    [{time.perf_counter() - t0:.0f} s]\n")
    if "c" in args.tables:
        t0 = time.perf_counter()
        out["channels"] = channel_removal(batch=args.latency_batch, repeats=args.latency_repeats)
        print(
            f"(c) half the channels removed (L1, every coupled group): jitted forward, batch "
            f"{args.latency_batch}, median of {args.latency_repeats} on {platform} "
            "(target latency <= 0.6x dense)"
        )
        print(format_table(out["channels"], CHANNEL_COLUMNS))
        print(f"    [{time.perf_counter() - t0:.0f} s]")
    return out


if __name__ == "__main__":
    main()
