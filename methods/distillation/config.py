"""The ``distill`` stage's config (standard library only: a config file imports it without JAX).

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

The teacher, the KD terms and their implementation are those every fine-tuning stage takes as
``train.teacher`` (:class:`research.teacher.TeacherConfig`, :func:`research.stages.fine_tune`);
this stage adds the choice of student. The run function is in :mod:`methods.distillation.stage`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any
from typing import ClassVar
from typing import Literal

from research import names
from research.config import Check
from research.config import ConfigError
from research.config import EarlierStage
from research.config import ExistingDir
from research.config import Range
from research.config import Registered
from research.config import ValidationContext
from research.config import fraction
from research.config import nonnegative
from research.stages import StageConfig
from research.stages import TrainStage
from research.teacher import KDTermConfig
from research.teacher import TeacherConfig
from research.teacher import default_terms as _default_terms


def _model_kwargs(name: str) -> Any:
    from research.nn import model_kwargs  # pylint: disable=import-outside-toplevel

    return model_kwargs(name)


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
      train: the training schedule (steps, learning rate, optimizer...). Its ``keep_constraints``
        (default True) keeps the student's constraints (a pruned student's zeros stay exactly
        zero; see :mod:`research.constraints`); its ``teacher`` must stay ``None`` (this stage's
        teacher is the fields above).
      keep_zeros: deprecated (one release) spelling of ``train.keep_constraints``.
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
        "student_model": Registered(names.MODELS, also=("",)),
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
    renamed: ClassVar[Mapping[str, str]] = {"keep_zeros": "train.keep_constraints"}
    teacher: str = "train"
    teacher_run: str = ""
    student: str = ""
    student_model: str = ""
    student_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    terms: tuple[KDTermConfig, ...] = dataclasses.field(default_factory=_default_terms)
    hard_weight: float = 0.1
    cache_teacher: bool = True
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

    def teacher_config(self) -> TeacherConfig:
        """The stage's teacher and KD terms as the :class:`~research.teacher.TeacherConfig` every
        fine-tuning stage takes (one implementation: :func:`research.stages.fine_tune`)."""
        terms, hard = self.kd_terms()
        return TeacherConfig(
            stage="" if self.teacher_run else self.teacher,
            run=self.teacher_run,
            terms=terms,
            hard_weight=hard,
            cache=self.cache_teacher,
        )

    def check(self, key: str, context: ValidationContext) -> None:
        if self.train.teacher is not None:
            raise ConfigError(
                f"{key}.train.teacher is set; a distill stage's teacher is {key}.teacher/teacher_run with "
                f"{key}.terms and {key}.hard_weight: set those and leave train.teacher=None"
            )
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
            valid = _model_kwargs(self.student_model)
            bad = sorted(set(self.student_options) - set(valid))
            if bad:
                raise ConfigError(
                    f"{key}.student_options {bad} are not options of model {self.student_model!r}; "
                    f"valid keys: {sorted(valid)}"
                )


__all__ = ["DistillStage", "KDTermConfig", "TeacherConfig"]
