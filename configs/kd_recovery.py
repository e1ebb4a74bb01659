"""Distillation recovering the accuracy lost to 90% pruning or to 4-bit quantization.

Run (one pipeline, one seed):
  slimjax run configs/kd_recovery.py:prune --workdir runs/kd_prune
  slimjax run configs/kd_recovery.py:quant --workdir runs/kd_quant
  slimjax run configs/kd_recovery.py:quant,bits=2 --workdir runs/kd_quant2
  slimjax run configs/kd_recovery.py:prune,quick     # seconds-long smoke variant
  slimjax run configs/kd_recovery.py:prune_stage,cnn1d --workdir runs/kd_cnn1d       # no-teacher arm, then
  slimjax run configs/kd_recovery.py:prune_stage,cnn1d,kd --workdir runs/kd_cnn1d    # the KD arm (reuses 0, 1)

``experiments/kd_recovery/main.py`` runs both pipelines for several seeds and prints the table.

Each pipeline trains a dense LeNet-300-100 teacher on the shipped 5,000-image MNIST subset,
compresses it once, and then fine-tunes that same compressed model twice with the same steps,
learning rate, optimizer and batches: once on the hard labels alone (no teacher) and once
distilled from the dense teacher (Hinton KD, ``(1 - alpha) CE + alpha T^2 KL``).

``prune``::

    0_train    dense teacher
    1_prune    one-shot magnitude masks, 90% of every kernel, no fine-tuning (train=None)
    2_prune    fine-tuning with the masked optax wrapper, cross-entropy (no teacher); the
               one-shot masks of an already 90%-sparse model are the same masks
    3_distill  student = 1_prune, teacher = 0_train; the student's masks (declared by
               1_prune) hold the pruned weights at exactly zero

The ``*_stage`` pipelines use the teacher of the fine-tuning stage itself
(``TrainStage(teacher=TeacherConfig(stage="0_train"))``, issue 15) instead of a ``distill``
stage; the two arms are two configs that differ only in the last stage's teacher (``,kd``), so
in one workdir the second reuses the first one's teacher and compressed model::

    prune_stage    0_train, 1_prune one-shot (train=None), 2_prune fine-tuning (KD arm: with teacher)
    gradual_stage  0_train, 1_prune gradual polynomial pruning while training (KD arm: with teacher)
    quant_stage    0_train, 1_quantize PTQ, 2_qat QAT (KD arm: with teacher)

``cnn1d`` runs them on MNIST-1D's CNN (``Recipe`` preset :data:`CNN1D`).

``quant``::

    0_train    dense teacher
    1_quantize 4-bit (``bits=N``: N-bit) fake-quant (STE, per-channel kernels, input
               activations at the same bits), min-max calibration; no training (PTQ)
    2_qat      quantization-aware fine-tuning, cross-entropy (no teacher)
    3_distill  student = 1_quantize, teacher = 0_train (the float model)

Expected on a 2-core CPU: well under a minute per pipeline; see
``experiments/kd_recovery/README.md`` for the measured accuracies.
"""

# No ``from __future__ import annotations``: research.config.load_config executes this file
# without registering it in sys.modules, and dataclasses then cannot resolve string annotations.
import dataclasses

from methods.distillation import DistillStage
from methods.distillation import KDTermConfig
from methods.pruning import PruneStage
from methods.quantization import QATStage
from methods.quantization import QuantizeStage
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.stages import TrainStage
from research.teacher import TeacherConfig

PIPELINES = ("prune", "quant")
STAGE_PIPELINES = ("prune_stage", "gradual_stage", "quant_stage")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """The shared knobs of both pipelines (the two arms of a pipeline use the same ones).

    Attributes:
      teacher_steps, teacher_lr: the dense teacher's training.
      sparsity: one-shot magnitude sparsity of every kernel (layerwise).
      bits, method: fake-quant bit width (kernels and input activations) and quantizer.
      steps, learning_rate: the fine-tuning of both arms (with and without the teacher).
      qat_learning_rate: the same, for the quantized pipeline.
      batch_size: examples per step everywhere.
      temperature, alpha: Hinton KD of the distilled arm.
      limit: keep at most this many training images (``None`` = all); for smoke runs.
      model, data: the zoo model and the data set.
    """

    teacher_steps: int = 1500
    teacher_lr: float = 1e-3
    sparsity: float = 0.9
    bits: int = 4
    method: str = "ste"
    steps: int = 300
    learning_rate: float = 1e-3
    qat_learning_rate: float = 1e-4
    batch_size: int = 128
    temperature: float = 4.0
    alpha: float = 0.9
    limit: int | None = None
    model: str = "lenet300"
    data: str = "mnist5k"


QUICK = Recipe(teacher_steps=30, steps=10, batch_size=64, limit=256)
#: MNIST-1D's CNN (5,210 parameters): the issue-15 probe model. Its 70% sparsity is the probe's;
#: the teacher's schedule was fixed before the KD runs (lr 3e-3, 3,000 steps).
CNN1D = Recipe(model="cnn1d", data="mnist1d", teacher_steps=3000, teacher_lr=3e-3, sparsity=0.7, bits=2, steps=300)


