"""The ``nas`` stage's config (standard library only: a config file imports it without JAX).

The run function is in :mod:`methods.nas.stage`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from research import names
from research.config import Check
from research.config import ConfigError
from research.config import Range
from research.config import Registered
from research.config import ValidationContext
from research.config import at_least_one
from research.config import nonnegative
from research.config import positive
from research.stages import StageConfig
from research.stages import TrainStage


@dataclasses.dataclass(frozen=True, kw_only=True)
class NASStage(StageConfig):
    """One-shot NAS on the current (family) model.

    Attributes:
      supernet_steps: sandwich-rule optimizer steps.
      n_random: random sub-networks per step besides the largest and smallest.
      learning_rate: peak Adam learning rate of the supernet.
      batch_size: supernet batch size.
      temperature: in-place distillation temperature.
      progressive: progressive shrinking (``methods.nas.progressive_phases``): the first quarter
        of the steps trains the largest member alone, then kernel, depth (expansion) and width
        choices are freed in turn; ``False``: the whole family from the first step.
      trials: sub-networks the search evaluates.
      batch: sub-networks evaluated together (vmapped) per search round.
      sampler: a registered ``research.automl`` sampler (``tpe``, ``gp``, ``random``, ``sobol``, ...).
      calib_batches: BatchNorm recalibration batches per sub-network (families with BatchNorm).
      max_flops: pick the most accurate front member within this many FLOPs (0: no limit).
      train: the fine-tuning schedule of the chosen member (override keys
        ``stages.nas.train.<field>``). Its earlier name ``finetune`` still works for one release,
        with a ``DeprecationWarning``.
    """

    kind: ClassVar[str] = "nas"
    checks: ClassVar[Mapping[str, Check]] = {
        "supernet_steps": at_least_one,
        "n_random": nonnegative,
        "learning_rate": positive,
        "batch_size": at_least_one,
        "temperature": positive,
        "trials": Range(lo=2),
        "batch": at_least_one,
        "sampler": Registered(names.SAMPLERS),
        "calib_batches": at_least_one,
        "max_flops": nonnegative,
    }
    renamed: ClassVar[Mapping[str, str]] = {"finetune": "train"}
    supernet_steps: int = 1000
    n_random: int = 2
    learning_rate: float = 3e-3
    batch_size: int = 128
    temperature: float = 1.0
    progressive: bool = False
    trials: int = 48
    batch: int = 16
    sampler: str = "tpe"
    calib_batches: int = 4
    max_flops: float = 0.0
    train: TrainStage = dataclasses.field(default_factory=lambda: TrainStage(steps=300, learning_rate=1e-3))

    def check(self, key: str, context: ValidationContext) -> None:
        if self.batch > self.trials:
            raise ConfigError(f"{key}.batch={self.batch} is more than {key}.trials={self.trials}; lower batch")
