"""Stages: the steps of an experiment (train, prune, distill, quantize, export...).

This module holds the stage types (:class:`StageConfig`, :class:`Bundle`, :class:`StageContext`,
:class:`StageResult`), the stage registry and the ``train`` stage. It imports only the standard
library and :mod:`research.config`, so a config file that names stage classes loads, and its
values are checked, without importing JAX. The training loop is :func:`research.train.finetune`,
the report columns are :func:`research.metrics.measure`.

A stage is a frozen keyword-only config dataclass (a :class:`StageConfig` subclass with a
``kind``) plus a run function registered for it::

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class PruneStage(StageConfig):
        kind: ClassVar[str] = "prune"
        sparsity: float = 0.9
        train: TrainStage | None = dataclasses.field(default_factory=lambda: TrainStage(steps=300))

    @register_stage(PruneStage)
    def run_prune(bundle: Bundle, cfg: PruneStage, ctx: StageContext) -> StageResult: ...

Each stage takes the :class:`Bundle` left by the previous one and returns a
:class:`StageResult`; the runner (``research.run``) measures the model after every stage and
checkpoints it so a killed run resumes from the last finished stage. A method stage that
fine-tunes embeds its schedule as ``train: TrainStage`` (override keys
``stages.<kind>.train.<field>``) and calls :func:`fine_tune` with it; it never copies the
training loop. :func:`fine_tune` keeps what earlier stages constrained (pruning masks, trainable
quantizer ranges: :mod:`research.constraints`; ``train.keep_constraints=False`` releases them)
and distils from ``train.teacher`` when one is set (:mod:`research.teacher`), so every
fine-tuning stage composes the same way.

Stage kinds of installed packages are registered by :func:`load_stage_plugins`, which calls
every entry point of the ``slimjax.stages`` group (``methods:register_stages`` for this
project's methods); the core never imports a method package by name.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import importlib.metadata
import pathlib
import time
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar
from typing import Literal

from research import renames
from research.config import Check
from research.config import ConfigError
from research.config import Range
from research.config import ValidationContext
from research.config import at_least_one
from research.config import nonnegative
from research.config import positive
from research.config import validate_fields
from research.registry import Registry
from research.registry import UnknownNameError
from research.registry import same_definition
from research.renames import RenamedFieldsMeta
from research.teacher import INPUT
from research.teacher import TeacherConfig
from research.teacher import kd_backend
from research.teacher import teacher_key_error

if TYPE_CHECKING:
    from flax import nnx

    from research.data import Dataset


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig(metaclass=RenamedFieldsMeta):
    """Base class of stage configs. Subclasses set ``kind`` and add typed fields.

    Every field is validated before anything trains (:func:`research.config.validate`): its
    value against its type annotation (Literals included), then against the class's
    ``checks`` (``{"steps": Range(lo=1), "scorer": OneOf(list_scorers, "pruning scorer")}``,
    see :class:`research.config.Check`), then the class's :meth:`check` hook does the checks
    that involve several fields. Errors name the dotted key (``stages.prune.train.learning_rate``).

    A field renamed or moved keeps its old spelling for one release through ``renamed``
    (``{"finetune": "train", "steps": "train.steps"}``, see :mod:`research.renames`): the old
    constructor keyword and the old ``--set`` key still work and warn (``DeprecationWarning``)
    naming the new one.
    """

    kind: ClassVar[str] = ""
    checks: ClassVar[Mapping[str, Check]] = {}
    renamed: ClassVar[Mapping[str, str]] = {}

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

    def replace_renamed(self, name: str, value: Any) -> StageConfig:
        """A copy with the deprecated field ``name`` (a key of ``renamed``) set to ``value``, no warning.

        ``research.config.apply_overrides`` uses it for an old ``--set`` key (and warns itself).
        """
        init = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if "." not in self.renamed[name]:
            init.pop(self.renamed[name], None)
        return type(self)(**renames.translate(type(self), {**init, name: value}, warn=False))


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
      stage_extras: the extras each model in ``models`` was left with (its declared constraints,
        :mod:`research.constraints`), by the same keys.
    """

    model: nnx.Module
    dataset: Dataset
    seed: int = 0
    models: dict[str, nnx.Module] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: tuple[dict[str, Any], ...] = ()
    recipes: dict[str, tuple[dict[str, Any], ...]] = dataclasses.field(default_factory=dict)
    stage_extras: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


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
    """A stage's output: the new bundle and what goes into the report.

    Which ``metrics`` names make which report columns (e.g. ``csr_bytes`` for "bytes (best
    encoding)") is the contract documented in :mod:`research.report`.
    """

    bundle: Bundle
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    tables: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    artifacts: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    base_extras: dict[str, Any] | None = None
    """The extras whose constraints the output model started under, when that is not the input
    bundle's (a distillation student taken from another stage: that stage's extras; a fresh zoo
    student: ``{}``). The runner checks the output against these (:func:`research.constraints.check_stage`)."""


