"""Does distillation recover the accuracy lost to 90% pruning or 4-bit quantization better than
fine-tuning without a teacher?

For each seed, ``configs/kd_recovery.py`` runs two pipelines through the stage runner
(:func:`research.run.run`), each with four stages:

* ``prune``: dense teacher -> one-shot 90% magnitude masks (no training) -> masked fine-tuning
  on the hard labels (``PruneStage``) and, from the same pruned model, distillation from the
  dense teacher (``DistillStage``, which keeps the masks ``1_prune`` declared);
* ``quant``: dense teacher -> 4-bit fake-quant + calibration (``QuantizeStage``) -> QAT on the
  hard labels (``QATStage``) and, from the same quantized model, distillation (``DistillStage``).
  LeNet-300-100 loses almost nothing at 4 bits here, so the same pipeline also runs at 2 bits
  (variant ``quant2``), where post-training quantization leaves a gap to recover.

Both arms of a pipeline start from the same compressed model and use the same steps, learning
rate, optimizer, schedule and batches; only the loss differs. The table gives test accuracy of
the dense teacher, the compressed model before fine-tuning, and the two fine-tuned models
(mean and standard deviation over seeds), and the share of the gap
``teacher - compressed`` that each arm recovers. For the pruned pipeline it also checks that
every weight pruned by stage ``1_prune`` is still exactly zero after both fine-tunings.

Data: ``mnist5k`` split by the run's seed (3,600 train, 400 validation, 1,000 test images), so
a seed changes the split, the initialisation and the batch order; within a seed both arms and
the teacher see the same split.

Reference (KD): Hinton, Vinyals & Dean, https://arxiv.org/abs/1503.02531
"""

import dataclasses
import importlib.util
import math
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from research.report import format_table
from research.run import run
from research.train import split_model

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[2] / "configs" / "kd_recovery.py"
# Variant name -> (pipeline of configs/kd_recovery.py, Recipe overrides).
VARIANTS = {
    "prune": ("prune", {}),
    "quant4": ("quant", {"bits": 4}),
    "quant2": ("quant", {"bits": 2}),
}
# The stage-level teacher (issue 15) on MNIST-1D's CNN: the two arms are two configs run in one
# workdir (the KD arm reuses the no-teacher arm's teacher and compressed model).
STAGE_VARIANTS = {
    "cnn1d_prune": ("prune_stage", {}),
    "cnn1d_gradual": ("gradual_stage", {}),
    "cnn1d_quant2": ("quant_stage", {"bits": 2}),
    "cnn1d_quant4": ("quant_stage", {"bits": 4}),
}
# Stage labels of each pipeline: teacher, compressed (no training), no-teacher fine-tune, KD.
LABELS = {
    "prune": ("0_train", "1_prune", "2_prune", "3_distill"),
    "quant": ("0_train", "1_quantize", "2_qat", "3_distill"),
}
ARMS = ("teacher", "compressed", "plain", "kd")


def config_module():
    """The ``configs/kd_recovery.py`` module (it is a file, not a package module)."""
    name = "slimjax_config_kd_recovery"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CONFIG_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def stage_model(workdir: pathlib.Path, label: str):
    """The model a finished stage of a run left (rebuilt from ``stages/<label>/result/``)."""
    from research.run import load_stage

    return load_stage(str(workdir), label).model


def revived_weights(before, after) -> dict[str, int]:
    """How many parameters that are exactly zero in ``before`` are non-zero in ``after``.

    Returns:
      ``{"zeros": zeros in before, "revived": of those, non-zero in after}``.

    Raises:
      ValueError: the two models have different parameter structures.
    """
    _, p0, _ = split_model(before)
    _, p1, _ = split_model(after)
    import jax

    l0, t0 = jax.tree.flatten(p0)
    l1, t1 = jax.tree.flatten(p1)
    if t0 != t1:
        raise ValueError(f"parameter trees differ: {t0} vs {t1}")
    zeros = revived = 0
    for a, b in zip(l0, l1, strict=True):
        z = np.asarray(a) == 0
        zeros += int(z.sum())
        revived += int((np.asarray(b)[z] != 0).sum())
    return {"zeros": zeros, "revived": revived}


def masked_zeros_kept(workdir: pathlib.Path, label: str) -> tuple[int, int]:
    """``(zeros the masks of stage `label` hold, of those, exactly zero in the stage's model)``."""
    from research import constraints
    from research.run import load_stage
    from research.tree import flatten_with_paths

    saved = load_stage(str(workdir), label)
    _, params, _ = split_model(saved.model)
    aligned, _ = constraints.align_masks(saved.extras["masks"], params)
    leaves = dict(flatten_with_paths(params))
    held = kept = 0
    for path, m in flatten_with_paths(aligned):
        if m is None:
            continue
        held += int(np.sum(~m))
        kept += int(np.sum(np.asarray(leaves[path])[~m] == 0))
    return held, kept


