"""The ``prune`` stage's config (standard library only: a config file imports it without JAX).

Example config entries::

    PruneStage(sparsity=0.9, schedule="polynomial", train=TrainStage(steps=300))   # unstructured
    PruneStage(channel_ratio=0.5, sparsity=0.0, train=TrainStage(steps=200))       # remove half the channels
    PruneStage(sparsity=0.5, schedule="one_shot", train=None)                      # masks only, no fine-tuning

The run function is in :mod:`methods.pruning.stage`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar
from typing import Literal

from methods.pruning import names
from methods.pruning.rules import ChannelRule
from methods.pruning.rules import SparsityRule
from research.config import Check
from research.config import ConfigError
from research.config import Each
from research.config import InstancesOf
from research.config import Range
from research.config import Registered
from research.config import ValidationContext
from research.config import at_least_one
from research.stages import StageConfig
from research.stages import TrainStage


def _scores():
    from methods.pruning import scores  # pylint: disable=import-outside-toplevel

    return scores


def _default_train() -> TrainStage:
    return TrainStage(steps=300, learning_rate=1e-3, batch_size=128, checkpoint_every=100, eval_every=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneStage(StageConfig):
    """Prune the current model and fine-tune it with the masks held at zero.

    Attributes:
      sparsity: final unstructured (or block) sparsity of the selected leaves; 0 = no masks.
      schedule: ``polynomial`` (Zhu & Gupta ramp over the first ``ramp_fraction`` of steps),
        ``iterative`` (``rounds`` equal-rate rounds) or ``one_shot`` (at step 0).
      ramp_fraction: fraction of ``train.steps`` over which the sparsity ramps up.
      rounds: rounds of the iterative schedule.
      frequency: steps between mask updates (0 = ``train.steps // 20``).
      scorer: ``magnitude``, ``random`` or ``saliency``.
      allocation: ``layerwise``, ``global`` or ``erk``.
      pattern: ``unstructured``, ``nm`` (``n`` of every ``m``, sparsity fixed to ``1 - n/m``) or
        ``block`` (``block`` tiles).
      rules: :class:`~methods.pruning.SparsityRule` s (empty = every kernel).
      channel_ratio: fraction of channels removed physically (before fine-tuning); 0 = none.
      channel_score: ``l1``, ``l2``, ``bn_scale`` or ``taylor``.
      channel_rules: :class:`~methods.pruning.ChannelRule` s giving per-group removal ratios
        (matched against each coupled group's producer paths, first match wins; groups no rule
        matches keep every channel; a rule with ``ratio=None`` uses ``channel_ratio``). Empty =
        ``channel_ratio`` for every group.
      train: the fine-tuning schedule (override keys ``stages.prune.train.<field>``). ``None``
        (``one_shot`` schedule only) applies the one-shot masks without fine-tuning, e.g. to
        measure the pruned model before a later stage (distillation) trains it.

    The flat ``steps``, ``learning_rate``, ``batch_size``, ``optimizer`` and ``checkpoint_every``
    of earlier releases still work (as keywords and ``--set`` keys) with a ``DeprecationWarning``;
    ``steps=0`` means ``train=None``.
    """

    kind: ClassVar[str] = "prune"
    checks: ClassVar[Mapping[str, Check]] = {
        "sparsity": Range(lo=0, hi=1, hi_open=True, hint="the fraction of weights removed, e.g. 0.9"),
        "ramp_fraction": Range(lo=0, hi=1, lo_open=True),
        "rounds": at_least_one,
        "frequency": Range(lo=0, hint="0 updates the masks every train.steps // 20"),
        "scorer": Registered(names.SCORERS),
        "n": at_least_one,
        "m": Range(lo=2),
        "block": Each(at_least_one),
        "channel_ratio": Range(lo=0, hi=1, hi_open=True, hint="the fraction of channels removed"),
        "channel_score": Registered(names.CHANNEL_SCORES),
        "rules": InstancesOf(SparsityRule, "give methods.pruning.SparsityRule(pattern=...)"),
        "channel_rules": InstancesOf(ChannelRule, "give methods.pruning.ChannelRule(pattern=..., ratio=...)"),
    }
    renamed: ClassVar[Mapping[str, str]] = {
        "steps": "train.steps",
        "learning_rate": "train.learning_rate",
        "batch_size": "train.batch_size",
        "optimizer": "train.optimizer",
        "checkpoint_every": "train.checkpoint_every",
    }
    sparsity: float = 0.9
    schedule: Literal["polynomial", "iterative", "one_shot"] = "polynomial"
    ramp_fraction: float = 0.7
    rounds: int = 3
    frequency: int = 0
    scorer: str = "magnitude"
    allocation: Literal["layerwise", "global", "erk"] = "layerwise"
    pattern: Literal["unstructured", "nm", "block"] = "unstructured"
    n: int = 2
    m: int = 4
    block: tuple[int, int] = (4, 4)
    rules: tuple[Any, ...] = ()
    channel_ratio: float = 0.0
    channel_score: str = "l1"
    channel_rules: tuple[Any, ...] = ()
    train: TrainStage | None = dataclasses.field(default_factory=_default_train)

    @property
    def steps(self) -> int:
        """Fine-tuning steps (0 without fine-tuning)."""
        return self.train.steps if self.train is not None else 0

    def check(self, key: str, context: ValidationContext) -> None:
        if self.pattern == "nm" and not self.n < self.m:
            raise ConfigError(f"{key}.n={self.n} must be less than {key}.m={self.m} (keep n of every m weights)")
        if self.train is None and self.schedule != "one_shot":
            raise ConfigError(
                f"{key}.train=None needs {key}.schedule='one_shot' (got {self.schedule!r}): only a "
                "one-shot prune needs no training; set schedule='one_shot' or give a train schedule"
            )
        if self.train is None and _scores().get_scorer(self.scorer).needs_grad:
            raise ConfigError(
                f"{key}.train=None cannot use {key}.scorer={self.scorer!r}, which needs gradients; "
                "use 'magnitude' or 'random', or give a train schedule"
            )
