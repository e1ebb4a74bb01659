"""Hinton, Vinyals & Dean (2015), Sec. 3 (MNIST), on the shipped 5,000-image MNIST subset.

Three models per seed, all MLPs on flattened 28x28 images:

* **teacher**: a large net regularised with dropout (paper: 2x1200 ReLU units, dropout,
  jittered inputs; 67 test errors on the 10,000 MNIST test images);
* **student**: a smaller net trained alone on the hard labels, without regularisation
  (paper: 2x800 units, 146 errors);
* **distilled**: the same student architecture and initialisation trained on the teacher's
  soft targets at a high temperature (paper: T = 20, 74 errors), mixed with the hard labels.

The teacher's logits on the training set are computed once (``TeacherCache``); there is no
input augmentation here, so that is the same training as running the teacher in every step.

Data: ``research.data.load_dataset("mnist5k", seed=0)`` splits 5,000 images into 3,600 train,
400 validation and 1,000 test images; the split is the same for every seed, so every model is
tested on the same 1,000 images. Error counts are on those 1,000 images; to compare with the
paper's counts on 10,000 images, compare the error **rates**.

Reference: https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from methods.distillation import IndexedBatchSampler
from methods.distillation import build_teacher_cache
from methods.distillation import distill
from research.data import BatchSampler
from research.data import load_dataset
from research.nn import build_model
from research.nn import param_count
from research.report import format_table
from research.train import create_train_state
from research.train import evaluate
from research.train import fit
from research.train import make_train_step
from research.train import state_to_model

PAPER_ERRORS = {"teacher": 67, "student": 146, "distilled": 74}  # of 10,000 MNIST test images
PAPER_TEST_SIZE = 10_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class HintonConfig:
    """Sizes and schedules of the reproduction.

    Attributes:
      teacher_widths: hidden widths of the teacher MLP.
      teacher_dropout: dropout rate after each hidden layer of the teacher.
      student_widths: hidden widths of the student MLP (trained alone and distilled).
      teacher_steps: optimizer steps of the teacher.
      student_steps: optimizer steps of the student and of the distilled student (same budget).
      batch_size: examples per step.
      learning_rate: Adam peak learning rate (cosine decay to 0).
      temperature: distillation temperature.
      alpha: weight of the soft loss (``1 - alpha`` on the hard labels).
      seeds: one teacher, student and distilled student per seed (init, batches, dropout).
      limit: keep at most this many training images (``None`` = all 3,600); for smoke runs.
    """

    teacher_widths: tuple[int, ...] = (1200, 1200)
    teacher_dropout: float = 0.5
    student_widths: tuple[int, ...] = (800, 800)
    teacher_steps: int = 900
    student_steps: int = 700
    batch_size: int = 128
    learning_rate: float = 1e-3
    temperature: float = 20.0
    alpha: float = 0.9
    seeds: tuple[int, ...] = (0, 1, 2)
    limit: int | None = None


def quick_config() -> HintonConfig:
    """A seconds-long smoke configuration (tiny nets, few steps, one seed)."""
    return HintonConfig(
        teacher_widths=(32,),
        student_widths=(8,),
        teacher_steps=10,
        student_steps=10,
        batch_size=64,
        seeds=(0,),
        limit=256,
    )


def _train(model, ds, sampler, steps, lr, transforms=(), progress=False, description="train"):
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    defs, state = create_train_state(model, tx, seed=sampler.seed)
    step = make_train_step(defs, tx, loss_transforms=transforms)
    state, _ = fit(
        state,
        step,
        sampler,
        num_steps=steps,
        log_every=100,
        progress=progress,
        description=description,
    )
    test = evaluate(defs, state.params, state.model_state, ds.x_test, ds.y_test)
    return state_to_model(defs, state), test


def run_seed(cfg: HintonConfig, ds, seed: int, *, progress: bool = False) -> dict[str, Any]:
    """Trains teacher, student and distilled student for one seed; returns their test results."""
    shape, classes = ds.input_shape, ds.num_classes
    bs = min(cfg.batch_size, len(ds.x_train))
    out: dict[str, Any] = {"seed": seed}

    t0 = time.perf_counter()
    teacher = build_model(
        "mlp",
        input_shape=shape,
        num_classes=classes,
        widths=cfg.teacher_widths,
        dropout=cfg.teacher_dropout,
        rngs=nnx.Rngs(seed),
    )
    sampler = BatchSampler(ds.x_train, ds.y_train, batch_size=bs, seed=seed)
    teacher, out["teacher"] = _train(
        teacher,
        ds,
        sampler,
        cfg.teacher_steps,
        cfg.learning_rate,
        progress=progress,
        description=f"teacher s{seed}",
    )
    out["teacher_params"] = param_count(teacher)

    def fresh_student():
        # Same initialisation for the student alone and the distilled student.
        return build_model(
            "mlp",
            input_shape=shape,
            num_classes=classes,
            widths=cfg.student_widths,
            rngs=nnx.Rngs(1000 + seed),
        )

    _, out["student"] = _train(
        fresh_student(),
        ds,
        sampler,
        cfg.student_steps,
        cfg.learning_rate,
        progress=progress,
        description=f"student s{seed}",
    )
    cache = build_teacher_cache(teacher, ds.x_train)
    indexed = IndexedBatchSampler(ds.x_train, ds.y_train, batch_size=bs, seed=seed)
    kd = distill(None, cache, temperature=cfg.temperature, alpha=cfg.alpha)
    student, out["distilled"] = _train(
        fresh_student(),
        ds,
        indexed,
        cfg.student_steps,
        cfg.learning_rate,
        transforms=[kd],
        progress=progress,
        description=f"distilled s{seed}",
    )
    out["student_params"] = param_count(student)
    out["seconds"] = time.perf_counter() - t0
    return out


def run_experiment(cfg: HintonConfig, *, progress: bool = False, echo: bool = True) -> dict[str, Any]:
    """Runs every seed and returns ``{"config", "runs", "rows", "table", "between"}``.

    ``rows`` has one row per model kind with the test errors (count on the test set, mean and
    per seed), the error rate and the paper's figures; ``between`` says whether the distilled
    student's mean error lies between the teacher's (inclusive) and the student-alone's
    (exclusive: a distilled student no better than the student alone does not count).
    """
    ds = load_dataset("mnist5k", seed=0, limit=cfg.limit)
    n_test = len(ds.y_test)
    runs = []
    for seed in cfg.seeds:
        r = run_seed(cfg, ds, seed, progress=progress)
        runs.append(r)
        if echo:
            errs = {k: round((1 - r[k]["accuracy"]) * n_test) for k in PAPER_ERRORS}
            print(f"seed {seed}: test errors {errs} of {n_test} ({r['seconds']:.0f}s)", flush=True)
    rows = []
    for kind, paper in PAPER_ERRORS.items():
        errors = [round((1 - r[kind]["accuracy"]) * n_test) for r in runs]
        mean = statistics.fmean(errors)
        rows.append(
            {
                "model": kind,
                "params": runs[0]["teacher_params" if kind == "teacher" else "student_params"],
                "errors": mean,
                "errors_sd": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                "per_seed": " ".join(str(e) for e in errors),
                "error_rate_pct": 100.0 * mean / n_test,
                "paper_errors": paper,
                "paper_rate_pct": 100.0 * paper / PAPER_TEST_SIZE,
            }
        )
    by = {r["model"]: r["errors"] for r in rows}
    # "Between": no better than the teacher, strictly better than the student trained alone.
    between = by["teacher"] <= by["distilled"] < by["student"]
    columns = [
        ("model", "model", "{}"),
        ("params", "params", "{:,}"),
        ("errors", f"errors/{n_test}", "{:.1f}"),
        ("errors_sd", "sd", "{:.1f}"),
        ("per_seed", "per seed", "{}"),
        ("error_rate_pct", "error %", "{:.2f}"),
        ("paper_errors", f"paper errors/{PAPER_TEST_SIZE}", "{}"),
        ("paper_rate_pct", "paper error %", "{:.2f}"),
    ]
    table = format_table(rows, columns)
    summary = (
        f"distilled student between teacher and student alone: {'yes' if between else 'NO'} "
        f"(teacher {by['teacher']:.1f}, distilled {by['distilled']:.1f}, student {by['student']:.1f} "
        f"errors of {n_test}; T={cfg.temperature}, alpha={cfg.alpha}, seeds {list(cfg.seeds)})"
    )
    if echo:
        print(table)
        print(summary)
    return {
        "config": dataclasses.asdict(cfg),
        "test_size": n_test,
        "runs": jax.tree.map(lambda x: float(x) if isinstance(x, (np.floating, float)) else x, runs),
        "rows": rows,
        "table": table,
        "summary": summary,
        "between": between,
    }