def _train(steps: int, lr: float, recipe: Recipe) -> TrainStage:
    # Checkpoints only at the end and validation only at the end: the runs are short.
    return TrainStage(
        steps=steps,
        learning_rate=lr,
        batch_size=recipe.batch_size,
        checkpoint_every=0,
        eval_every=0,
        log_every=max(1, steps // 10),
    )


def stages(pipeline: str, recipe: Recipe) -> tuple:
    """The stage tuple of ``pipeline`` (``"prune"`` or ``"quant"``).

    Raises:
      ValueError: unknown pipeline.
    """
    teacher = _train(recipe.teacher_steps, recipe.teacher_lr, recipe)
    if pipeline == "prune":
        prune = {"sparsity": recipe.sparsity, "schedule": "one_shot", "scorer": "magnitude"}
        return (
            teacher,
            PruneStage(**prune, train=None),
            PruneStage(
                **prune,
                train=TrainStage(
                    steps=recipe.steps,
                    learning_rate=recipe.learning_rate,
                    batch_size=recipe.batch_size,
                    checkpoint_every=0,
                    eval_every=0,
                ),
            ),
            DistillStage(
                teacher="0_train",
                student="1_prune",
                terms=(KDTermConfig(name="hinton", weight=recipe.alpha, options={"temperature": recipe.temperature}),),
                hard_weight=1.0 - recipe.alpha,
                train=_train(recipe.steps, recipe.learning_rate, recipe),  # keeps 1_prune's masks
            ),
        )
    if pipeline == "quant":
        quant = {"bits": recipe.bits, "method": recipe.method, "per_channel": True}
        finetune = _train(recipe.steps, recipe.qat_learning_rate, recipe)
        return (
            teacher,
            QuantizeStage(**quant),
            QATStage(**quant, train=finetune),
            DistillStage(
                teacher="0_train",
                student="1_quantize",
                terms=(KDTermConfig(name="hinton", weight=recipe.alpha, options={"temperature": recipe.temperature}),),
                hard_weight=1.0 - recipe.alpha,
                train=dataclasses.replace(finetune, keep_constraints=False),
            ),
        )
    raise ValueError(f"pipeline={pipeline!r} is not one of {PIPELINES}")


def stage_teacher_stages(pipeline: str, recipe: Recipe, kd: bool) -> tuple:
    """The stages of a ``*_stage`` pipeline; ``kd``: the last stage fine-tunes with the dense teacher.

    Raises:
      ValueError: unknown pipeline.
    """
    teacher = _train(recipe.teacher_steps, recipe.teacher_lr, recipe)
    kd_teacher = TeacherConfig(
        stage="0_train",
        terms=(KDTermConfig(name="hinton", weight=recipe.alpha, options={"temperature": recipe.temperature}),),
        hard_weight=1.0 - recipe.alpha,
    )
    lr = recipe.qat_learning_rate if pipeline == "quant_stage" else recipe.learning_rate
    tune = dataclasses.replace(_train(recipe.steps, lr, recipe), teacher=kd_teacher if kd else None)
    one_shot = {"sparsity": recipe.sparsity, "schedule": "one_shot", "scorer": "magnitude"}
    if pipeline == "prune_stage":
        return (teacher, PruneStage(**one_shot, train=None), PruneStage(**one_shot, train=tune))
    if pipeline == "gradual_stage":
        return (teacher, PruneStage(sparsity=recipe.sparsity, schedule="polynomial", train=tune))
    if pipeline == "quant_stage":
        quant = {"bits": recipe.bits, "method": recipe.method, "per_channel": True}
        return (teacher, QuantizeStage(**quant), QATStage(**quant, train=tune))
    raise ValueError(f"pipeline={pipeline!r} is not one of {STAGE_PIPELINES}")


def make_config(pipeline: str, recipe: Recipe = Recipe(), seed: int = 0, kd: bool = False) -> Config:
    """The :class:`~research.config.Config` of one pipeline and seed (``kd``: the KD arm of a ``*_stage`` pipeline)."""
    if pipeline in STAGE_PIPELINES:
        name, stage_tuple = f"kd_recovery-{pipeline}{'-kd' if kd else ''}", stage_teacher_stages(pipeline, recipe, kd)
    else:
        name = f"kd_recovery-{pipeline}" + (f"{recipe.bits}bit" if pipeline == "quant" else "")
        stage_tuple = stages(pipeline, recipe)
    return Config(
        name=name,
        seed=seed,
        model=ModelConfig(name=recipe.model),
        data=DataConfig(name=recipe.data, limit=recipe.limit),
        stages=stage_tuple,
    )


def get_config(arg: str | None = None) -> Config:
    """``arg``: ``prune`` or ``quant`` (or a ``*_stage`` pipeline), then optionally ``,quick``,
    ``,bits=N``, ``,cnn1d`` (MNIST-1D's CNN) and ``,kd`` (the KD arm of a ``*_stage`` pipeline),
    e.g. ``quant,bits=2,quick`` or ``prune_stage,cnn1d,kd``; default ``prune``.

    Raises:
      ValueError: an unknown word in ``arg``.
    """
    words = [w.strip() for w in (arg or "prune").split(",") if w.strip()]
    bits = [w for w in words if w.startswith("bits=") and w[5:].isdigit()]
    bad = [w for w in words if w not in (*PIPELINES, *STAGE_PIPELINES, "quick", "cnn1d", "kd", *bits)]
    pipelines = [w for w in words if w in PIPELINES + STAGE_PIPELINES]
    if bad or len(pipelines) != 1 or len(bits) > 1 or ("kd" in words and pipelines[0] not in STAGE_PIPELINES):
        raise ValueError(
            f"kd_recovery config arg {arg!r}: give one of {PIPELINES + STAGE_PIPELINES}, optionally with ',quick', "
            "',bits=N', ',cnn1d' and (for a *_stage pipeline) ',kd' (e.g. 'quant,bits=2,quick')"
        )
    recipe = CNN1D if "cnn1d" in words else Recipe()
    if "quick" in words:
        recipe = dataclasses.replace(recipe, teacher_steps=30, steps=10, batch_size=64, limit=256)
    if bits:
        recipe = dataclasses.replace(recipe, bits=int(bits[0][5:]))
    return make_config(pipelines[0], recipe, kd="kd" in words)
