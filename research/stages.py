"""Stages: the steps of an experiment (train, prune, distill, quantize, export...).

A stage is a frozen keyword-only config dataclass (a :class:`StageConfig` subclass with a
``kind``) plus a run function registered for it::

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class PruneStage(StageConfig):
        kind: ClassVar[str] = "prune"
        sparsity: float = 0.9

    @register_stage(PruneStage)
    def run_prune(bundle: Bundle, cfg: PruneStage, ctx: StageContext) -> StageResult: ...

Each stage takes the :class:`Bundle` left by the previous one and returns a
:class:`StageResult`; the runner (``research.run``) measures the model after every stage and
checkpoints it so a killed run resumes from the last finished stage. Methods never copy the
training loop: they call :func:`finetune` with their loss transforms and optimizer wrapper.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import ClassVar
from typing import Literal

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research import metrics as _metrics
from research.config import Check
from research.config import ConfigError
from research.config import Range
from research.config import ValidationContext
from research.config import at_least_one
from research.config import nonnegative
from research.config import positive
from research.config import validate_fields
from research.data import BatchSampler
from research.data import Dataset
from research.train import LossFn
from research.train import LossTransform
from research.train import create_train_state
from research.train import cross_entropy_loss
from research.train import evaluate
from research.train import fit
from research.train import make_eval_step
from research.train import make_train_step
from research.train import read_metrics
from research.train import split_model
from research.train import state_to_model


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Base class of stage configs. Subclasses set ``kind`` and add typed fields.

    Every field is validated before anything trains (:func:`research.config.validate`): its
    value against its type annotation (Literals included), then against the class's
    ``checks`` (``{"steps": Range(lo=1), "scorer": OneOf(list_scorers, "pruning scorer")}``,
    see :class:`research.config.Check`), then the class's :meth:`check` hook does the checks
    that involve several fields. Errors name the dotted key (``stages.prune.learning_rate``).
    """

    kind: ClassVar[str] = ""
    checks: ClassVar[Mapping[str, Check]] = {}

    def validate(self, key: str = "", context: ValidationContext | None = None) -> None:
        """Checks every field (see the class docstring).

        Args:
          key: the dotted key of this stage in its config (default: its ``kind``).
          context: the earlier stages (default unknown: references to them are not checked).

        Raises:
          research.config.ConfigError: naming ``key.field`` and the valid values.
        """
        validate_fields(self, key or self.kind, context)

    def check(self, key: str, context: ValidationContext) -> None:
        """Checks that involve several fields; override and raise ``ConfigError(f"{key}.field=...")``."""


