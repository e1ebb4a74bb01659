"""The one fine-tuning loop every stage uses, and the optimizer it builds.

:func:`finetune` takes plain arguments (a model, a data set, a directory, a seed), so a stage, an
experiment script or a notebook calls it the same way; stages pass their ``StageContext``'s
``workdir``/``seed``/``progress`` and their ``TrainStage`` (``research.stages.train_kwargs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import optax
from flax import nnx

from research.data import BatchSampler
from research.data import Dataset
from research.train.data_parallel import data_parallel_step
from research.train.loop import default_block_steps
from research.train.loop import fit
from research.train.losses import LossFn
from research.train.losses import LossTransform
from research.train.losses import cross_entropy_loss
from research.train.state import create_train_state
from research.train.state import state_to_model
from research.train.step import evaluate
from research.train.step import make_eval_step
from research.train.step import make_train_step


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

    Args:
      steps: the number of optimizer steps (the length of the cosine schedule).
      learning_rate: the peak learning rate (> 0).
      optimizer: ``adam``, ``adamw`` or ``sgd`` (Nesterov momentum ``momentum``).
      weight_decay: decoupled (adamw) or L2-style (sgd) weight decay.
      schedule: ``cosine`` (decay to 0 after ``warmup_steps``) or ``constant``.
      warmup_steps: linear warm-up steps of the cosine schedule.
      momentum: the sgd momentum.
      grad_clip: global-norm clipping threshold (0 = off).

    Returns:
      The optimizer; its learning rate and weight decay are values in its state.

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


def optimizer_key(settings: Mapping[str, Any]) -> tuple:
    """What ``make_optimizer(**settings)`` bakes into a compiled train step.

    Every setting but the learning rate and adamw's weight decay, which are values in the optimizer
    state: two optimizers with equal keys run the same program (a ``cache_key`` part for
    :func:`research.train.make_train_step`).
    """
    skip = {"learning_rate"} | ({"weight_decay"} if settings.get("optimizer", "adam") == "adamw" else set())
    return ("make_optimizer", tuple(sorted((k, v) for k, v in settings.items() if k not in skip)))


def finetune(
    model: nnx.Module,
    dataset: Dataset,
    *,
    workdir: str | os.PathLike,
    steps: int,
    learning_rate: float,
    seed: int = 0,
    progress: bool = True,
    description: str | None = None,
    batch_size: int = 128,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
    loss_fn: LossFn | None = None,
    loss_transforms: Sequence[LossTransform] = (),
    wrap_tx: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = None,
    step_key: Hashable | None = None,
    checkpoint_every: int = 100,
    eval_every: int = 0,
    log_every: int = 10,
    sampler: BatchSampler | None = None,
    return_state: bool = False,
    data_parallel: bool = False,
):
    """Trains ``model`` on ``dataset``'s training split with checkpoints under ``workdir``.

    A killed call started again with the same arguments resumes from the last checkpoint
    (``workdir / "checkpoints"``); the loss and validation accuracy go to ``workdir / "metrics.jsonl"``.

    Args:
      model: the model to train (not modified; a trained copy is returned).
      dataset: the data; validation accuracy is logged every ``eval_every`` steps and at the end.
      workdir: the directory of the checkpoints and ``metrics.jsonl`` (a stage passes ``ctx.workdir``).
      steps, learning_rate, optimizer, weight_decay, schedule, warmup_steps, grad_clip:
        see :func:`make_optimizer`.
      seed: seeds the training state and the batch order.
      progress: show a progress bar.
      description: the progress bar's label (default: the directory's name).
      batch_size: examples per step (clamped to the training-set size).
      loss_fn: the task loss (default cross-entropy).
      loss_transforms: e.g. knowledge distillation; applied in order.
      wrap_tx: wraps the optimizer, e.g. a pruning mask wrapper.
      step_key: what ``wrap_tx`` and ``loss_transforms`` bake into the compiled step (their
        structure and constants, not the values they keep in the optimizer state), hashable. Calls
        whose optimizer settings (but the learning rate and adamw's weight decay), ``step_key``,
        model graph and ``loss_fn`` agree share one jitted step, so the trials of a study compile
        it once (:func:`research.train.make_train_step`'s ``cache_key``). Without ``wrap_tx`` and
        ``loss_transforms`` it may stay ``None``; with either and ``step_key=None`` the step is
        jitted anew (compiled again, or loaded from the persistent compilation cache).
      checkpoint_every, eval_every, log_every: loop cadence in steps (0 = only at the end).
      sampler: a custom batch sampler (default: shuffled batches of the training split).
      return_state: also return ``(defs, state)`` (e.g. to read masks from the optimizer state).
      data_parallel: shard each batch over the local devices, state replicated
        (:mod:`research.train.data_parallel`).

    Returns:
      ``(trained_model, records)`` or ``(trained_model, records, (defs, state))``.

    Raises:
      ValueError: ``steps`` not positive, or an invalid optimizer setting (see :func:`make_optimizer`).
    """
    if steps <= 0:
        raise ValueError(f"steps={steps} must be positive")
    settings = {
        "steps": steps,
        "learning_rate": learning_rate,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "warmup_steps": warmup_steps,
        "grad_clip": grad_clip,
    }
    tx = make_optimizer(**settings)
    if wrap_tx is not None:
        tx = wrap_tx(tx)
    defs, state = create_train_state(nnx.clone(model), tx, seed=seed)
    cache_key = None
    if step_key is not None or (wrap_tx is None and not loss_transforms):
        cache_key = (optimizer_key(settings), step_key)
    step_fn = make_train_step(defs, tx, loss_fn or cross_entropy_loss, loss_transforms, cache_key=cache_key)
    if data_parallel:
        step_fn = data_parallel_step(step_fn, min(batch_size, len(dataset.x_train)))
    if sampler is None:
        sampler = BatchSampler(
            dataset.x_train, dataset.y_train, batch_size=min(batch_size, len(dataset.x_train)), seed=seed
        )
    eval_step = make_eval_step(defs)

    def eval_fn(s):
        return evaluate(defs, s.params, s.model_state, dataset.x_val, dataset.y_val, eval_step=eval_step)

    state, records = fit(
        state,
        step_fn,
        sampler,
        num_steps=steps,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        eval_every=eval_every,
        eval_fn=eval_fn if len(dataset.x_val) else None,
        progress=progress,
        description=description or os.path.basename(os.fspath(workdir)),
        block_steps=1 if data_parallel else default_block_steps(),
    )
    trained = state_to_model(defs, state)
    if return_state:
        return trained, records, (defs, state)
    return trained, records
