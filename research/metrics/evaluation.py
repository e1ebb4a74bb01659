"""Accuracy and the standard report columns of a model (what ``research.run`` records per stage)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.data import Dataset
from research.metrics.cost import flops
from research.metrics.cost import model_latency
from research.metrics.counting import count_nonzeros
from research.metrics.counting import count_params
from research.metrics.counting import model_bytes
from research.train.state import split_model
from research.train.step import evaluate


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (evaluation mode) on ``(x, y)``.

    Args:
      model: the model (not modified).
      x: inputs, batched along the first axis.
      y: integer labels.
      batch_size: examples per forward pass.

    Returns:
      The fraction of examples whose arg-max output is the label.
    """
    defs, params, model_state = split_model(nnx.clone(model))
    return evaluate(defs, params, model_state, x, y, batch_size=batch_size)["accuracy"]


def measure(
    model: nnx.Module, dataset: Dataset, *, latency_batch_size: int = 1, latency_repeats: int = 20
) -> dict[str, float]:
    """The standard report columns for a model.

    Args:
      model: the model (not modified; measured in evaluation mode).
      dataset: its test split gives the accuracy and the latency input; its validation split
        (when not empty) the validation accuracy.
      latency_batch_size: the batch size of the timed forward pass.
      latency_repeats: timed repeats (the median is reported).

    Returns:
      ``test_accuracy``, ``val_accuracy``, ``params``, ``nonzeros``, ``bytes_fp32``,
      ``flops`` (one forward pass of one example, XLA cost analysis) and ``latency_ms``
      (median forward latency at ``latency_batch_size``).
    """
    model = nnx.clone(model)
    model.eval()
    sample = jnp.asarray(dataset.x_test[:1])
    batch = jnp.asarray(np.repeat(dataset.x_test[:1], latency_batch_size, axis=0))
    return {
        "test_accuracy": accuracy(model, dataset.x_test, dataset.y_test),
        "val_accuracy": accuracy(model, dataset.x_val, dataset.y_val) if len(dataset.x_val) else float("nan"),
        "params": count_params(model),
        "nonzeros": count_nonzeros(model),
        "bytes_fp32": model_bytes(model, 32),
        "flops": flops(model, sample),
        "latency_ms": 1e3 * model_latency(model, batch, repeats=latency_repeats)["median"],
    }