@dataclasses.dataclass
class Bundle:
    """What flows from stage to stage.

    Attributes:
      model: the current model.
      dataset: the run's data set.
      seed: the run's seed.
      models: the model after each finished stage, by label (``"0_train"``) and by kind (``"train"``,
        the latest stage of that kind), e.g. a distillation teacher.
      extras: method-specific carry-over (``"masks"``, ``"quant_params"``, ...); stored as data
        (arrays, numbers, strings, lists, dicts) with each finished stage.
      recipe: the structural steps that rebuild ``model`` from the base config
        (:mod:`research.recipe`); a stage that changes the structure appends its step.
      recipes: the recipe of each model in ``models``, by the same keys.
    """

    model: nnx.Module
    dataset: Dataset
    seed: int = 0
    models: dict[str, nnx.Module] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: tuple[dict[str, Any], ...] = ()
    recipes: dict[str, tuple[dict[str, Any], ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageContext:
    """Where and how a stage runs: its index, label, own directory, seed and progress display."""

    index: int
    label: str
    workdir: pathlib.Path
    seed: int = 0
    progress: bool = True


@dataclasses.dataclass
class StageResult:
    """A stage's output: the new bundle and what goes into the report."""

    bundle: Bundle
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    tables: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    artifacts: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


StageFn = Callable[[Bundle, Any, StageContext], StageResult]
_STAGES: dict[str, tuple[type, StageFn]] = {}


def register_stage(config_cls: type[StageConfig]) -> Callable[[StageFn], StageFn]:
    """Registers the run function of a stage config class under ``config_cls.kind``.

    Raises:
      ValueError: empty ``kind`` or a kind that is already registered.
    """
    kind = getattr(config_cls, "kind", "")
    if not kind:
        raise ValueError(f"{config_cls.__name__} needs a class attribute kind: ClassVar[str] = '...'")

    def deco(fn: StageFn) -> StageFn:
        if kind in _STAGES:
            raise ValueError(f"stage kind {kind!r} is already registered by {_STAGES[kind][0].__name__}")
        _STAGES[kind] = (config_cls, fn)
        return fn

    return deco


def list_stages() -> list[str]:
    """Registered stage kinds (after importing ``methods`` to register theirs)."""
    return sorted(_STAGES)


def get_stage(kind: str) -> tuple[type, StageFn]:
    """``(config_cls, run_fn)`` of a registered kind.

    Raises:
      KeyError: unknown kind (lists the registered ones).
    """
    if kind not in _STAGES:
        raise KeyError(f"unknown stage kind {kind!r}; registered: {list_stages()}")
    return _STAGES[kind]


# ----------------------------------------------------------------------------- shared helpers


def make_optimizer(
    *,
    steps: int,
    learning_rate: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    momentum: float = 0.9,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """An optax optimizer with a learning-rate schedule and optional clipping.

    Raises:
      ValueError: unknown optimizer or schedule name, non-positive learning rate.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate={learning_rate} must be positive")
    # The schedule's shape is a constant of the compiled step; the learning rate and weight decay
    # are values in the optimizer state (optax.inject_hyperparams), so runs that differ only in
    # them (the trials of `slimjax tune`) share one compiled program (persistent compilation cache).
    schedules = {
        "constant": lambda: optax.constant_schedule(1.0),
        "cosine": lambda: optax.warmup_cosine_decay_schedule(
            0.0 if warmup_steps else 1.0, 1.0, warmup_steps, max(steps, warmup_steps + 1)
        ),
    }
    if schedule not in schedules:
        raise ValueError(f"schedule={schedule!r} is not one of {sorted(schedules)}")
    unit = optax.scale_by_schedule(schedules[schedule]())
    lr = optax.inject_hyperparams(optax.scale)(step_size=-learning_rate)
    optimizers = {
        "adam": lambda: optax.chain(optax.scale_by_adam(), unit, lr),
        "adamw": lambda: optax.chain(
            optax.scale_by_adam(),
            optax.inject_hyperparams(optax.add_decayed_weights)(weight_decay=weight_decay),
            unit,
            lr,
        ),
        "sgd": lambda: optax.chain(optax.trace(decay=momentum, nesterov=True), unit, lr),
    }
    if optimizer not in optimizers:
        raise ValueError(f"optimizer={optimizer!r} is not one of {sorted(optimizers)}")
    tx = optimizers[optimizer]()
    if weight_decay and optimizer == "sgd":
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    if grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx


def finetune(
    model: nnx.Module,
    dataset: Dataset,
    ctx: StageContext,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int = 128,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
    loss_fn: LossFn | None = None,
    loss_transforms: Sequence[LossTransform] = (),
    wrap_tx: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = None,
    checkpoint_every: int = 100,
    eval_every: int = 0,
    log_every: int = 10,
    sampler: BatchSampler | None = None,
    return_state: bool = False,
    description: str | None = None,
    data_parallel: bool = False,
):
    """Trains ``model`` on ``dataset``'s training split with checkpoints under ``ctx.workdir``.

    This is the one training loop every stage uses; a killed stage resumes from its last
    checkpoint (``ctx.workdir / "checkpoints"``) and writes ``ctx.workdir / "metrics.jsonl"``.

    Args:
      model: the model to train (not modified; a trained copy is returned).
      dataset: the data; validation accuracy is logged every ``eval_every`` steps and at the end.
      ctx: the stage context (directory, seed, progress).
      steps, learning_rate, batch_size, optimizer, weight_decay, schedule, warmup_steps, grad_clip:
        see :func:`make_optimizer`.
      loss_fn: the task loss (default cross-entropy).
      loss_transforms: e.g. knowledge distillation; applied in order.
      wrap_tx: wraps the optimizer, e.g. a pruning mask wrapper.
      sampler: a custom batch sampler (default: shuffled batches of the training split).
      return_state: also return ``(defs, state)`` (e.g. to read masks from the optimizer state).
      data_parallel: shard each batch over the local devices, state replicated
        (:mod:`research.population.data_parallel`).

    Returns:
      ``(trained_model, records)`` or ``(trained_model, records, (defs, state))``.
    """
    if steps <= 0:
        raise ValueError(f"steps={steps} must be positive")
    tx = make_optimizer(
        steps=steps,
        learning_rate=learning_rate,
        optimizer=optimizer,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
    )
    if wrap_tx is not None:
        tx = wrap_tx(tx)
    defs, state = create_train_state(nnx.clone(model), tx, seed=ctx.seed)
    step_fn = make_train_step(defs, tx, loss_fn or cross_entropy_loss, loss_transforms)
    if data_parallel:
        from research.population.data_parallel import data_parallel_step

        step_fn = data_parallel_step(step_fn, min(batch_size, len(dataset.x_train)))
    if sampler is None:
        sampler = BatchSampler(
            dataset.x_train, dataset.y_train, batch_size=min(batch_size, len(dataset.x_train)), seed=ctx.seed
        )
    eval_step = make_eval_step(defs)

    def eval_fn(s):
        return evaluate(defs, s.params, s.model_state, dataset.x_val, dataset.y_val, eval_step=eval_step)

    state, records = fit(
        state,
        step_fn,
        sampler,
        num_steps=steps,
        workdir=ctx.workdir,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        eval_every=eval_every,
        eval_fn=eval_fn if len(dataset.x_val) else None,
        progress=ctx.progress,
        description=description or ctx.label,
    )
    trained = state_to_model(defs, state)
    if return_state:
        return trained, records, (defs, state)
    return trained, records


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (evaluation mode) on ``(x, y)``."""
    defs, params, model_state = split_model(nnx.clone(model))
    return evaluate(defs, params, model_state, x, y, batch_size=batch_size)["accuracy"]


def measure(
    model: nnx.Module, dataset: Dataset, *, latency_batch_size: int = 1, latency_repeats: int = 20
) -> dict[str, float]:
    """The standard report columns for a model.

    Returns:
      ``test_accuracy``, ``val_accuracy``, ``params``, ``nonzeros``, ``bytes_fp32``,
      ``flops`` (one forward pass of one example, XLA cost analysis) and ``latency_ms``
      (median forward latency at ``latency_batch_size``).
    """
    model = nnx.clone(model)
    model.eval()
    sample = jnp.asarray(dataset.x_test[:1])
    batch = jnp.asarray(np.repeat(dataset.x_test[:1], latency_batch_size, axis=0))
    out = {
        "test_accuracy": accuracy(model, dataset.x_test, dataset.y_test),
        "val_accuracy": accuracy(model, dataset.x_val, dataset.y_val) if len(dataset.x_val) else float("nan"),
        "params": _metrics.count_params(model),
        "nonzeros": _metrics.count_nonzeros(model),
        "bytes_fp32": _metrics.model_bytes(model, 32),
        "flops": _metrics.flops(model, sample),
        "latency_ms": 1e3 * _metrics.model_latency(model, batch, repeats=latency_repeats)["median"],
    }
    return out


# ----------------------------------------------------------------------------- the train stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainStage(StageConfig):
    """Train the current model from its current weights.

    Attributes:
      steps: optimizer steps.
      learning_rate: peak learning rate.
      batch_size: examples per step (clamped to the training-set size).
      optimizer: ``adam``, ``adamw`` or ``sgd`` (Nesterov momentum).
      weight_decay: decoupled (adamw) or L2-style (sgd) weight decay.
      schedule: ``cosine`` (decay to 0, after ``warmup_steps``) or ``constant``.
      grad_clip: global-norm clipping threshold (0 = off).
      checkpoint_every, eval_every, log_every: loop cadence in steps.
      data_parallel: shard each batch over the local devices (parameters replicated); the batch
        size must be a multiple of the device count.
    """

    kind: ClassVar[str] = "train"
    checks: ClassVar[Mapping[str, Check]] = {
        "steps": at_least_one,
        "learning_rate": positive,
        "batch_size": at_least_one,
        "weight_decay": nonnegative,
        "warmup_steps": nonnegative,
        "grad_clip": Range(lo=0, hint="0 turns clipping off"),
        "checkpoint_every": Range(lo=0, hint="0 saves only at the end"),
        "eval_every": Range(lo=0, hint="0 evaluates only at the end"),
        "log_every": Range(lo=0, hint="0 records only the end"),
    }
    steps: int = 500
    learning_rate: float = 1e-3
    batch_size: int = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 0.0
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    data_parallel: bool = False

    def check(self, key: str, context: ValidationContext) -> None:
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"{key}.warmup_steps={self.warmup_steps} is more than {key}.steps={self.steps}: the learning "
                "rate would never reach its peak; lower warmup_steps"
            )


def train_kwargs(cfg: TrainStage) -> dict[str, Any]:
    """The :func:`finetune` keyword arguments of a :class:`TrainStage` (methods embed one)."""
    return {
        "steps": cfg.steps,
        "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "weight_decay": cfg.weight_decay,
        "schedule": cfg.schedule,
        "warmup_steps": cfg.warmup_steps,
        "grad_clip": cfg.grad_clip,
        "checkpoint_every": cfg.checkpoint_every,
        "eval_every": cfg.eval_every,
        "log_every": cfg.log_every,
        "data_parallel": cfg.data_parallel,
    }


@register_stage(TrainStage)
def run_train(bundle: Bundle, cfg: TrainStage, ctx: StageContext) -> StageResult:
    """Trains ``bundle.model`` with the task loss."""
    t0 = time.perf_counter()
    model, records = finetune(bundle.model, bundle.dataset, ctx, **train_kwargs(cfg))
    seconds = time.perf_counter() - t0
    train_rows = [r for r in records if r.get("split") == "train"]
    out = {}
    # A resumed stage logged its earlier steps in an earlier call: the last loss is in the file.
    logged = [r for r in read_metrics(ctx.workdir) if r.get("split") == "train"] or train_rows
    if logged:
        out["final_train_loss"] = logged[-1]["loss"]
    if train_rows:
        # Throughput over the steps this call ran, compilation and evaluation included.
        out["train_steps_per_s"] = len(train_rows) / seconds
        out["train_examples_per_s"] = len(train_rows) * min(cfg.batch_size, len(bundle.dataset.x_train)) / seconds
    return StageResult(bundle=dataclasses.replace(bundle, model=model), metrics=out)
