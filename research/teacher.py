"""The teacher of a fine-tuning stage: one set of distillation options every stage accepts.

Every stage that fine-tunes (``train``, ``prune``, ``qat``, ``decompose``, ``distill``) trains
through :func:`research.stages.fine_tune` with a :class:`~research.stages.TrainStage` schedule,
and a schedule may name a teacher::

    QATStage(bits=4, train=TrainStage(steps=300, teacher=TeacherConfig(stage="0_train")))
    PruneStage(sparsity=0.9, train=TrainStage(teacher=TeacherConfig(
        stage="input", terms=(KDTermConfig(name="dkd", options={"beta": 8.0}),), hard_weight=1.0)))

(``--set stages.qat.train.teacher.stage=0_train``). The loss is then ``hard_weight * CE +
sum_i terms[i].weight * term_i(student, teacher)`` over KD terms registered by name; the
``distill`` stage is the same implementation with its own flat fields.

This module is standard library only, so config files import it without JAX. The KD terms
themselves live in a method package: ``methods.distillation`` registers the backend
(:func:`register_kd_backend`) that builds them, caches the teacher's outputs and wraps the
student; ``research`` never imports ``methods``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar
from typing import Protocol

from research import names
from research.config import Check
from research.config import ConfigError
from research.config import EarlierStage
from research.config import ExistingDir
from research.config import Registered
from research.config import ValidationContext
from research.config import nonnegative

#: ``TeacherConfig.stage`` value naming the model the stage starts from (before it prunes,
#: quantizes or factorizes it): the dense model for ``prune``, the float one for ``qat``...
INPUT = "input"


class KDBackend(Protocol):
    """What a distillation package provides (``methods.distillation`` registers one).

    ``term_names()`` lists the registered KD terms; ``build_term(name, options)`` builds one (and
    raises ``TypeError``/``ValueError`` when the options do not build it); ``setup(...)`` returns a
    :class:`KDSetup` for one fine-tuning run.
    """

    def term_names(self) -> list[str]: ...

    def build_term(self, name: str, options: Mapping[str, Any]) -> Any: ...

    def setup(
        self, teacher: Any, cfg: TeacherConfig, student: Any, dataset: Any, *, batch_size: int, seed: int
    ) -> KDSetup: ...


@dataclasses.dataclass
class KDSetup:
    """One fine-tuning run's distillation, as a backend builds it.

    Attributes:
      student: the model to train (the student, or the student wrapped with trainable extras
        such as FitNets projections).
      loss_transforms: the KD loss transforms (:mod:`research.train.losses`).
      sampler: the batch sampler the transforms need (e.g. batches carrying their row indices
        for a cached teacher), or ``None`` for the default one.
      unwrap: maps the trained model back to the student (drops the extras).
      unwrap_tree: maps a pytree shaped like the trained model's params to the student's.
      notes: report notes; ``metrics``: report metrics (e.g. ``teacher_test_accuracy``).
      batch_loss: the same loss as a :class:`research.train.BatchLoss` (its values read from the
        batches: a cached teacher's outputs, the weights, traced term options), or ``None``; with
        one, a population may fine-tune trials that differ in those values as one program.
    """

    student: Any
    loss_transforms: tuple[Any, ...]
    sampler: Any = None
    unwrap: Any = None
    unwrap_tree: Any = None
    notes: list[str] = dataclasses.field(default_factory=list)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    batch_loss: Any = None


_backends: list[KDBackend] = []


def register_kd_backend(backend: KDBackend) -> None:
    """Registers the package that builds KD terms (the latest registration wins; re-imports are no-ops)."""
    _backends[:] = [backend]


def kd_backend() -> KDBackend:
    """The registered KD backend, loading the stage plugins first if none is registered yet.

    Raises:
      RuntimeError: no installed package registers one (names the fix).
    """
    if not _backends:
        from research.stages import load_all_stages  # pylint: disable=import-outside-toplevel

        load_all_stages()
    if not _backends:
        raise RuntimeError(
            "a teacher needs the distillation package (methods.distillation), which is not installed; "
            "install slimjax with `pip install -e .` in its repository root"
        )
    return _backends[0]


def kd_term_names() -> list[str]:
    """Names of the registered KD terms (``hinton``, ``dkd``, ``fitnets``, ...)."""
    return kd_backend().term_names()


@dataclasses.dataclass(frozen=True, kw_only=True)
class KDTermConfig:
    """One distillation term: a registered KD term, its weight in the loss, its options.

    The term is built with the backend's ``make_kd_term(name, **options)``; validation builds it
    once, so an unknown option or a bad value fails before anything trains.

    Attributes:
      name: a registered KD term (``hinton``, ``dkd``, ``fitnets``, ``attention``,
        ``rkd_distance``, ``rkd_angle``, and any registered later).
      weight: the term's weight in the loss.
      options: keyword options of the term's factory, e.g. ``{"temperature": 4.0}`` (hinton),
        ``{"alpha": 1.0, "beta": 8.0, "temperature": 4.0}`` (dkd), ``{"hints": [["layers/0",
        "layers/0"]]}`` (fitnets), ``{"pairs": [[s, t]]}`` (attention).

    Example::

        TeacherConfig(stage="0_train", terms=(KDTermConfig(name="dkd", options={"beta": 4.0}),), hard_weight=1.0)
    """

    checks: ClassVar[Mapping[str, Check]] = {
        "name": Registered(names.KD_TERMS),
        "weight": nonnegative,
    }
    name: str = "hinton"
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build(self) -> Any:
        """The KD term (the backend's ``make_kd_term(name, **options)``, a ``KDTerm``)."""
        return kd_backend().build_term(self.name, dict(self.options))

    def check(self, key: str, context: ValidationContext) -> None:
        """The options must build the term (known option names, values the factory accepts)."""
        if self.name not in kd_backend().term_names():
            return  # reported by the name check
        try:
            self.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}.options={dict(self.options)!r} do not build KD term {self.name!r}: {e}") from None


def default_terms() -> tuple[KDTermConfig, ...]:
    """Hinton KD at ``T = 4`` with weight 0.9 (with ``hard_weight=0.1``: ``0.1 CE + 0.9 T^2 KL``)."""
    return (KDTermConfig(name="hinton", weight=0.9, options={"temperature": 4.0}),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """Distillation options of a fine-tuning schedule (``TrainStage.teacher``).

    Attributes:
      stage: the teacher: an earlier stage's label (``"0_train"``) or kind (``"train"``, the
        latest stage of that kind), or ``"input"``: the model this stage starts from (the dense
        model a ``prune`` stage prunes, the float model a ``qat`` stage quantizes, the model a
        ``decompose`` stage factorizes).
      run: a finished run directory whose final model is the teacher (replaces ``stage``).
      terms: the KD terms with their weights and options (``--set
        stages.qat.train.teacher.terms.0.weight=0.5``).
      hard_weight: weight of the cross-entropy on the labels.
      cache: compute the teacher's outputs on the training split once and look them up by row
        (same training as running the teacher in every step: no stage augments its batches).
    """

    checks: ClassVar[Mapping[str, Check]] = {
        "stage": EarlierStage(also=("", INPUT)),
        "run": ExistingDir(),
        "hard_weight": nonnegative,
    }
    stage: str = ""
    run: str = ""
    terms: tuple[KDTermConfig, ...] = dataclasses.field(default_factory=default_terms)
    hard_weight: float = 0.1
    cache: bool = True

    def check(self, key: str, context: ValidationContext) -> None:
        """A teacher is named (``stage`` or ``run``) and at least one KD term is given."""
        if not self.stage and not self.run:
            raise ConfigError(
                f"{key}.stage and {key}.run are both empty; name the teacher: an earlier stage (e.g. '0_train'), "
                f"'input' (the model this stage starts from) or a finished run directory"
            )
        if not self.terms:
            raise ConfigError(f"{key}.terms is empty; give at least one KDTermConfig (e.g. name='hinton')")

    def describe(self) -> str:
        """A short description for report notes: ``teacher 0_train, 0.1 CE + 0.9 hinton(T=4)``."""
        who = f"run {self.run}" if self.run else ("the stage's input model" if self.stage == INPUT else self.stage)
        parts = [f"{self.hard_weight:g} CE"] + [
            f"{t.weight:g} {t.name}"
            + (f"({', '.join(f'{k}={v}' for k, v in dict(t.options).items())})" if t.options else "")
            for t in self.terms
        ]
        return f"teacher {who}: " + " + ".join(parts)


def teacher_key_error(key: str, available: list[str]) -> KeyError:
    """The error for a teacher stage that has not run (names the available ones)."""
    return KeyError(
        f"teacher stage {key!r} is not a finished stage; available: {sorted(available)} "
        "(a stage label like '0_train', a kind like 'train', or 'input')"
    )