StageFn = Callable[[Bundle, Any, StageContext], StageResult]
STAGES: Registry[tuple[type, StageFn]] = Registry(
    "stage kind", hint="register one with @register_stage(MyStageConfig) in a module that is imported"
)


def register_stage(config_cls: type[StageConfig]) -> Callable[[StageFn], StageFn]:
    """Registers the run function of a stage config class under ``config_cls.kind``.

    Registering the same class and function again (a module imported twice) is a no-op.

    Raises:
      ValueError: empty ``kind``; DuplicateNameError (a ``ValueError``) for a kind another
        class or function is registered under.
    """
    kind = getattr(config_cls, "kind", "")
    if not kind:
        raise ValueError(f"{config_cls.__name__} needs a class attribute kind: ClassVar[str] = '...'")

    def deco(fn: StageFn) -> StageFn:
        old = STAGES.get(kind) if kind in STAGES else None
        same = old is not None and same_definition(old[0], config_cls) and same_definition(old[1], fn)
        STAGES.register(kind, (config_cls, fn), replace=same)
        return fn

    return deco


def list_stages() -> list[str]:
    """Registered stage kinds: the core's and the installed plugins' (:func:`load_all_stages` runs first)."""
    load_all_stages()
    return STAGES.names()


def get_stage(kind: str) -> tuple[type, StageFn]:
    """``(config_cls, run_fn)`` of a registered kind.

    Raises:
      UnknownNameError: unknown kind (a ``KeyError`` naming the closest and all registered ones,
        and how to install the missing ones).
    """
    if kind not in STAGES:
        load_all_stages()
    if kind not in STAGES:
        raise UnknownNameError(f"{STAGES.unknown_message(kind)}{missing_plugins_hint()}")
    return STAGES.get(kind)


# ----------------------------------------------------------------------------- stage plugins

#: The entry-point group through which installed packages register their stages: each entry
#: point names a function without arguments that imports (registers) the package's stages, e.g.
#: ``[project.entry-points."slimjax.stages"] methods = "methods:register_stages"``.
ENTRY_POINT_GROUP = "slimjax.stages"
_plugins: dict[str, str] | None = None  # entry-point name -> "module:function", once loaded


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of :data:`ENTRY_POINT_GROUP` (tests replace this function)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_stage_plugins(*, reload: bool = False) -> dict[str, str]:
    """Calls every entry point of the ``slimjax.stages`` group once, registering its stages.

    Args:
      reload: look the entry points up and call them again (after an install, or in tests).

    Returns:
      ``{entry-point name: "module:function"}`` of the plugins loaded; empty when none is
      installed (then only the core's ``train`` and ``export`` stages exist, and an unknown kind's
      error says to ``pip install -e .``).

    Raises:
      ImportError: a plugin failed to import or register (the message names the entry point).
    """
    global _plugins
    if _plugins is not None and not reload:
        return dict(_plugins)
    loaded: dict[str, str] = {}
    for ep in sorted(_entry_points(), key=lambda e: e.name):
        try:
            register = ep.load()
            register()
        except Exception as e:  # noqa: BLE001 - re-raised naming the plugin
            raise ImportError(
                f"stage plugin {ep.name!r} ({ep.value}, entry-point group {ENTRY_POINT_GROUP!r}) failed to load: "
                f"{type(e).__name__}: {e}"
            ) from e
        loaded[ep.name] = ep.value
    _plugins = loaded
    return dict(loaded)


def load_all_stages() -> None:
    """Registers every stage kind: the core's ``train`` (this module) and ``export``
    (``research.export``, imported without TensorFlow) and the installed plugins'
    (:func:`load_stage_plugins`). Cheap after the first call.

    Raises:
      ImportError: a plugin failed to load (the message names it).
    """
    load_stage_plugins()
    importlib.import_module("research.export.stage")


