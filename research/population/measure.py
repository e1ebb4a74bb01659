"""What a population measures together: accuracy of all its trials in one vmapped program, FLOPs
and latency once (its trials share one architecture), and curves drawn on one reused figure.

A sequential run measures each stage's model alone (:func:`research.metrics.measure`): two
accuracy passes, a FLOP count and a latency of 20 timed calls, then draws ``curves.png`` on a new
figure. For K trials of one population the executor does instead (:class:`PopulationMeasurer`):

- accuracy on the test and validation splits: the K models stacked and evaluated as one vmapped
  program per split (the same per-batch sums as :func:`research.train.evaluate`, in the same
  order, so the figures agree within float tolerance);
- FLOPs, parameters and bytes: per trial (cheap; FLOPs come from a cache keyed by the model graph);
- latency: measured once per population and stage, on one trial's model, and given to every
  trial of it; the stage's notes say so (every trial has the same architecture and shapes, so a
  dense forward pass costs the same);
- ``curves.png``: the same plot as :func:`research.report.plot_curves`, on one figure kept open
  (:class:`research.report.CurvePlotter`, as the sequential executor does).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.data import Dataset
from research.metrics import count_nonzeros
from research.metrics import count_params
from research.metrics import flops
from research.metrics import measure
from research.metrics import model_bytes
from research.metrics import model_latency
from research.train import split_model
from research.train.step import make_eval_step

LATENCY_NOTE = (
    "latency_ms measured once for population {population}, stage {stage} (on the model of its first "
    "trial measured), not per trial: its trials share one architecture and shapes"
)
LATENCY_NOTE_SIZES = (
    "latency_ms measured once per architecture of population {population}, stage {stage} (its trials "
    "trained together padded to one set of ranks or with their bit widths as values; each is measured "
    "at its own)"
)


@functools.lru_cache(maxsize=32)
def _vmapped_eval(graphdef):
    """The evaluation step of one model graph, vmapped over stacked models (data shared), jitted."""
    step = make_eval_step(types.SimpleNamespace(eval=graphdef), jit=False)  # it reads only ``.eval``
    return jax.jit(jax.vmap(step, in_axes=(0, 0, None)))


def evaluate_many(
    models: Sequence[nnx.Module], x: np.ndarray, y: np.ndarray, *, batch_size: int = 256, pad_to: int = 0
) -> list[dict[str, float]]:
    """``{"loss", "accuracy", "count"}`` of each model on ``(x, y)``, all models in one vmapped program.

    The models must share one graph (a population's). The result per model is what
    :func:`research.train.evaluate` gives for it alone (the same batches and per-batch sums).

    Args:
      models: the models (evaluated in evaluation mode; not modified).
      x: inputs; y: integer labels.
      batch_size: examples per forward pass.
      pad_to: stack at least this many models (repeating the first), so chunks of one population
        share one compiled program.

    Raises:
      ValueError: no models.
    """
    from research.data.batching import eval_batches  # pylint: disable=import-outside-toplevel

    if not models:
        raise ValueError("evaluate_many needs at least one model")
    if len(x) == 0:
        return [{"loss": math.nan, "accuracy": math.nan, "count": 0} for _ in models]
    splits = [split_model(nnx.clone(m)) for m in models]
    splits += [splits[0]] * max(0, pad_to - len(splits))
    defs = splits[0][0]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[s[1] for s in splits])
    model_state = jax.tree.map(lambda *a: jnp.stack(a), *[s[2] for s in splits])
    step = _vmapped_eval(defs.eval)
    sums = [step(params, model_state, b) for b in eval_batches(x, y, batch_size)]  # as evaluate: one shape
    host = jax.device_get(sums)
    out = []
    for j in range(len(models)):
        total = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for s in host:
            for k in total:
                total[k] += float(s[k][j])
        n = max(total["count"], 1.0)
        out.append({"loss": total["loss"] / n, "accuracy": total["correct"] / n, "count": int(total["count"])})
    return out


class PopulationMeasurer:
    """Measures the trials of one chunk together; gives each trial's run its figures.

    Args:
      population: the population's number (for the latency note and its cache).
      latencies: ``{(population, stage index, latency batch size, model graph): ms}`` shared by
        the executor's chunks, so a population's latency is measured once per architecture.
    """

    def __init__(self, population: int, latencies: dict):
        self.population = population
        self.latencies = latencies
        self._accuracy: dict[tuple[Any, int], tuple] = {}  # (trial, stage) -> (model evaluated, accuracies)
        self._val_rows: dict[tuple[int, int], dict[str, float]] = {}

    def evaluate(
        self,
        stage: int,
        trials: Sequence[Any],
        models: Sequence[nnx.Module],
        datasets,
        pad_to: int,
        *,
        same_as: Sequence[nnx.Module] | None = None,
    ):
        """Evaluates ``models`` (one per trial key in ``trials``) on their data sets' test and
        validation splits: one vmapped program per split and distinct data set. The figures are
        used for exactly these model objects (a stage that returns another model is measured alone),
        or for ``same_as``'s: models that compute the same functions (the trials' own models of
        ``models`` padded to one shape, :mod:`research.population.padding`)."""
        groups: dict[int, list[int]] = {}
        for j, ds in enumerate(datasets):
            groups.setdefault(id(ds), []).append(j)
        for members in groups.values():
            ds = datasets[members[0]]
            ms = [models[j] for j in members]
            test = evaluate_many(ms, ds.x_test, ds.y_test, pad_to=pad_to)
            val = evaluate_many(ms, ds.x_val, ds.y_val, pad_to=pad_to) if len(ds.x_val) else [None] * len(ms)
            for j, t, v in zip(members, test, val, strict=True):
                key = (trials[j], stage)
                acc = {"test_accuracy": t["accuracy"], "val_accuracy": v["accuracy"] if v is not None else math.nan}
                self._accuracy[key] = ((same_as or models)[j], acc)
                if v is not None:
                    self._val_rows[key] = v

    def val_row(self, trial: Any, stage: int) -> dict[str, float] | None:
        """The validation ``{"loss", "accuracy", "count"}`` of a trial's stage (``None`` without
        a validation split)."""
        return self._val_rows.get((trial, stage))

    def for_trial(self, trial: Any):
        """The ``measure`` hook of one trial's :func:`research.run.run`
        (:class:`research.run.RunHooks`): stages this measurer evaluated use the batched figures,
        the rest :func:`research.metrics.measure`."""

        def hook(stage: int, model: nnx.Module, dataset: Dataset, latency_batch_size: int) -> dict[str, Any]:
            evaluated, acc = self._accuracy.get((trial, stage), (None, None))
            if evaluated is not model:  # not evaluated together (or the stage changed it since)
                return measure(model, dataset, latency_batch_size=latency_batch_size)
            model = nnx.clone(model)
            model.eval()
            key = (self.population, stage, latency_batch_size, nnx.graphdef(model))  # one per architecture
            if key not in self.latencies:
                batch = jnp.asarray(np.repeat(dataset.x_test[:1], latency_batch_size, axis=0))
                self.latencies[key] = 1e3 * model_latency(model, batch)["median"]
            return {
                **acc,
                "params": count_params(model),
                "nonzeros": count_nonzeros(model),
                "bytes_fp32": model_bytes(model, 32),
                "flops": flops(model, jnp.asarray(dataset.x_test[:1])),
                "latency_ms": self.latencies[key],
            }

        return hook
