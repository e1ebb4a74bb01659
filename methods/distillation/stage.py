"""The ``distill`` stage: train a student against a teacher from an earlier stage or run.

Example config stages::

    stages=(
        TrainStage(steps=500),                                  # 0_train: the teacher
        PruneStage(...),                                        # the student: the pruned model
        DistillStage(teacher="0_train", train=TrainStage(steps=300)),   # Hinton KD, T = 4
    )

The loss is a weighted sum of registered KD terms (:class:`KDTermConfig`), e.g. DKD plus a
FitNets hint::

    DistillStage(
        terms=(
            KDTermConfig(name="dkd", options={"beta": 8.0, "temperature": 4.0}),
            KDTermConfig(name="fitnets", weight=0.01, options={"hints": [["layers/0", "layers/0"]]}),
        ),
        hard_weight=1.0,
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
import warnings
from collections.abc import Mapping
from typing import Any
from typing import ClassVar
from typing import Literal

import optax
from flax import nnx

from methods.distillation.hints import unwrap_student
from methods.distillation.teacher import IndexedBatchSampler
from methods.distillation.teacher import build_teacher_cache
from methods.distillation.transforms import KDTerm
from methods.distillation.transforms import list_kd_terms
from methods.distillation.transforms import make_kd_term
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
from research.metrics import accuracy
from research.nn import copy_model
from research.nn import list_models
from research.nn import model_kwargs
from research.stages import Bundle
from research.stages import StageConfig
from research.stages import StageContext
from research.stages import StageResult
from research.stages import TrainStage
from research.stages import context_kwargs
from research.stages import register_stage
from research.stages import train_kwargs
from research.train import finetune
from research.train import read_metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class KDTermConfig:
    """One distillation term of a :class:`DistillStage`: a registered KD term, its weight, its options.

    The term is built with ``make_kd_term(name, **options)``; config validation builds it once,
    so an unknown option or a bad value fails before anything trains. A new KD loss is one
    ``@register_kd_term("name")`` factory (:mod:`methods.distillation.transforms`); nothing here
    changes.

    Attributes:
      name: a registered KD term (``list_kd_terms()``: ``hinton``, ``dkd``, ``fitnets``,
        ``attention``, ``rkd_distance``, ``rkd_angle``, and any registered later).
      weight: the term's weight in the loss.
      options: keyword options of the term's factory, e.g. ``{"temperature": 4.0}`` (hinton),
        ``{"alpha": 1.0, "beta": 8.0, "temperature": 4.0}`` (dkd), ``{"hints": [["layers/0",
        "layers/0"]]}`` (fitnets), ``{"pairs": [[s, t]]}`` (attention).

    Example::

        DistillStage(terms=(KDTermConfig(name="dkd", options={"beta": 4.0}),), hard_weight=1.0)
    """

    checks: ClassVar[Mapping[str, Check]] = {
        "name": OneOf(list_kd_terms, "KD term"),
        "weight": nonnegative,
    }
    name: str = "hinton"
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build(self) -> KDTerm:
        """The :class:`KDTerm` (``make_kd_term(name, **options)``)."""
        return make_kd_term(self.name, **dict(self.options))

    def check(self, key: str, context: ValidationContext) -> None:
        """The options must build the term (known option names, values the factory accepts)."""
        if self.name not in list_kd_terms():
            return  # reported by the name check
        try:
            self.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}.options={dict(self.options)!r} do not build KD term {self.name!r}: {e}") from None


def _default_terms() -> tuple[KDTermConfig, ...]:
    return (KDTermConfig(name="hinton", weight=0.9, options={"temperature": 4.0}),)


# The fields before `terms`/`hard_weight`, with the defaults they had. Deprecated: still read
# (with a DeprecationWarning) for one release.
_LEGACY_DEFAULTS: dict[str, Any] = {
    "loss": "hinton",
    "temperature": 4.0,
    "alpha": 0.9,
    "dkd_alpha": 1.0,
    "dkd_beta": 8.0,
    "hints": (),
    "hint_weight": 1.0,
    "attention": (),
    "attention_weight": 500.0,
    "rkd_distance_weight": 0.0,
    "rkd_angle_weight": 0.0,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillStage(StageConfig):
    """Knowledge distillation from a teacher model into the student.

    The loss is ``hard_weight * CE + sum_i terms[i].weight * term_i(student, teacher)`` over
    registered KD terms (:class:`KDTermConfig`); the default is Hinton KD, ``0.1 CE + 0.9 T^2
    KL`` at ``T = 4``.

    Attributes:
      teacher: key of ``bundle.models`` (stage label like ``"0_train"`` or a kind like ``"train"``).
      teacher_run: a finished run directory whose final model is the teacher (overrides ``teacher``).
      student: ``""`` for the current model, or a key of ``bundle.models``.
      student_model: a zoo model name to build a fresh student (overrides ``student``).
      student_options: keyword options of ``student_model`` (e.g. ``{"widths": [64]}``).
      terms: the KD terms with their weights and options (``--set stages.distill.terms.0.weight=0.5``).
      hard_weight: weight of the cross-entropy on the labels.
      cache_teacher: compute the teacher outputs on the training set once and look them up by
        index (no augmentation happens in this stage, so this gives the same training).
      keep_zeros: kernel weights that are exactly zero at the start stay zero (pruned students).
      train: the training schedule (steps, learning rate, optimizer...).
      loss, temperature, alpha, dkd_alpha, dkd_beta, hints, hint_weight, attention,
        attention_weight, rkd_distance_weight, rkd_angle_weight: deprecated (one release) spelling
        of the terms: ``loss="hinton"`` is ``KDTermConfig(name="hinton", weight=alpha,
        options={"temperature": temperature})`` with ``hard_weight=1 - alpha``; ``loss="dkd"`` is
        ``KDTermConfig(name="dkd", options={"alpha": dkd_alpha, "beta": dkd_beta, "temperature":
        temperature})`` with ``hard_weight=1``; ``hints`` adds ``KDTermConfig(name="fitnets",
        weight=hint_weight, options={"hints": hints})``; ``attention`` adds ``"attention"`` with
        ``{"pairs": attention}``; a nonzero ``rkd_*_weight`` adds ``"rkd_distance"``/``"rkd_angle"``.
        Setting any of them warns and replaces ``terms``/``hard_weight`` (setting both is an error).
    """

    kind: ClassVar[str] = "distill"
    checks: ClassVar[Mapping[str, Check]] = {
        "teacher_run": ExistingDir(),
        "student": EarlierStage(also=("",)),
        "student_model": OneOf(list_models, "model", also=("",)),
        "hard_weight": nonnegative,
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
    terms: tuple[KDTermConfig, ...] = dataclasses.field(default_factory=_default_terms)
    hard_weight: float = 0.1
    cache_teacher: bool = True
    keep_zeros: bool = True
    train: TrainStage = dataclasses.field(default_factory=lambda: TrainStage(steps=300, eval_every=100))
    # deprecated spelling (see the class docstring); None = not given
    loss: Literal["hinton", "dkd"] | None = None
    temperature: float | None = None
    alpha: float | None = None
    dkd_alpha: float | None = None
    dkd_beta: float | None = None
    hints: tuple[tuple[str, str], ...] | None = None
    hint_weight: float | None = None
    attention: tuple[tuple[str, str], ...] | None = None
    attention_weight: float | None = None
    rkd_distance_weight: float | None = None
    rkd_angle_weight: float | None = None

    def __post_init__(self) -> None:
        legacy = self.legacy_fields()
        if legacy:
            try:
                terms, hard = self.kd_terms()
                spelled = ", ".join(
                    f"KDTermConfig(name={t.name!r}, weight={t.weight!r}, options={dict(t.options)!r})" for t in terms
                )
                spelled = f"; write terms=({spelled},), hard_weight={hard!r}"
            except (TypeError, ValueError):  # wrong types: validation reports them with their keys
                spelled = "; write terms=(KDTermConfig(...),) and hard_weight= (see DistillStage's docstring)"
            warnings.warn(
                f"DistillStage fields {legacy} are deprecated and will be removed in the next release{spelled}",
                DeprecationWarning,
                stacklevel=3,
            )

    def legacy_fields(self) -> list[str]:
        """The deprecated fields that are set (not None)."""
        return [k for k in _LEGACY_DEFAULTS if getattr(self, k) is not None]

    def kd_terms(self) -> tuple[tuple[KDTermConfig, ...], float]:
        """``(terms, hard_weight)`` this stage trains with (from the deprecated fields when set)."""
        if not self.legacy_fields():
            return tuple(self.terms), self.hard_weight
        old = {k: _LEGACY_DEFAULTS[k] if getattr(self, k) is None else getattr(self, k) for k in _LEGACY_DEFAULTS}
        if old["loss"] == "hinton":
            terms = [KDTermConfig(name="hinton", weight=old["alpha"], options={"temperature": old["temperature"]})]
            hard = 1.0 - old["alpha"]
        else:
            opts = {"alpha": old["dkd_alpha"], "beta": old["dkd_beta"], "temperature": old["temperature"]}
            terms, hard = [KDTermConfig(name="dkd", weight=1.0, options=opts)], 1.0
        if old["hints"]:
            terms.append(KDTermConfig(name="fitnets", weight=old["hint_weight"], options={"hints": old["hints"]}))
        if old["attention"]:
            terms.append(
                KDTermConfig(name="attention", weight=old["attention_weight"], options={"pairs": old["attention"]})
            )
        for name in ("rkd_distance", "rkd_angle"):
            if old[f"{name}_weight"]:
                terms.append(KDTermConfig(name=name, weight=old[f"{name}_weight"]))
        return tuple(terms), hard

    def check(self, key: str, context: ValidationContext) -> None:
        legacy = self.legacy_fields()
        if legacy and (tuple(self.terms) != _default_terms() or self.hard_weight != 0.1):
            raise ConfigError(
                f"{key}.terms/hard_weight and the deprecated {legacy} are both set; "
                "keep terms and hard_weight only (the deprecation warning spells the equivalent)"
            )
        if not self.kd_terms()[0]:
            raise ConfigError(f"{key}.terms is empty; give at least one KDTermConfig (e.g. name='hinton')")
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

    spec, hard_weight = cfg.kd_terms()
    terms = [(t.weight, t.build()) for t in spec]
    for _, term in terms:
        if term.prepare is not None:  # e.g. FitNets: projections, trained and dropped after the stage
            student = term.prepare(student, teacher, ds.x_train[:2], nnx.Rngs(ctx.seed + 1))
            notes.append(f"{term.name}: modules added to the student for training and dropped after the stage")

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
        **{**context_kwargs(ctx), "description": f"{ctx.label} (distill)"},
        loss_transforms=[transform],
        wrap_tx=keep_zeros if cfg.keep_zeros else None,
        sampler=sampler,
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