def missing_plugins_hint() -> str:
    """A hint for an unknown stage kind when no stage plugin is installed (else ``""``)."""
    if _plugins:
        return ""
    return (
        f". No package registers stages through the {ENTRY_POINT_GROUP!r} entry-point group, so the method "
        "stages (prune, distill, decompose, quantize, qat, nas) are missing: install slimjax with "
        "`pip install -e .` in its repository root"
    )


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
      keep_constraints: keep what earlier stages fixed (:mod:`research.constraints`): pruned
        weights stay exactly zero (their masks go into the optimizer), trainable quantizer ranges
        stay frozen. ``False`` releases them (the report and a warning say so).
      teacher: distil from a teacher while training (:class:`research.teacher.TeacherConfig`:
        an earlier stage, ``"input"`` for the model the stage starts from, or a finished run;
        KD terms by registered name with weights). ``None``: the task loss alone.
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
    keep_constraints: bool = True
    teacher: TeacherConfig | None = None

    def check(self, key: str, context: ValidationContext) -> None:
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"{key}.warmup_steps={self.warmup_steps} is more than {key}.steps={self.steps}: the learning "
                "rate would never reach its peak; lower warmup_steps"
            )


def train_kwargs(cfg: TrainStage) -> dict[str, Any]:
    """The :func:`research.train.finetune` keyword arguments of a :class:`TrainStage` (methods embed one)."""
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


def resolve_teacher(bundle: Bundle, cfg: TeacherConfig, input_model: nnx.Module | None = None) -> nnx.Module:
    """The teacher model ``cfg`` names: a finished run's final model, the stage's input model, or an
    earlier stage's model (``bundle.models`` by label or kind).

    A run directory's model is rebuilt from its stored recipe and arrays
    (:func:`research.run.load_run`); nothing in the directory is executed.

    Raises:
      KeyError: the named stage has not run (names the finished ones).
    """
    if cfg.run:
        from research.run import load_run  # pylint: disable=import-outside-toplevel

        return load_run(cfg.run)[1]
    if cfg.stage == INPUT:
        return bundle.model if input_model is None else input_model
    if cfg.stage not in bundle.models:
        raise teacher_key_error(cfg.stage, list(bundle.models))
    return bundle.models[cfg.stage]


@dataclasses.dataclass
class FineTuned:
    """What :func:`fine_tune` returns.

    Attributes:
      model: the trained model (a distillation wrapper removed).
      records: the training loop's records of this call.
      state: ``(defs, TrainState)`` of the run (the student's, wrapper included).
      masks: the masks the optimizer kept (every mask wrapper's, combined), shaped like the trained
        model's params; ``None`` without masks.
      notes, metrics: for the stage's report (constraints kept or released, the teacher,
        ``teacher_test_accuracy``, the last ``kd_*``/``hard_loss`` values, ``final_train_loss``).
    """

    model: nnx.Module
    records: list[dict[str, Any]]
    state: Any
    masks: Any
    notes: list[str]
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class FineTuneRequest:
    """One stage's fine-tuning as :func:`fine_tune` hands it to a :data:`FINE_TUNE_RUNNER`.

    Attributes:
      stage: the stage's index in the run.
      model: the model to train.
      dataset: the run's data set.
      kwargs: the keyword arguments of :func:`research.train.finetune` (``workdir``, ``seed``,
        ``steps``, ``learning_rate`` ..., and ``step_key``: what the compiled step bakes in).
      wrap_tx: the optimizer wrapper (a pruning schedule, kept masks), or ``None``.
      batch_loss: the loss transforms as a :class:`research.train.BatchLoss` (a cached teacher's
        distillation: its values travel in the batches), or ``None`` (the plain task loss).
      alone: why this fine-tuning cannot train with others (its compiled step is not cacheable:
        the stage's own loss transforms, a wrapper without a ``wrap_key``, a teacher run in the
        step); ``""`` when it may. The runner records the reason and replies ``None``: it trains alone.
    """

    stage: int
    model: Any
    dataset: Any
    kwargs: dict[str, Any]
    wrap_tx: Callable[[Any], Any] | None
    batch_loss: Any = None
    alone: str = ""


FINE_TUNE_RUNNER: contextvars.ContextVar = contextvars.ContextVar("slimjax_fine_tune_runner", default=None)
"""``request -> None | (trained model, records, (defs, state), notes)``: set by the population
executor in each trial's thread, so a stage's fine-tuning (one whose compiled step is cacheable: no
loss transforms of its own, and no teacher or one whose loss reads its values from the batches,
:attr:`research.teacher.KDSetup.batch_loss`) can train together with the other trials' (``None``:
train alone, as without a runner). The runner writes what :func:`research.train.finetune` writes."""


