"""The ``decompose`` stage's config (standard library only: a config file imports it without JAX).

Example config entry::

    DecomposeStage(rules=(DecompositionRule(pattern="conv", vbmf=True),), train=TrainStage(steps=300))

The run function is in :mod:`methods.decomposition.stage`; the rules
(:class:`~methods.decomposition.DecompositionRule`) are in the light :mod:`methods.decomposition.rules`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar

from methods.decomposition.rules import DecompositionRule
from methods.decomposition.rules import ModelBudget
from research.config import Check
from research.config import ConfigError
from research.config import InstancesOf
from research.config import NonEmpty
from research.config import Range
from research.config import ValidationContext
from research.config import at_least_one
from research.config import fraction
from research.config import positive
from research.stages import StageConfig
from research.stages import TrainStage


@dataclasses.dataclass(frozen=True)
class Rules(Check):
    """A non-empty tuple of :class:`~methods.decomposition.DecompositionRule` s."""

    def check(self, value, key, context):
        NonEmpty(hint="add e.g. DecompositionRule(pattern='conv', vbmf=True)").check(value, key, context)
        InstancesOf(DecompositionRule, "give methods.decomposition.DecompositionRule(pattern=...)").check(
            value, key, context
        )

    def bad_values(self):
        return ((), ("not a rule",))


def _default_rules() -> tuple[Any, ...]:
    return (DecompositionRule(pattern=".*", vbmf=True),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecomposeStage(StageConfig):
    """Factorize matched layers of the current model and fine-tune it.

    Attributes:
      rules: :class:`DecompositionRule` tuple (first match wins) over module paths.
      budget_param_ratio: whole-model parameter budget for rules without a rank criterion (0 = none).
      budget_flop_ratio: whole-model FLOP budget for rules without a rank criterion (0 = none).
      check_speed: time each layer dense vs factorized and keep the slower form dense.
      min_speedup: a factorized layer must be at least this much faster to be kept.
      speed_batch_size: batch size of the timing input (taken from the test split).
      repeats: timed repeats per layer (median).
      distill: fine-tune with Hinton KD from the model as it was before this stage: shorthand for
        ``train.teacher=TeacherConfig(stage="input", terms=(KDTermConfig(name="hinton",
        weight=alpha, options={"temperature": temperature}),), hard_weight=1 - alpha)``
        (``train.teacher`` takes any teacher and KD terms).
      temperature, alpha: KD temperature and soft-loss weight of ``distill``.
      train: the fine-tuning schedule (override keys ``stages.decompose.train.<field>``);
        ``None`` skips fine-tuning. Its earlier name ``finetune`` (keyword and ``--set`` key
        ``stages.decompose.finetune.<field>``) still works for one release, with a ``DeprecationWarning``.
    """

    kind: ClassVar[str] = "decompose"
    checks: ClassVar[Mapping[str, Check]] = {
        "rules": Rules(),
        "budget_param_ratio": Range(lo=0, hi=1, hint="0 = no whole-model parameter budget"),
        "budget_flop_ratio": Range(lo=0, hi=1, hint="0 = no whole-model FLOP budget"),
        "min_speedup": positive,
        "speed_batch_size": at_least_one,
        "repeats": at_least_one,
        "temperature": positive,
        "alpha": fraction,
    }
    renamed: ClassVar[Mapping[str, str]] = {"finetune": "train"}
    rules: tuple[Any, ...] = dataclasses.field(default_factory=_default_rules)
    budget_param_ratio: float = 0.0
    budget_flop_ratio: float = 0.0
    check_speed: bool = True
    min_speedup: float = 1.0
    speed_batch_size: int = 32
    repeats: int = 20
    distill: bool = False
    temperature: float = 4.0
    alpha: float = 0.9
    train: TrainStage | None = dataclasses.field(
        default_factory=lambda: TrainStage(steps=300, learning_rate=3e-4, eval_every=100)
    )

    def check(self, key: str, context: ValidationContext) -> None:
        if self.distill and self.train is not None and self.train.teacher is not None:
            raise ConfigError(
                f"{key}.distill=True and {key}.train.teacher are both set; keep train.teacher "
                "(distill=True is its shorthand for a Hinton teacher of stage='input')"
            )
        if self.budget_param_ratio and self.budget_flop_ratio:
            raise ConfigError(
                f"set at most one of {key}.budget_param_ratio={self.budget_param_ratio}, "
                f"{key}.budget_flop_ratio={self.budget_flop_ratio}"
            )

    def budget(self) -> Any:
        """The whole-model :class:`~methods.decomposition.surgery.ModelBudget` (``None``: no budget)."""
        if self.budget_param_ratio:
            return ModelBudget(param_ratio=self.budget_param_ratio)
        if self.budget_flop_ratio:
            return ModelBudget(flop_ratio=self.budget_flop_ratio)
        return None
