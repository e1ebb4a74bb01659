"""The export stage reports each artifact's accuracy on the test split (issue 15 item 5), run in the
artifact's own runtime, next to its agreement with JAX."""

from __future__ import annotations

import numpy as np
from flax import nnx

from research.data import load_dataset
from research.export.stage import ExportStage
from research.export.stage import artifact_accuracy
from research.export.stage import run_export
from research.metrics import accuracy
from research.nn import build_model
from research.stages import Bundle
from research.stages import StageContext
from research.train import finetune


def test_every_artifact_reports_its_test_accuracy(tmp_path):
    ds = load_dataset("digits", seed=0, limit=200)
    model = build_model("mlp", input_shape=ds.input_shape, num_classes=ds.num_classes, widths=(32,), rngs=nnx.Rngs(0))
    model, _ = finetune(model, ds, workdir=tmp_path / "t", steps=60, learning_rate=3e-3, batch_size=64, progress=False)
    cfg = ExportStage(formats=("stablehlo", "tflite"), quantize=("int8",), calibration_examples=64, eval_examples=1000)
    ctx = StageContext(index=1, label="1_export", workdir=tmp_path / "e", seed=0, progress=False)
    result = run_export(Bundle(model=model, dataset=ds), cfg, ctx)
    rows = {r["artifact"]: r for r in result.tables["artifacts"]}
    jax_acc = accuracy(model, ds.x_test, ds.y_test)
    assert rows["jax"]["test_accuracy"] == jax_acc > 0.5
    names = [n for n in rows if n != "jax"]
    assert {"tflite_fp32", "tflite_int8"} <= set(names) and any(n.startswith("stablehlo") for n in names)
    for name in names:
        row = rows[name]
        assert result.metrics[f"{name}_test_accuracy"] == row["test_accuracy"]
        # eval_examples covers the whole test split: accuracies differ by at most the disagreement
        assert abs(row["test_accuracy"] - jax_acc) <= 1 - row["top1_agreement"] + 1e-9
    # the figure is the artifact's own: a model whose labels are shifted by one scores what it should
    art = next(p for p in result.artifacts if p.endswith(".tflite") and "fp32" in p)
    shifted = artifact_accuracy("tflite", art, (1,), ds.x_test, (np.asarray(ds.y_test) + 1) % ds.num_classes)
    preds = np.asarray(model(ds.x_test)).argmax(-1)
    expected = np.mean(preds == (np.asarray(ds.y_test) + 1) % ds.num_classes)
    assert abs(shifted - expected) <= 1 - rows["tflite_fp32"]["top1_agreement"] + 1e-9
