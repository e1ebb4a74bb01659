"""The ``quantize`` and ``qat`` stages' configs (standard library only: a config file imports them without JAX).

Example config entries::

    QuantizeStage(bits=8, per_channel=True, calibration_examples=256)
    QATStage(bits=4, method="lsq", first_last_bits=8, train=TrainStage(steps=300, learning_rate=1e-3))
    KurtosisStage(weight=0.01, train=TrainStage(steps=300, learning_rate=1e-3))  # before a full-int8 export
    NormEpsilonStage(steps=5.0)  # LayerNorm epsilon floor + fine-tuning, before a full-int8 export

The run functions are in :mod:`methods.quantization.stage`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any
from typing import ClassVar

from methods.quantization import names
from methods.quantization.rules import MAX_BITS
from methods.quantization.rules import MIN_BITS
from methods.quantization.rules import QuantRule
from research.config import Check
from research.config import InstancesOf
from research.config import OneOf
from research.config import Range
from research.config import Registered
from research.config import at_least_one
from research.stages import StageConfig
from research.stages import TrainStage


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeStage(StageConfig):
    """Post-training quantization: fold BN, swap in fake-quant layers, calibrate.

    Attributes:
      bits: bit width of kernels and input activations (when ``rules`` is empty).
      method: ``"ste"``, ``"lsq"`` or ``"pact"`` (when ``rules`` is empty).
      per_channel: per-output-channel kernel scales (when ``rules`` is empty).
      first_last_bits: bits of the first and last layer to run (0: same as ``bits``); mixed
        precision without writing rules.
      rules: explicit :class:`QuantRule` list (overrides the four fields above).
      skip_first: keep the first layer in float.
      skip_last: keep the last layer in float.
      fold_bn: fold BatchNorm into the preceding conv/linear first.
      observer: activation observer (``minmax``, ``moving_average``, ``percentile``, ``mse``).
      weight_observer: kernel observer.
      calibration_examples: training examples used for calibration.
      calibration_batch_size: calibration batch size.
    """

    kind: ClassVar[str] = "quantize"
    checks: ClassVar[Mapping[str, Check]] = {
        "bits": Range(lo=MIN_BITS, hi=MAX_BITS, hint="the kernel and activation bit width"),
        "method": Registered(names.QUANT_METHODS),
        "first_last_bits": OneOf([0, *range(MIN_BITS, MAX_BITS + 1)], "bit width (0: same as bits)", bad=(1, 9)),
        "observer": Registered(names.OBSERVERS),
        "weight_observer": Registered(names.OBSERVERS),
        "calibration_examples": at_least_one,
        "calibration_batch_size": at_least_one,
        "rules": InstancesOf(QuantRule, "give methods.quantization.QuantRule(pattern=...)"),
    }
    bits: int = 8
    method: str = "ste"
    per_channel: bool = True
    first_last_bits: int = 0
    rules: tuple[Any, ...] = ()
    skip_first: bool = False
    skip_last: bool = False
    fold_bn: bool = True
    observer: str = "minmax"
    weight_observer: str = "minmax"
    calibration_examples: int = 512
    calibration_batch_size: int = 128

    def make_rules(self, order: list[str]) -> list[Any]:
        """The :class:`~methods.quantization.QuantRule` s of this stage (``order``: layer paths in execution order)."""
        if self.rules:
            return list(self.rules)
        rules = []
        if self.first_last_bits and order:
            ends = sorted({order[0], order[-1]})
            pattern = "^(" + "|".join(re.escape(p) for p in ends) + ")$"
            rules.append(
                QuantRule(
                    pattern=pattern,
                    bits=self.first_last_bits,
                    method=self.method,
                    per_channel=self.per_channel,
                )
            )
        rules.append(QuantRule(pattern=".*", bits=self.bits, method=self.method, per_channel=self.per_channel))
        return rules


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATStage(QuantizeStage):
    """Quantization-aware training from calibrated ranges.

    Attributes:
      train: the fine-tuning schedule (steps, learning rate, ...; override keys
        ``stages.qat.train.<field>``), run by :func:`research.train.finetune`.
      kurtosis_weight: weight of the activation-kurtosis penalty added to the fine-tuning loss
        (:func:`methods.quantization.kurtosis.kurtosis_regularizer`, target 3); 0 (default): off.
      (all :class:`QuantizeStage` fields, used when the model is not fake-quantized yet)
    """

    kind: ClassVar[str] = "qat"
    checks: ClassVar[Mapping[str, Check]] = {
        **QuantizeStage.checks,
        "kurtosis_weight": Range(lo=0, hint="the activation-kurtosis penalty's weight; 0 turns it off"),
    }
    train: TrainStage = dataclasses.field(
        default_factory=lambda: TrainStage(steps=300, learning_rate=1e-4, eval_every=100)
    )
    kurtosis_weight: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class KurtosisStage(StageConfig):
    """Fine-tunes the float model with an activation-kurtosis penalty, before a full-integer export.

    The loss is the task loss (and the schedule's teacher's terms, if any) plus
    ``weight * mean over activations of max(kurtosis - target, 0)``
    (:mod:`methods.quantization.kurtosis`): heavy-tailed activations, which a per-tensor int8 grid
    rounds coarsely, are pulled towards a Gaussian's shape. The model stays float (no fake-quant
    layers); follow it with ``ExportStage(quantize="int8")``. Earlier stages' constraints (pruning
    masks) are kept as in every fine-tuning stage.

    Attributes:
      weight: the penalty's weight (> 0; 0.01 on the attention + GRU zoo model cost 0-1 point of
        test accuracy; 0.1 cost about 2).
      target: kurtosis above which a tensor is penalised (>= 1; 3 is a Gaussian's).
      train: the fine-tuning schedule (override keys ``stages.kurtosis.train.<field>``).
    """

    kind: ClassVar[str] = "kurtosis"
    checks: ClassVar[Mapping[str, Check]] = {
        "weight": Range(lo=0, lo_open=True, hint="the penalty's weight; without a penalty use a 'train' stage"),
        "target": Range(lo=1, hint="every distribution's kurtosis is >= 1; 3 is a Gaussian's"),
    }
    weight: float = 0.01
    target: float = 3.0
    train: TrainStage = dataclasses.field(
        default_factory=lambda: TrainStage(steps=300, learning_rate=1e-3, schedule="constant", eval_every=100)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormEpsilonStage(StageConfig):
    """Raises every LayerNorm/RMSNorm epsilon to a floor on the int8 grid, then fine-tunes.

    ``epsilon = max(epsilon, steps * v_max / (2**bits - 1))`` per norm, ``v_max`` the largest
    per-token variance of its input on ``calibration_examples`` training inputs
    (:func:`methods.quantization.norm_epsilon.int8_norm_epsilon`): in a full-integer export the
    ``var + epsilon`` of all tokens shares one int8 grid, and quiet tokens' variances would be a
    fraction of a step. The changed model is fine-tuned with ``train`` (earlier constraints kept, a
    teacher through ``train.teacher``, as in every fine-tuning stage). Follow it with
    ``ExportStage(quantize="int8", activation_calibration="percentile")``.

    Attributes:
      steps: the floor in grid steps (> 0; 5 on the attention + GRU zoo model).
      bits: the activations' bit width (8 for a full-int8 export).
      calibration_examples: training inputs the variances are measured on.
      train: the fine-tuning schedule (override keys ``stages.norm_epsilon.train.<field>``).
    """

    kind: ClassVar[str] = "norm_epsilon"
    checks: ClassVar[Mapping[str, Check]] = {
        "steps": Range(lo=0, lo_open=True, hint="the epsilon floor in int8 grid steps; 5 bounds rounding at 10%"),
        "bits": Range(lo=2, hi=16, hint="8 for a full-int8 export"),
        "calibration_examples": Range(lo=1, hint="training inputs the variances are measured on"),
    }
    steps: float = 5.0
    bits: int = 8
    calibration_examples: int = 256
    train: TrainStage = dataclasses.field(
        default_factory=lambda: TrainStage(steps=300, learning_rate=1e-3, schedule="constant", eval_every=100)
    )