def run_stage_pipeline(
    variant: str, recipe, seed: int, root: pathlib.Path, *, progress: bool = False
) -> dict[str, Any]:
    """Runs one ``STAGE_VARIANTS`` variant for one seed: the no-teacher arm, then in the same
    workdir the KD arm (only the last stage differs and reruns); returns each arm's test accuracy."""
    pipeline, overrides = STAGE_VARIANTS[variant]
    recipe = dataclasses.replace(recipe, **overrides)
    module = config_module()
    workdir = root / f"{variant}_s{seed}"
    t0 = time.perf_counter()
    plain = run(module.make_config(pipeline, recipe, seed, kd=False), str(workdir), progress=progress, echo=False)
    plain_zeros = masked_zeros_kept(workdir, plain["stages"][-1]["label"]) if pipeline != "quant_stage" else None
    kd = run(module.make_config(pipeline, recipe, seed, kd=True), str(workdir), progress=progress, echo=False)
    kd_zeros = masked_zeros_kept(workdir, kd["stages"][-1]["label"]) if pipeline != "quant_stage" else None
    first, last = plain["stages"][0]["metrics"], plain["stages"][-1]["metrics"]
    # gradual pruning has no separate compressed stage: the arms start from the dense teacher
    compressed = plain["stages"][-2]["metrics"] if len(plain["stages"]) > 2 else first
    out: dict[str, Any] = {
        "variant": variant,
        "pipeline": pipeline,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "teacher": first["test_accuracy"],
        "compressed": compressed["test_accuracy"],
        "plain": last["test_accuracy"],
        "kd": kd["stages"][-1]["metrics"]["test_accuracy"],
        "nonzeros": {"plain": last["nonzeros"], "kd": kd["stages"][-1]["metrics"]["nonzeros"]},
        "params": first["params"],
        "kd_loss": kd["stages"][-1]["metrics"].get("kd_hinton"),
    }
    if plain_zeros is not None:
        out["pruned_zeros"] = plain_zeros[0]
        out["revived"] = {"plain": plain_zeros[0] - plain_zeros[1], "kd": kd_zeros[0] - kd_zeros[1]}
    return out


def run_pipeline(variant: str, recipe, seed: int, root: pathlib.Path, *, progress: bool = False) -> dict[str, Any]:
    """Runs one variant (see ``VARIANTS`` and ``STAGE_VARIANTS``) for one seed; returns each arm's test accuracy."""
    if variant in STAGE_VARIANTS:
        return run_stage_pipeline(variant, recipe, seed, root, progress=progress)
    pipeline, overrides = VARIANTS[variant]
    recipe = dataclasses.replace(recipe, **overrides)
    cfg = config_module().make_config(pipeline, recipe, seed)
    workdir = root / f"{variant}_s{seed}"
    t0 = time.perf_counter()
    report = run(cfg, str(workdir), progress=progress, echo=False)
    metrics = {st["label"]: st["metrics"] for st in report["stages"]}
    labels = LABELS[pipeline]
    out: dict[str, Any] = {
        "variant": variant,
        "pipeline": pipeline,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        **{arm: metrics[label]["test_accuracy"] for arm, label in zip(ARMS, labels, strict=True)},
        "nonzeros": {arm: metrics[label]["nonzeros"] for arm, label in zip(ARMS, labels, strict=True)},
        "params": metrics[labels[0]]["params"],
    }
    if pipeline == "prune":
        compressed = stage_model(workdir, labels[1])
        out["revived"] = {
            arm: revived_weights(compressed, stage_model(workdir, label))["revived"]
            for arm, label in (("plain", labels[2]), ("kd", labels[3]))
        }
        out["pruned_zeros"] = revived_weights(compressed, compressed)["zeros"]
    else:
        out["quantized_bytes"] = metrics[labels[1]].get("quantized_bytes")
    return out


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"mean ± sd"`` of ``scale * values``; ``"n/a"`` if a value is nan (no gap to recover)."""
    values = [scale * v for v in values]
    if any(math.isnan(v) for v in values):
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def recovered(teacher: float, compressed: float, tuned: float) -> float:
    """Share of the gap ``teacher - compressed`` closed by fine-tuning (1 = back to the teacher).

    ``nan`` when the compressed model is not worse than the teacher (no gap to recover).
    """
    gap = teacher - compressed
    return (tuned - compressed) / gap if gap > 0 else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The results table (one row per pipeline) and per-seed rows from :func:`run_pipeline`."""
    rows, per_seed = [], []
    for variant in (*VARIANTS, *STAGE_VARIANTS):
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        rec = {arm: [recovered(r["teacher"], r["compressed"], r[arm]) for r in rs] for arm in ("plain", "kd")}
        diff = [r["kd"] - r["plain"] for r in rs]
        rows.append(
            {
                "variant": variant,
                "seeds": len(rs),
                **{arm: _pm([r[arm] for r in rs]) for arm in ARMS},
                "recovered_plain": _pm(rec["plain"], digits=0),
                "recovered_kd": _pm(rec["kd"], digits=0),
                "kd_minus_plain": _pm(diff),
                "kd_wins": f"{sum(d > 0 for d in diff)}/{len(diff)}",
            }
        )
        for r in rs:
            per_seed.append(
                {
                    "variant": variant,
                    "seed": r["seed"],
                    **{arm: 100 * r[arm] for arm in ARMS},
                    "kd_minus_plain": 100 * (r["kd"] - r["plain"]),
                }
            )
    columns = [
        ("variant", "variant", "{}"),
        ("seeds", "seeds", "{}"),
        ("teacher", "dense teacher %", "{}"),
        ("compressed", "compressed, no FT %", "{}"),
        ("plain", "FT no teacher %", "{}"),
        ("kd", "FT with KD %", "{}"),
        ("recovered_plain", "gap recovered, no teacher %", "{}"),
        ("recovered_kd", "gap recovered, KD %", "{}"),
        ("kd_minus_plain", "KD - no teacher (pp)", "{}"),
        ("kd_wins", "KD better", "{}"),
    ]
    seed_columns = [
        ("variant", "variant", "{}"),
        ("seed", "seed", "{}"),
        *[(arm, f"{arm} %", "{:.1f}") for arm in ARMS],
        ("kd_minus_plain", "KD - no teacher (pp)", "{:+.1f}"),
    ]
    return {
        "rows": rows,
        "per_seed": per_seed,
        "table": format_table(rows, columns),
        "seed_table": format_table(per_seed, seed_columns),
    }


