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

from flax import nnx

from methods.quantization.calibration import calibrate
from methods.quantization.config import KurtosisStage
from methods.quantization.config import NormEpsilonStage
from methods.quantization.config import QATStage
from methods.quantization.config import QuantizeStage
from methods.quantization.folding import find_conv_bn_pairs
from methods.quantization.folding import fold_batchnorm
from methods.quantization.folding import fold_recipe_step
from methods.quantization.folding import layer_order
from methods.quantization.kurtosis import kurtosis_penalty
from methods.quantization.kurtosis import kurtosis_regularizer
from methods.quantization.modules import FakeQuant
from methods.quantization.modules import QuantRange
from methods.quantization.norm_epsilon import int8_norm_epsilon
from methods.quantization.norm_epsilon import norm_epsilon_recipe_step
from methods.quantization.report import layer_table
from methods.quantization.report import quant_layers
from methods.quantization.report import quant_params
from methods.quantization.report import quantized_bytes
from methods.quantization.surgery import float_layers
from methods.quantization.surgery import quant_static_recipe_step
from methods.quantization.surgery import quantize_model
from methods.quantization.surgery import quantize_recipe_step
from research import constraints as constraints_lib
from research import metrics as _metrics
from research import recipe as recipe_lib
from research.data import calibration_subset
from research.metrics import accuracy
from research.nn import iter_modules
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageResult
from research.stages import fine_tune
from research.stages import register_stage
from research.tree import flatten_with_paths


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


def quantizer_ranges(model: nnx.Module) -> tuple[dict, list[str]]:
    """``({path: value}, trainable paths)`` of every fake-quant range (observed ends, LSQ steps, PACT clips)."""
    ranges, trainable = {}, []
    for path, mod in iter_modules(model):
        if not isinstance(mod, FakeQuant):
            continue
        prefix = f"{path}/" if path else ""
        for kind, flt in (("range", QuantRange), ("param", nnx.Param)):
            for p, v in flatten_with_paths(nnx.to_pure_dict(nnx.state(mod, flt))):
                ranges[prefix + p] = v
                if kind == "param":
                    trainable.append(prefix + p)
    return ranges, trainable


def _result(
    bundle: Bundle, model, metrics: dict, notes: list[str], steps: list[dict], ctx: StageContext
) -> StageResult:
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
    ranges, trainable = quantizer_ranges(model)
    extras = constraints_lib.declare_quantized(extras, ranges, trainable, stage=ctx.label)
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
    return _result(bundle, qmodel, {"calibration_s": seconds}, notes, steps, ctx)


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
    transforms = (kurtosis_regularizer(cfg.kurtosis_weight),) if cfg.kurtosis_weight else ()
    done = fine_tune(bundle, qmodel, cfg.train, ctx, input_model=bundle.model, loss_transforms=transforms)
    notes += done.notes
    metrics.update(done.metrics)
    if transforms:
        metrics.update(_last_penalty(done.records))
    return _result(bundle, done.model, metrics, notes, steps, ctx)


def _last_penalty(records: list[dict]) -> dict[str, float]:
    rows = [r for r in records if r.get("split") == "train" and "kurtosis_penalty" in r]
    return {"final_kurtosis_penalty": float(rows[-1]["kurtosis_penalty"])} if rows else {}


#: Training examples the ``kurtosis`` stage measures the penalty on, before and after.
KURTOSIS_PROBE_EXAMPLES = 256


@register_stage(KurtosisStage)
def run_kurtosis(bundle: Bundle, cfg: KurtosisStage, ctx: StageContext) -> StageResult:
    """Fine-tunes the float ``bundle.model`` with the activation-kurtosis penalty; reports the
    penalty on a fixed training subset before and after (evaluation mode)."""
    if quant_layers(bundle.model):
        raise ValueError(
            "the 'kurtosis' stage fine-tunes a float model, and this one is already fake-quantized; put it "
            "before 'quantize'/'qat', or use QATStage(kurtosis_weight=...) to add the penalty to QAT"
        )
    probe = calibration_subset(bundle.dataset, KURTOSIS_PROBE_EXAMPLES, seed=ctx.seed)
    measure = nnx.jit(lambda m, x: kurtosis_penalty(m, x, target=cfg.target))

    def penalty(model) -> float:
        model = nnx.clone(model)
        model.eval()
        return float(measure(model, probe))

    before = penalty(bundle.model)
    t0 = time.perf_counter()
    transform = kurtosis_regularizer(cfg.weight, target=cfg.target)
    done = fine_tune(bundle, bundle.model, cfg.train, ctx, loss_transforms=(transform,))
    seconds = time.perf_counter() - t0
    metrics = {
        **done.metrics,
        **_last_penalty(done.records),
        "kurtosis_penalty_before": before,
        "kurtosis_penalty_after": penalty(done.model),
        "finetune_s": seconds,
    }
    if len(bundle.dataset.x_val):
        metrics["val_accuracy"] = accuracy(done.model, bundle.dataset.x_val, bundle.dataset.y_val)
    notes = [
        *done.notes,
        f"activation-kurtosis penalty (weight {cfg.weight:g}, target {cfg.target:g}) on a fixed subset of "
        f"{len(probe)} training inputs: {before:.3g} -> {metrics['kurtosis_penalty_after']:.3g}",
    ]
    return StageResult(bundle=dataclasses.replace(bundle, model=done.model), metrics=metrics, notes=notes)


@register_stage(NormEpsilonStage)
def run_norm_epsilon(bundle: Bundle, cfg: NormEpsilonStage, ctx: StageContext) -> StageResult:
    """Raises the float ``bundle.model``'s norm epsilons to ``cfg.steps`` int8 grid steps
    (:func:`methods.quantization.norm_epsilon.int8_norm_epsilon`) and fine-tunes it; reports each
    norm's epsilon before and after."""
    if quant_layers(bundle.model):
        raise ValueError(
            "the 'norm_epsilon' stage changes a float model, and this one is already fake-quantized; put it "
            "before 'quantize'/'qat' (and before the int8 export)"
        )
    x = calibration_subset(bundle.dataset, cfg.calibration_examples, seed=ctx.seed)
    model, changed = int8_norm_epsilon(bundle.model, x, steps=cfg.steps, bits=int(cfg.bits))
    t0 = time.perf_counter()
    done = fine_tune(bundle, model, cfg.train, ctx)
    metrics = {
        **done.metrics,
        **{f"epsilon/{path}": new for path, (_, new) in changed.items()},
        "finetune_s": time.perf_counter() - t0,
    }
    if len(bundle.dataset.x_val):
        metrics["val_accuracy"] = accuracy(done.model, bundle.dataset.x_val, bundle.dataset.y_val)
    notes = [
        *done.notes,
        f"norm epsilons raised to {cfg.steps:g} steps of their variance's {cfg.bits}-bit grid "
        f"({len(x)} training inputs): "
        + ", ".join(f"{path or '<root>'} {old:.3g} -> {new:.3g}" for path, (old, new) in changed.items()),
    ]
    recipe = recipe_lib.append(bundle.recipe, norm_epsilon_recipe_step(changed))
    return StageResult(
        bundle=dataclasses.replace(bundle, model=done.model, recipe=recipe), metrics=metrics, notes=notes
    )
