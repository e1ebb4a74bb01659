"""Half the attention heads of a small ViT removed, then int8: does distilling from the dense ViT help?

For each seed, on ``digits`` (8x8 images, split by the seed):

1. ``dense``: the zoo ``vit`` trained from scratch (Adam, ``train_steps``);
2. ``pruned``: 50% of the heads of every attention layer physically removed
   (:func:`methods.pruning.remove_channels` with a rule on the q/k/v projections; MLP units
   kept), no training;
3. two fine-tunings of the pruned model with the same steps, optimizer and batches:
   ``plain`` (cross-entropy) and ``kd`` (cross-entropy + Hinton KD on the logits + the
   ``attention_map`` term on every attention layer, teacher = the dense ViT);
4. each model exported to TFLite int8 (full-integer, calibrated on 256 training images) and
   run in LiteRT: test accuracy of the **int8 file**, its size in bytes, and its median latency
   (batch 8, one thread) next to the JAX float accuracy.

The table gives mean and standard deviation over seeds. Latency is a CPU wall-time median on a
shared machine: compare rows of the same run only.

References:
  Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?", https://arxiv.org/abs/1905.10650
  Hinton, Vinyals & Dean, https://arxiv.org/abs/1503.02531
  Wang et al., "MiniLM", https://arxiv.org/abs/2002.10957
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import warnings

import jax
import numpy as np
import optax
from flax import nnx

from methods.distillation.transforms import hinton_term
from methods.distillation.transforms import make_kd_term
from methods.distillation.transforms import weighted_sum
from methods.pruning.structured import ChannelRule
from methods.pruning.structured import StructuredPruningWarning
from methods.pruning.structured import remove_channels
from research.data import load_dataset
from research.export import export
from research.nn import build_model
from research.nn import param_count
from research.report import format_table
from research.train import create_train_state
from research.train import make_train_step
from research.train import merge_model
from research.train import train_scan


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """Sizes of the experiment (the defaults are the reported run)."""

    train_steps: int = 1500
    finetune_steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    temperature: float = 4.0
    kd_weight: float = 0.9
    attention_weight: float = 1.0
    head_ratio: float = 0.5
    model_options: tuple[tuple[str, object], ...] = ()


QUICK = Recipe(train_steps=100, finetune_steps=20)


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.asarray(nnx.jit(lambda m, v: m(v))(model, x)).argmax(-1) == y))


def finetune(model, ds, recipe: Recipe, *, teacher=None, seed: int = 0):
    """Fine-tunes a copy of ``model``; with ``teacher``, Hinton KD + attention-map transfer."""
    tx = optax.adam(recipe.learning_rate)
    defs, state = create_train_state(nnx.clone(model), tx, seed=seed)
    transforms = []
    if teacher is not None:
        attn = [p for p, m in nnx.iter_modules(model) if isinstance(m, nnx.MultiHeadAttention)]
        pairs = ["/".join(str(k) for k in p) for p in attn]
        terms = [(recipe.kd_weight, hinton_term(recipe.temperature))]
        terms.append((recipe.attention_weight, make_kd_term("attention_map", pairs=[(p, p) for p in pairs])))
        transforms.append(weighted_sum(None, teacher, terms, hard_weight=1.0 - recipe.kd_weight))
    step = make_train_step(defs, tx, loss_transforms=transforms)
    idx = np.random.default_rng(seed).integers(0, len(ds.x_train), size=(recipe.finetune_steps, recipe.batch_size))
    for i in idx:
        state, _ = step(state, {"x": ds.x_train[i], "y": ds.y_train[i]})
    out = merge_model(defs.eval, state.params, state.model_state)
    out.eval()
    return out


def _int8(model, ds, out_dir) -> dict:
    from research.export import TFLiteRunner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export(
            model,
            ds.x_test[:8],
            formats=("tflite",),
            out_dir=out_dir,
            quantize=("int8",),
            calibration=ds.x_train[:256],
            latency_repeats=50,
        )
    a = report["tflite_int8"]
    preds = TFLiteRunner(a.path)(ds.x_test).argmax(-1)
    return {"int8_acc": float(np.mean(preds == ds.y_test)), "bytes": a.size_bytes, "latency_ms": a.latency_ms}


def run_seed(recipe: Recipe, seed: int, workdir: str) -> dict[str, dict]:
    """The four models of one seed: float accuracy, int8-file accuracy, bytes, latency, parameters."""
    ds = load_dataset("digits", seed=seed)
    opts = dict(recipe.model_options)
    dense = build_model(
        "vit", input_shape=ds.x_train.shape[1:], num_classes=ds.num_classes, rngs=nnx.Rngs(seed), **opts
    )
    train_scan(dense, ds.x_train, ds.y_train, steps=recipe.train_steps, batch_size=128, seed=seed)
    rules = [ChannelRule(pattern="attn/(query|key|value)$", ratio=recipe.head_ratio)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StructuredPruningWarning)  # the residual stream stays whole
        pruned = remove_channels(dense, jax.numpy.asarray(ds.x_train[:8]), recipe.head_ratio, rules=rules)
    models = {
        "dense": dense,
        "pruned": pruned,
        "plain": finetune(pruned, ds, recipe, seed=seed),
        "kd": finetune(pruned, ds, recipe, teacher=dense, seed=seed),
    }
    rows = {}
    for arm, model in models.items():
        row = {"float_acc": _accuracy(model, ds.x_test, ds.y_test), "params": param_count(model)}
        row["heads"] = [m.num_heads for _, m in nnx.iter_modules(model) if isinstance(m, nnx.MultiHeadAttention)]
        row.update(_int8(model, ds, f"{workdir}/seed{seed}_{arm}"))
        rows[arm] = row
    return rows


def _mean_std(values) -> str:
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def run_experiment(recipe: Recipe, seeds: tuple[int, ...], workdir: str | None = None) -> dict:
    """Runs every seed; prints and returns the table (per seed and aggregated)."""
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = {s: run_seed(recipe, s, workdir or tmp) for s in seeds}
    arms = ("dense", "pruned", "plain", "kd")
    table = []
    for arm in arms:
        rows = [per_seed[s][arm] for s in seeds]
        table.append(
            {
                "model": arm,
                "heads": "/".join(str(h) for h in rows[0]["heads"]),
                "params": rows[0]["params"],
                "float acc": _mean_std(r["float_acc"] for r in rows),
                "int8 acc (LiteRT)": _mean_std(r["int8_acc"] for r in rows),
                "int8 bytes": int(statistics.mean(r["bytes"] for r in rows)),
                "latency ms (b=8)": f"{statistics.median(r['latency_ms'] for r in rows):.3f}",
            }
        )
    print(format_table(table))
    return {"recipe": dataclasses.asdict(recipe), "seeds": list(seeds), "per_seed": per_seed, "table": table}
