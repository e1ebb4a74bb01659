"""The ``distill`` stage, and the distillation every fine-tuning stage's ``train.teacher`` uses.

The config class is :class:`methods.distillation.config.DistillStage` (standard library only).
This module registers the stage and the KD backend of :mod:`research.teacher`: one
implementation builds the KD loss (registered terms with weights), caches the teacher's outputs
and wraps the student for terms that train extra modules (FitNets projections), whether the
teacher was named by a ``distill`` stage or by the ``train.teacher`` of ``train``, ``prune``,
``qat`` or ``decompose`` (:func:`research.stages.fine_tune` calls it).

The teacher is ``bundle.models[teacher]`` (a stage label such as ``"0_train"`` or a kind such
as ``"train"``, the latest stage of that kind), or the final model of a finished run directory
(``teacher_run``). The student is the current model (pruned, factorized or fake-quant ones
included), a model of an earlier stage (``student``), or a fresh zoo model
(``student_model``). The student's constraints (a pruned student's zeros) are kept unless
``train.keep_constraints=False``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import optax
from flax import nnx

from methods.distillation.config import DistillStage
from methods.distillation.config import KDTermConfig
from methods.distillation.hints import HintedStudent
from methods.distillation.hints import unwrap_student
from methods.distillation.teacher import IndexedBatchSampler
from methods.distillation.teacher import build_teacher_cache
from methods.distillation.transforms import kd_batch_loss
from methods.distillation.transforms import list_kd_terms
from methods.distillation.transforms import make_kd_term
from methods.distillation.transforms import weighted_sum
from methods.pruning.masks import nonzero_masks
from methods.pruning.wrapper import masked
from research import recipe as recipe_lib
from research.metrics import accuracy
from research.nn import copy_model
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import fine_tune
from research.stages import register_stage
from research.stages import resolve_teacher as _resolve_teacher
from research.teacher import KDSetup
from research.teacher import TeacherConfig
from research.teacher import register_kd_backend

__all__ = [
    "DistillStage",
    "KDTermConfig",
    "keep_zeros",
    "resolve_student",
    "resolve_teacher",
    "run_distill",
    "student_recipe",
]


class DistillationBackend:
    """The KD backend of :mod:`research.teacher`: builds the loss of a :class:`TeacherConfig`."""

    def term_names(self) -> list[str]:
        """The registered KD terms."""
        return list_kd_terms()

    def build_term(self, name: str, options: Mapping[str, Any]):
        """``make_kd_term(name, **options)`` (raises ``TypeError``/``ValueError`` for bad options)."""
        return make_kd_term(name, **dict(options))

    def setup(
        self, teacher: nnx.Module, cfg: TeacherConfig, student: nnx.Module, dataset, *, batch_size: int, seed: int
    ):
        """The student (wrapped if a term trains extra modules), the KD loss transform and its sampler."""
        notes: list[str] = []
        terms = [(t.weight, self.build_term(t.name, t.options)) for t in cfg.terms]
        student = copy_model(student)
        wrapped = False
        for _, term in terms:
            if term.prepare is not None:  # e.g. FitNets: projections, trained and dropped after the stage
                student = term.prepare(student, teacher, dataset.x_train[:2], nnx.Rngs(seed + 1))
                wrapped = True
                notes.append(f"{term.name}: modules added to the student for training and dropped after the stage")
        sampler = None
        if cfg.cache:
            teacher_paths = tuple(dict.fromkeys(p for _, t in terms for p in t.teacher_paths))
            teacher_fn = build_teacher_cache(teacher, dataset.x_train, feature_paths=teacher_paths)
            sampler = IndexedBatchSampler(dataset.x_train, dataset.y_train, batch_size=batch_size, seed=seed)
            notes.append(f"teacher outputs cached once for {len(teacher_fn)} training examples")
        else:
            teacher_fn = teacher
            notes.append("teacher run online in every step")
        metrics = {"teacher_test_accuracy": accuracy(teacher, dataset.x_test, dataset.y_test)}
        transform = weighted_sum(None, teacher_fn, terms, hard_weight=cfg.hard_weight)
        batch_loss = None
        if cfg.cache:  # the same loss with its values in the batches (a population trains such trials together)
            batch_loss = kd_batch_loss(
                teacher_fn, [(t.weight, t.name, dict(t.options)) for t in cfg.terms], hard_weight=cfg.hard_weight
            )
        return KDSetup(
            student=student,
            loss_transforms=(transform,),
            sampler=sampler,
            unwrap=unwrap_student,
            unwrap_tree=(lambda tree: tree[HintedStudent.PREFIX]) if wrapped else None,
            notes=notes,
            metrics=metrics,
            batch_loss=batch_loss,
        )


register_kd_backend(DistillationBackend())


def keep_zeros(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Deprecated: wraps ``tx`` so kernel entries (``ndim >= 2``) that are zero at ``init`` stay zero.

    Fine-tuning stages keep a pruned model's declared masks by themselves
    (``TrainStage.keep_constraints``); for a hand-written loop use
    ``methods.pruning.masked(tx, masks=nonzero_masks)``, which this returns.
    """
    warnings.warn(
        "methods.distillation.keep_zeros is deprecated: stages keep earlier masks themselves "
        "(train.keep_constraints); in your own loop use methods.pruning.masked(tx, masks=methods.pruning.masks.nonzero_masks)",
        DeprecationWarning,
        stacklevel=2,
    )
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
    return _resolve_teacher(bundle, cfg.teacher_config())


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
    """Distils the teacher into ``resolve_student`` with the configured KD terms (:func:`research.stages.fine_tune`)."""
    cfg.validate()
    student = resolve_student(bundle, cfg, ctx.seed)
    # The constraints the student carries: the current model's, an earlier stage's, or none (fresh).
    if cfg.student_model:
        base: dict[str, Any] | None = {}
    elif cfg.student:
        base = bundle.stage_extras.get(cfg.student, {})
    else:
        base = None
    train = dataclasses.replace(cfg.train, teacher=cfg.teacher_config())
    done = fine_tune(
        bundle,
        student,
        train,
        ctx,
        input_model=bundle.model,
        extras=bundle.extras if base is None else base,
        description=f"{ctx.label} (distill)",
    )
    recipe = student_recipe(bundle, cfg, ctx.seed)
    extras = bundle.extras if base is None else base
    return StageResult(
        bundle=dataclasses.replace(bundle, model=done.model, recipe=recipe, extras=dict(extras)),
        metrics=done.metrics,
        notes=done.notes,
        base_extras=base,
    )