def fine_tune(
    bundle: Bundle,
    model: nnx.Module,
    train: TrainStage,
    ctx: StageContext,
    *,
    input_model: nnx.Module | None = None,
    extras: Mapping[str, Any] | None = None,
    wrap_tx: Callable[[Any], Any] | None = None,
    wrap_key: Any = None,
    loss_transforms: tuple[Any, ...] = (),
    description: str | None = None,
) -> FineTuned:
    """The fine-tuning every stage does: :func:`research.train.finetune` with the earlier stages'
    constraints kept and the schedule's teacher, if any.

    Args:
      bundle: the stage's input (data, earlier models, declared constraints).
      model: the model to train (the stage's pruned, quantized or factorized model).
      train: the schedule; ``train.keep_constraints`` and ``train.teacher`` are applied here.
      ctx: the stage's context (directory, seed, progress).
      input_model: the model the stage started from (``TeacherConfig(stage="input")``;
        default ``bundle.model``).
      extras: the extras whose constraints ``model`` carries (default ``bundle.extras``).
      wrap_tx: the stage's own optimizer wrapper (a pruning schedule); the kept masks wrap it.
      wrap_key: what ``wrap_tx`` bakes into the compiled step (its structure and constants, not the
        values it keeps in the optimizer state), hashable. Stages whose settings agree then share
        one jitted step (the trials of a ``slimjax tune`` study compile it once); ``None`` with a
        ``wrap_tx``, a teacher or ``loss_transforms``: the step is jitted anew.
      loss_transforms: the stage's own loss transforms (the teacher's come after them).
      description: the progress bar's label.

    Returns:
      A :class:`FineTuned`.
    """
    from research import constraints as constraints_lib  # pylint: disable=import-outside-toplevel
    from research.train import finetune  # pylint: disable=import-outside-toplevel
    from research.train import masking  # pylint: disable=import-outside-toplevel
    from research.train import read_metrics  # pylint: disable=import-outside-toplevel
    from research.train import split_model  # pylint: disable=import-outside-toplevel

    ds = bundle.dataset
    notes: list[str] = []
    metrics: dict[str, float] = {}
    student, setup = model, None
    if train.teacher is not None:
        teacher = resolve_teacher(bundle, train.teacher, input_model)
        batch = min(train.batch_size, len(ds.x_train))
        setup = kd_backend().setup(teacher, train.teacher, model, ds, batch_size=batch, seed=ctx.seed)
        student = setup.student
        notes += [f"distilled from {train.teacher.describe()}", *setup.notes]
        metrics.update(setup.metrics)
    _, params, _ = split_model(_clone(student))
    carry = constraints_lib.carried(bundle.extras if extras is None else extras, params, keep=train.keep_constraints)
    notes += carry.notes

    def wrap(tx):
        return carry.wrap(wrap_tx(tx) if wrap_tx is not None else tx)

    kwargs = {**context_kwargs(ctx), **train_kwargs(train)}
    if description:
        kwargs["description"] = description
    cacheable = not loss_transforms and (wrap_tx is None or wrap_key is not None)
    if setup is None and cacheable:
        kwargs["step_key"] = (carry.step_key, wrap_key)
    # A teacher whose loss reads its values from the batches may train in a population too; its own
    # run (below) keeps the loss that closes over them, with no step key (its step is jitted anew).
    batch_loss = setup.batch_loss if setup is not None and cacheable else None
    asked = kwargs if batch_loss is None else {**kwargs, "step_key": (carry.step_key, wrap_key, batch_loss.key)}
    wrapper = wrap if (wrap_tx is not None or carry.active) else None
    runner = FINE_TUNE_RUNNER.get()
    done = None
    if runner is not None and "step_key" in asked:  # a cacheable step: it may train in a population
        request = FineTuneRequest(
            stage=ctx.index, model=student, dataset=ds, kwargs=dict(asked), wrap_tx=wrapper, batch_loss=batch_loss
        )
        done = runner(request)
    elif runner is not None:  # the runner reports why this one trains alone
        why = _not_cacheable(ctx.label, loss_transforms, wrap_tx, wrap_key, setup)
        runner(
            FineTuneRequest(stage=ctx.index, model=student, dataset=ds, kwargs=dict(kwargs), wrap_tx=None, alone=why)
        )
    if done is None:
        done = (
            *finetune(
                student,
                ds,
                **kwargs,
                loss_transforms=[*loss_transforms, *(setup.loss_transforms if setup else ())],
                wrap_tx=wrapper,
                sampler=setup.sampler if setup else None,
                return_state=True,
            ),
            [],
        )
    trained, records, (defs, state), runner_notes = done
    notes += runner_notes
    masks = masking.combine_masks(*masking.find_all_masks(state.opt_state))
    if setup is not None:
        if setup.unwrap is not None:
            trained = setup.unwrap(trained)
        if masks is not None and setup.unwrap_tree is not None:
            masks = setup.unwrap_tree(masks)
    train_rows = [r for r in records if r.get("split") == "train"]
    # A resumed stage logged its earlier steps in an earlier call: the last losses are in the file.
    logged = [r for r in read_metrics(ctx.workdir) if r.get("split") == "train"] or train_rows
    if logged:
        last = logged[-1]
        metrics["final_train_loss"] = last["loss"]
        if setup is not None:
            metrics.update(
                {
                    k if k == "hard_loss" else k.replace("/", "_"): v
                    for k, v in last.items()
                    if k.startswith(("kd/", "hard_loss"))
                }
            )
    return FineTuned(model=trained, records=records, state=(defs, state), masks=masks, notes=notes, metrics=metrics)


