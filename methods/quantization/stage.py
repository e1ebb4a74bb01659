"""The ``quantize`` (PTQ) and ``qat`` stages.

Example config stages (8-bit first and last layers, 4-bit LSQ elsewhere, then QAT)::

    stages=(
        TrainStage(steps=600),
        QATStage(bits=4, method="lsq", first_last_bits=8, train=TrainStage(steps=300, learning_rate=1e-3)),
    )

``quantize`` folds BatchNorm into the preceding layers, swaps in fake-quant layers by rules and
calibrates them on a fixed subset of the training split; no training. ``qat`` does the same
(unless the model is already fake-quantized by an earlier stage) and then fine-tunes with
:func:`research.stages.finetune`. Both put the export parameters
(:func:`methods.quantization.quant_params`) in ``bundle.extras["quant_params"]`` and report the
per-layer bits and the model's bytes at those bits.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from typing import ClassVar

from methods.quantization.calibration import calibrate
from methods.quantization.folding import find_conv_bn_pairs
from methods.quantization.folding import fold_batchnorm
from methods.quantization.folding import fold_recipe_step
from methods.quantization.folding import layer_order
from methods.quantization.modules import list_methods
from methods.quantization.observers import list_observers
from methods.quantization.quantizers import MAX_BITS
from methods.quantization.quantizers import MIN_BITS
from methods.quantization.report import layer_table
from methods.quantization.report import quant_layers
from methods.quantization.report import quant_params
from methods.quantization.report import quantized_bytes
from methods.quantization.surgery import QuantRule
from methods.quantization.surgery import float_layers
from methods.quantization.surgery import quant_static_recipe_step
from methods.quantization.surgery import quantize_model
from methods.quantization.surgery import quantize_recipe_step
from research import metrics as _metrics
from research import recipe as recipe_lib
from research.config import Check
from research.config import OneOf
from research.config import Range
from research.config import at_least_one
from research.data import calibration_subset
from research.stages import Bundle
from research.stages import StageConfig
from research.stages import StageContext
from research.stages import StageResult
from research.stages import TrainStage
from research.stages import accuracy
from research.stages import finetune
from research.stages import register_stage
from research.stages import train_kwargs


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
        "method": OneOf(list_methods, "quantization method"),
        "first_last_bits": OneOf([0, *range(MIN_BITS, MAX_BITS + 1)], "bit width (0: same as bits)", bad=(1, 9)),
        "observer": OneOf(list_observers, "observer"),
        "weight_observer": OneOf(list_observers, "observer"),
        "calibration_examples": at_least_one,
        "calibration_batch_size": at_least_one,
    }
    bits: int = 8
    method: str = "ste"
    per_channel: bool = True
    first_last_bits: int = 0
    rules: tuple[QuantRule, ...] = ()
    skip_first: bool = False
    skip_last: bool = False
    fold_bn: bool = True
    observer: str = "minmax"
    weight_observer: str = "minmax"
    calibration_examples: int = 512
    calibration_batch_size: int = 128

    def make_rules(self, order: list[str]) -> list[QuantRule]:
        """The rules of this stage (``order``: layer paths in execution order)."""
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


def _quantize(bundle: Bundle, cfg: QuantizeStage, ctx: StageContext):
    ds = bundle.dataset
    sample = ds.x_train[:2]
    notes = []
    model = bundle.model
    steps = []
    if cfg.fold_bn:
        pairs = find_conv_bn_pairs(model, sample)
        model = fold_batchnorm(model, sample)
        if pairs:
            notes.append(f"folded {len(pairs)} BatchNorm layers: " + ", ".join(b for _, b in pairs))
            steps.append(fold_recipe_step(pairs))
    order = layer_order(model, sample)
    rules = cfg.make_rules(order)
    qmodel = quantize_model(
        model,
        rules,
        sample_input=sample,
        skip_first=cfg.skip_first,
        skip_last=cfg.skip_last,
        seed=ctx.seed,
    )
    steps.append(
        quantize_recipe_step(
            rules, input_shape=ds.input_shape, skip_first=cfg.skip_first, skip_last=cfg.skip_last, seed=ctx.seed
        )
    )
    calib = calibration_subset(ds, cfg.calibration_examples, seed=ctx.seed)
    bs = cfg.calibration_batch_size
    batches = [calib[i : i + bs] for i in range(0, len(calib), bs)]
    t0 = time.perf_counter()
    qmodel = calibrate(qmodel, batches, cfg.observer, weight_observer=cfg.weight_observer)
    return qmodel, notes, time.perf_counter() - t0, steps


def _result(bundle: Bundle, model, metrics: dict, notes: list[str], steps: list[dict]) -> StageResult:
    floats = float_layers(model)
    if floats:
        notes.append("layers left in float: " + ", ".join(floats))
    qbytes = quantized_bytes(model)
    fp32 = _metrics.model_bytes(model, 32)
    metrics = {
        **metrics,
        "quantized_bytes": qbytes,
        "quantized_bitmask_bytes": quantized_bytes(model, bitmask=True),
        "compression_vs_fp32": fp32 / qbytes if qbytes else float("nan"),
        "float_layers": float(len(floats)),
    }
    extras = {**bundle.extras, "quant_params": quant_params(model)}
    recipe = recipe_lib.append(bundle.recipe, *steps, quant_static_recipe_step(model))
    return StageResult(
        bundle=dataclasses.replace(bundle, model=model, extras=extras, recipe=recipe),
        metrics=metrics,
        tables={"quant_layers": layer_table(model)},
        notes=notes,
    )


@register_stage(QuantizeStage)
def run_quantize(bundle: Bundle, cfg: QuantizeStage, ctx: StageContext) -> StageResult:
    """Post-training quantization of ``bundle.model``."""
    if quant_layers(bundle.model):
        raise ValueError("the model is already fake-quantized; put 'quantize' after float stages")
    qmodel, notes, seconds, steps = _quantize(bundle, cfg, ctx)
    return _result(bundle, qmodel, {"calibration_s": seconds}, notes, steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATStage(QuantizeStage):
    """Quantization-aware training from calibrated ranges.

    Attributes:
      train: the fine-tuning schedule (steps, learning rate, ...), run by
        :func:`research.stages.finetune`.
      (all :class:`QuantizeStage` fields, used when the model is not fake-quantized yet)
    """

    kind: ClassVar[str] = "qat"
    train: TrainStage = dataclasses.field(
        default_factory=lambda: TrainStage(steps=300, learning_rate=1e-4, eval_every=100)
    )


@register_stage(QATStage)
def run_qat(bundle: Bundle, cfg: QATStage, ctx: StageContext) -> StageResult:
    """Fake-quantizes (unless already done), calibrates, then fine-tunes ``bundle.model``."""
    notes: list[str] = []
    metrics: dict[str, float] = {}
    steps: list[dict] = []
    if quant_layers(bundle.model):
        qmodel = bundle.model
        notes.append("fine-tuned the fake-quant model of the previous stage")
    else:
        qmodel, notes, seconds, steps = _quantize(bundle, cfg, ctx)
        metrics["calibration_s"] = seconds
    ds = bundle.dataset
    if len(ds.x_val):
        metrics["ptq_val_accuracy"] = accuracy(qmodel, ds.x_val, ds.y_val)
    trained, _ = finetune(qmodel, ds, ctx, **train_kwargs(cfg.train))
    return _result(bundle, trained, metrics, notes, steps)