def run_experiment(
    recipe=None,
    seeds: tuple[int, ...] = (0, 1, 2),
    *,
    variants: tuple[str, ...] = tuple(VARIANTS),
    workdir: str | None = None,
    progress: bool = False,
    echo: bool = True,
) -> dict[str, Any]:
    """Runs every pipeline for every seed and returns the tables and checks.

    Args:
      recipe: a ``configs/kd_recovery.py`` ``Recipe`` (default: its defaults).
      seeds: one teacher and one pair of fine-tuned models per variant and seed.
      variants: names of ``VARIANTS`` (``prune``, ``quant4``, ``quant2``).
      workdir: where the runs go (one run directory per variant and seed); a finished run
        there is reused, a killed one resumes. ``None``: a temporary directory, deleted after.
      progress: progress bars of the training loops.
      echo: print per-run lines and the tables.

    Returns:
      ``{"recipe", "runs", "rows", "per_seed", "table", "seed_table", "checks", "summary"}``;
      ``checks`` holds ``pruned_stay_zero`` (no weight zeroed by the one-shot prune is
      non-zero after either fine-tuning) and ``same_teacher`` (every variant of a seed trained
      the same teacher: equal test accuracy).

    Raises:
      ValueError: an unknown variant name.
    """
    module = config_module()
    bad = [v for v in variants if v not in VARIANTS and v not in STAGE_VARIANTS]
    if bad:
        raise ValueError(f"variants {bad} are not in {list(VARIANTS) + list(STAGE_VARIANTS)}")
    if recipe is None:  # the cnn1d variants have their own preset
        recipe = module.CNN1D if all(v in STAGE_VARIANTS for v in variants) else module.Recipe()
    with tempfile.TemporaryDirectory(prefix="kd_recovery_") as tmp:
        root = pathlib.Path(workdir or tmp)
        runs = []
        for seed in seeds:
            for variant in variants:
                r = run_pipeline(variant, recipe, seed, root, progress=progress)
                runs.append(r)
                if echo:
                    accs = " ".join(f"{arm} {100 * r[arm]:.1f}" for arm in ARMS)
                    print(
                        f"{variant} seed {seed}: test acc % {accs} ({r['seconds']:.0f}s)",
                        flush=True,
                    )
    out = summarize(runs)
    prune_runs = [r for r in runs if "revived" in r]
    teachers: dict[int, set[float]] = {}
    for r in runs:
        teachers.setdefault(r["seed"], set()).add(r["teacher"])
    checks = {
        "pruned_stay_zero": all(v == 0 for r in prune_runs for v in r["revived"].values()),
        "same_teacher": all(len(v) == 1 for v in teachers.values()),
    }
    lines = []
    for row in out["rows"]:
        lines.append(
            f"{row['variant']}: KD - no teacher = {row['kd_minus_plain']} pp (KD better in {row['kd_wins']} seeds)"
        )
    if prune_runs:
        lines.append(
            f"pruned weights still zero after both fine-tunings: "
            f"{'yes' if checks['pruned_stay_zero'] else 'NO'} "
            f"({prune_runs[0]['pruned_zeros']:,} zeros of {prune_runs[0]['params']:,} params)"
        )
    summary = "\n".join(lines)
    if echo:
        print(out["table"])
        print(out["seed_table"])
        print(summary)
    return {
        "recipe": dataclasses.asdict(recipe),
        "seeds": list(seeds),
        "runs": runs,
        **out,
        "checks": checks,
        "summary": summary,
    }