def _clone(model):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return nnx.clone(model)


def _not_cacheable(label: str, loss_transforms, wrap_tx, wrap_key, setup) -> str:
    """Why :func:`fine_tune`'s compiled step (stage ``label``) cannot be shared with other runs' (one sentence)."""
    why = []
    if loss_transforms:
        why.append(f"the loss transforms of stage {label} itself are constants of its program")
    if wrap_tx is not None and wrap_key is None:
        why.append("its optimizer wrapper declares no wrap_key (what it bakes into the step is unknown)")
    if setup is not None and setup.batch_loss is None:
        why.append(
            "its teacher runs in every step (not cached: TeacherConfig(cache=False) or "
            "DistillStage(cache_teacher=False)), so its outputs are not values in the batches"
        )
    return "; ".join(why) or "its compiled step is not cacheable"


def context_kwargs(ctx: StageContext) -> dict[str, Any]:
    """The :func:`research.train.finetune` keyword arguments of a stage's context (directory, seed, progress)."""
    return {"workdir": ctx.workdir, "seed": ctx.seed, "progress": ctx.progress, "description": ctx.label}


@register_stage(TrainStage)
def run_train(bundle: Bundle, cfg: TrainStage, ctx: StageContext) -> StageResult:
    """Trains ``bundle.model`` with the task loss (and a teacher, if ``cfg.teacher``), keeping the
    earlier stages' constraints unless ``cfg.keep_constraints`` is false."""
    t0 = time.perf_counter()
    done = fine_tune(bundle, bundle.model, cfg, ctx)
    seconds = time.perf_counter() - t0
    train_rows = [r for r in done.records if r.get("split") == "train"]
    out = dict(done.metrics)
    if train_rows:
        # Throughput over the steps this call ran, compilation and evaluation included.
        out["train_steps_per_s"] = len(train_rows) / seconds
        out["train_examples_per_s"] = len(train_rows) * min(cfg.batch_size, len(bundle.dataset.x_train)) / seconds
    return StageResult(bundle=dataclasses.replace(bundle, model=done.model), metrics=out, notes=done.notes)


# ----------------------------------------------------------------------------- moved names

_MOVED = {
    "finetune": "research.train",
    "make_optimizer": "research.train",
    "measure": "research.metrics",
    "accuracy": "research.metrics",
}


def _finetune_with_context(model, dataset, ctx, **kwargs):
    from research.train import finetune  # pylint: disable=import-outside-toplevel

    return finetune(model, dataset, **{**context_kwargs(ctx), **kwargs})


def __getattr__(name: str) -> Any:
    """``research.stages.finetune/make_optimizer/measure/accuracy`` moved; they still work for one
    release with a ``DeprecationWarning`` (``finetune`` keeps its old ``ctx`` argument here)."""
    if name not in _MOVED:
        raise AttributeError(f"module 'research.stages' has no attribute {name!r}")
    new = _MOVED[name]
    fix = " (it takes workdir=, seed=, progress= instead of a StageContext)" if name == "finetune" else ""
    warnings.warn(
        f"research.stages.{name} moved to {new}.{name}{fix}; the old name is removed in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    if name == "finetune":
        return _finetune_with_context
    return getattr(importlib.import_module(new), name)
