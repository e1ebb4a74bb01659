"""The ``distill`` stage: train a student against a teacher from an earlier stage or run.

Example config stages::

    stages=(
        TrainStage(steps=500),                                  # 0_train: the teacher
        PruneStage(...),                                        # the student: the pruned model
        DistillStage(teacher="0_train", temperature=4.0, train=TrainStage(steps=300)),
    )

The teacher is ``bundle.models[teacher]`` (a stage label such as ``"0_train"`` or a kind such
as ``"train"``, the latest stage of that kind), or the final model of a finished run directory
(``teacher_run``). The student is the current model (pruned, factorized or fake-quant ones
included), a model of an earlier stage (``student``), or a fresh zoo model
(``student_model``). With ``keep_zeros`` every kernel weight that is exactly zero when the
stage starts stays zero, so a pruned student keeps its sparsity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar
from typing import Literal

import optax
from flax import nnx

from methods.distillation.hints import unwrap_student
from methods.distillation.hints import with_hints
from methods.distillation.teacher import IndexedBatchSampler
from methods.distillation.teacher import build_teacher_cache
from methods.distillation.transforms import attention_term
from methods.distillation.transforms import dkd_term
from methods.distillation.transforms import fitnets_term
from methods.distillation.transforms import hinton_term
from methods.distillation.transforms import rkd_angle_term
from methods.distillation.transforms import rkd_distance_term
from methods.distillation.transforms import weighted_sum
from methods.pruning.masks import nonzero_masks
from methods.pruning.wrapper import masked
from research import recipe as recipe_lib
from research.config import Check
from research.config import ConfigError
from research.config import EarlierStage
from research.config import ExistingDir
from research.config import OneOf
from research.config import Range
from research.config import ValidationContext
from research.config import fraction
from research.config import nonnegative
from research.nn import copy_model
from research.nn import list_models
from research.nn import model_kwargs
from research.stages import Bundle
from research.stages import StageConfig
from research.stages import StageContext
from research.stages import StageResult
from research.stages import TrainStage
from research.stages import accuracy
from research.stages import finetune
from research.stages import register_stage
from research.stages import train_kwargs
from research.train import read_metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillStage(StageConfig):
    """Knowledge distillation from a teacher model into the student.

    Attributes:
      teacher: key of ``bundle.models`` (stage label like ``"0_train"`` or a kind like ``"train"``).
      teacher_run: a finished run directory whose final model is the teacher (overrides ``teacher``).
      student: ``""`` for the current model, or a key of ``bundle.models``.
      student_model: a zoo model name to build a fresh student (overrides ``student``).
      student_options: keyword options of ``student_model`` (e.g. ``{"widths": [64]}``).
      loss: the logit loss, ``"hinton"`` (``(1-alpha) CE + alpha T^2 KL``) or ``"dkd"``
        (``CE + alpha' TCKD + beta NCKD`` with ``dkd_alpha``, ``dkd_beta``).
      temperature: softening temperature.
      alpha: weight of the Hinton soft loss (``1 - alpha`` on the hard labels).
      dkd_alpha, dkd_beta: DKD's weights.
      hints: FitNets ``(student_path, teacher_path)`` pairs (learned projections are added and
        dropped after the stage); ``hint_weight`` their weight.
      attention: attention-transfer ``(student_path, teacher_path)`` pairs; ``attention_weight``
        is ``beta / 2``.
      rkd_distance_weight, rkd_angle_weight: relational KD on the logits (0 = off).
      cache_teacher: compute the teacher outputs on the training set once and look them up by
        index (no augmentation happens in this stage, so this gives the same training).
      keep_zeros: kernel weights that are exactly zero at the start stay zero (pruned students).
      train: the training schedule (steps, learning rate, optimizer...).
    """

    kind: ClassVar[str] = "distill"
    checks: ClassVar[Mapping[str, Check]] = {
        "teacher_run": ExistingDir(),
        "student": EarlierStage(also=("",)),
        "student_model": OneOf(list_models, "model", also=("",)),
        "temperature": Range(lo=0, lo_open=True, hint="e.g. 4.0"),
        "alpha": fraction,
        "dkd_alpha": nonnegative,
        "dkd_beta": nonnegative,
        "hint_weight": nonnegative,
        "attention_weight": nonnegative,
        "rkd_distance_weight": nonnegative,
        "rkd_angle_weight": nonnegative,
    }
    teacher: str = "train"
    teacher_run: str = ""
    student: str = ""
    student_model: str = ""
    student_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss: Literal["hinton", "dkd"] = "hinton"
    temperature: float = 4.0
    alpha: float = 0.9
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    hints: tuple[tuple[str, str], ...] = ()
    hint_weight: float = 1.0
    attention: tuple[tuple[str, str], ...] = ()
    attention_weight: float = 500.0
    rkd_distance_weight: float = 0.0
    rkd_angle_weight: float = 0.0
    cache_teacher: bool = True
    keep_zeros: bool = True
    train: TrainStage = dataclasses.field(default_factory=lambda: TrainStage(steps=300, eval_every=100))

    def check(self, key: str, context: ValidationContext) -> None:
        if not self.teacher_run:  # a teacher_run replaces the teacher stage
            if not self.teacher:
                raise ConfigError(f"{key}.teacher is empty; name an earlier stage (e.g. 'train') or set teacher_run")
            EarlierStage(also=()).check(self.teacher, f"{key}.teacher", context)
        if self.student_options and not self.student_model:
            raise ConfigError(f"{key}.student_options needs {key}.student_model (the zoo model they configure)")
        if self.student_model:
            valid = model_kwargs(self.student_model)
            bad = sorted(set(self.student_options) - set(valid))
            if bad:
                raise ConfigError(
                    f"{key}.student_options {bad} are not options of model {self.student_model!r}; "
                    f"valid keys: {sorted(valid)}"
                )


def keep_zeros(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps ``tx`` so that kernel entries (``ndim >= 2``) that are zero at ``init`` stay zero.

    This is :func:`methods.pruning.masked` with fixed masks taken from the params at ``init``
    (:func:`methods.pruning.masks.nonzero_masks`): the masks live in the optimizer state
    (checkpointed with it). Vectors (biases, norms) are never masked: a fresh layer's
    zero-initialised bias must still train.
    """
    return masked(tx, masks=nonzero_masks)


def _lookup(models: Mapping[str, nnx.Module], key: str, role: str) -> nnx.Module:
    if key not in models:
        raise KeyError(
            f"DistillStage.{role}={key!r} is not a finished stage; available: {sorted(models)} "
            "(a stage label like '0_train' or a kind like 'train')"
        )
    return models[key]


def resolve_teacher(bundle: Bundle, cfg: DistillStage) -> nnx.Module:
    """The teacher model named by ``cfg`` (from ``bundle.models`` or a finished run).

    A ``teacher_run`` directory's final model is rebuilt from its stored recipe and arrays
    (:func:`research.run.load_run`); nothing in the directory is executed.
    """
    if cfg.teacher_run:
        from research.run import load_run

        return load_run(cfg.teacher_run)[1]
    return _lookup(bundle.models, cfg.teacher, "teacher")


def resolve_student(bundle: Bundle, cfg: DistillStage, seed: int) -> nnx.Module:
    """The student model named by ``cfg`` (current, earlier stage, or a fresh zoo model)."""
    if cfg.student_model:
        from research.nn import build_model

        ds = bundle.dataset
        return build_model(
            cfg.student_model,
            input_shape=ds.input_shape,
            num_classes=ds.num_classes,
            rngs=nnx.Rngs(seed),
            **dict(cfg.student_options),
        )
    return _lookup(bundle.models, cfg.student, "student") if cfg.student else bundle.model


def student_recipe(bundle: Bundle, cfg: DistillStage, seed: int) -> tuple[dict, ...]:
    """The :mod:`research.recipe` of the student :func:`resolve_student` returns.

    A fresh zoo student starts a new recipe; an earlier stage's model brings its own (from
    ``bundle.recipes``); the current model keeps ``bundle.recipe``. FitNets projections are
    dropped after the stage, so distillation adds no step.
    """
    if cfg.student_model:
        ds = bundle.dataset
        return (
            recipe_lib.zoo_step(cfg.student_model, dict(cfg.student_options), ds.input_shape, ds.num_classes, seed),
        )
    if cfg.student:
        return bundle.recipes.get(cfg.student, ())
    return bundle.recipe


@register_stage(DistillStage)
def run_distill(bundle: Bundle, cfg: DistillStage, ctx: StageContext) -> StageResult:
    """Distils ``resolve_teacher`` into ``resolve_student`` with the configured KD terms."""
    cfg.validate()
    teacher = resolve_teacher(bundle, cfg)
    student = copy_model(resolve_student(bundle, cfg, ctx.seed))
    ds = bundle.dataset
    teacher_accuracy = accuracy(teacher, ds.x_test, ds.y_test)
    notes: list[str] = []

    if cfg.loss == "hinton":
        terms, hard_weight = [(cfg.alpha, hinton_term(cfg.temperature))], 1.0 - cfg.alpha
    else:
        terms, hard_weight = [(1.0, dkd_term(cfg.dkd_alpha, cfg.dkd_beta, cfg.temperature))], 1.0
    if cfg.hints:
        terms.append((cfg.hint_weight, fitnets_term(cfg.hints)))
        student = with_hints(student, teacher, cfg.hints, ds.x_train[:2], rngs=nnx.Rngs(ctx.seed + 1))
        notes.append(f"FitNets projections for {len(cfg.hints)} hint pair(s) trained and dropped after the stage")
    if cfg.attention:
        terms.append((cfg.attention_weight, attention_term(cfg.attention)))
    if cfg.rkd_distance_weight:
        terms.append((cfg.rkd_distance_weight, rkd_distance_term()))
    if cfg.rkd_angle_weight:
        terms.append((cfg.rkd_angle_weight, rkd_angle_term()))

    kwargs = train_kwargs(cfg.train)
    sampler = None
    if cfg.cache_teacher:
        teacher_paths = tuple(dict.fromkeys(p for _, t in terms for p in t.teacher_paths))
        teacher_fn = build_teacher_cache(teacher, ds.x_train, feature_paths=teacher_paths)
        sampler = IndexedBatchSampler(
            ds.x_train,
            ds.y_train,
            batch_size=min(cfg.train.batch_size, len(ds.x_train)),
            seed=ctx.seed,
        )
        notes.append(f"teacher outputs cached once for {len(teacher_fn)} training examples")
    else:
        teacher_fn = teacher
        notes.append("teacher run online in every step")

    transform = weighted_sum(None, teacher_fn, terms, hard_weight=hard_weight)
    model, records = finetune(
        student,
        ds,
        ctx,
        loss_transforms=[transform],
        wrap_tx=keep_zeros if cfg.keep_zeros else None,
        sampler=sampler,
        description=f"{ctx.label} (distill)",
        **kwargs,
    )
    model = unwrap_student(model)
    train_rows = [r for r in records if r.get("split") == "train"]
    # A resumed stage logged its earlier steps in an earlier call: the last losses are in the file.
    train_rows = train_rows or [r for r in read_metrics(ctx.workdir) if r.get("split") == "train"]
    metrics = {"teacher_test_accuracy": teacher_accuracy}
    if train_rows:
        last = train_rows[-1]
        metrics.update(
            {
                k if k == "hard_loss" else k.replace("/", "_"): v
                for k, v in last.items()
                if k.startswith(("kd/", "hard_loss"))
            }
        )
        metrics["final_train_loss"] = last["loss"]
    recipe = student_recipe(bundle, cfg, ctx.seed)
    return StageResult(bundle=dataclasses.replace(bundle, model=model, recipe=recipe), metrics=metrics, notes=notes)
