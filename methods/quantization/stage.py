"""The ``quantize`` (PTQ) and ``qat`` stages.

Example config stages (8-bit first and last layers, 4-bit LSQ elsewhere, then QAT)::

    stages=(
        TrainStage(steps=600),
        QATStage(bits=4, method="lsq", first_last_bits=8, train=TrainStage(steps=300, learning_rate=1e-3)),
    )

``quantize`` folds BatchNorm into the preceding layers, swaps in fake-quant layers by rules and
calibrates them on a fixed subset of the training split; no training. ``qat`` does the same
(unless the model is already fake-quantized by an earlier stage) and then fine-tunes with
:func:`research.train.finetune`. Both put the export parameters
(:func:`methods.quantization.quant_params`) in ``bundle.extras["quant_params"]`` and report the
per-layer bits and the model's bytes at those bits.
"""

from __future__ import annotations

import dataclasses
import time

from methods.quantization.calibration import calibrate
from methods.quantization.config import QATStage
from methods.quantization.config import QuantizeStage
from methods.quantization.folding import find_conv_bn_pairs
from methods.quantization.folding import fold_batchnorm
from methods.quantization.folding import fold_recipe_step
from methods.quantization.folding import layer_order
from methods.quantization.report import layer_table
from methods.quantization.report import quant_layers
from methods.quantization.report import quant_params
from methods.quantization.report import quantized_bytes
from methods.quantization.surgery import float_layers
from methods.quantization.surgery import quant_static_recipe_step
from methods.quantization.surgery import quantize_model
from methods.quantization.surgery import quantize_recipe_step
from research import metrics as _metrics
from research import recipe as recipe_lib
from research.data import calibration_subset
from research.metrics import accuracy
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import context_kwargs
from research.stages import register_stage
from research.stages import train_kwargs
from research.train import finetune


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
    trained, _ = finetune(qmodel, ds, **context_kwargs(ctx), **train_kwargs(cfg.train))
    return _result(bundle, trained, metrics, notes, steps)
