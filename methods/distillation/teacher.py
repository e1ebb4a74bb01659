"""Teachers for the KD transforms: online (run inside the step) or cached (looked up by index).

A **teacher function** maps a training batch to the teacher's outputs on it:
``teacher_fn(batch) -> logits`` or ``-> {"logits": (B, C), "features": {path: array}}``.

* :class:`OnlineTeacher` runs a frozen teacher model on ``batch["x"]`` inside the jitted step;
  use it when inputs are augmented (the teacher must see the same augmented input).
* :class:`TeacherCache` holds the teacher's outputs on the whole training set, computed once by
  :func:`build_teacher_cache`, and gathers rows by ``batch["index"]``; each step skips the
  teacher's forward pass. Batches need the example index: :class:`IndexedBatchSampler` yields
  exactly the batches of ``research.data.BatchSampler`` plus ``"index"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.distillation.capture import capture_intermediates
from research.data import BatchSampler
from research.data import eval_batches

Batch = Mapping[str, jax.Array]
TeacherOutputs = dict[str, Any]
TeacherFn = Callable[[Batch], "jax.Array | TeacherOutputs"]


def as_teacher_outputs(value: Any) -> TeacherOutputs:
    """Normalises a teacher function's result to ``{"logits": ..., "features": {...}}``."""
    if isinstance(value, Mapping):
        if "logits" not in value:
            raise KeyError(f"teacher outputs need a 'logits' entry; got keys {sorted(value)}")
        return {"logits": value["logits"], "features": dict(value.get("features", {}))}
    return {"logits": value, "features": {}}


def _frozen_eval_copy(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    model = nnx.clone(model)
    model.eval()
    return nnx.split(model)


class OnlineTeacher:
    """Runs a frozen teacher model (evaluation mode, no gradients) on ``batch["x"]``.

    The teacher is copied and split once; each call rebuilds it from its graph and state, so
    calling it inside ``jax.jit`` has no side effects on the original model. Its arrays enter
    the compiled step as constants.

    Args:
      model: the teacher (any NNX model); it is copied, the original is left alone.
      feature_paths: intermediate outputs to return under ``"features"`` (module paths, see
        :func:`methods.distillation.capture_intermediates`).

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from research.nn import build_model
      >>> t = build_model("mlp", input_shape=(4,), num_classes=3, widths=(8,), rngs=nnx.Rngs(0))
      >>> OnlineTeacher(t)({"x": jnp.ones((2, 4))})["logits"].shape
      (2, 3)
    """

    def __init__(self, model: nnx.Module, feature_paths: Sequence[str] = ()):
        self.graphdef, self.state = _frozen_eval_copy(model)
        self.feature_paths = tuple(feature_paths)
        self._forward = capture_intermediates(lambda m, x: m(x), self.feature_paths)

    def outputs(self, x: jax.Array) -> TeacherOutputs:
        """Teacher logits and features for inputs ``x``."""
        model = nnx.merge(self.graphdef, self.state)
        logits, features = self._forward(model, x)
        return jax.lax.stop_gradient({"logits": logits, "features": features})

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return self.outputs(batch["x"])


class TeacherCache:
    """The teacher's outputs on a training set, looked up per batch by ``batch["index"]``.

    Attributes:
      logits: ``(N, C)`` teacher logits, row ``i`` for training example ``i``.
      features: ``{path: (N, ...)}`` cached intermediate outputs (empty unless requested).
    """

    def __init__(self, logits: jax.Array, features: Mapping[str, jax.Array] | None = None):
        self.logits = jnp.asarray(logits)
        self.features = {k: jnp.asarray(v) for k, v in (features or {}).items()}
        for k, v in self.features.items():
            if v.shape[0] != self.logits.shape[0]:
                raise ValueError(f"cached feature {k!r} has {v.shape[0]} rows but logits have {self.logits.shape[0]}")

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def __call__(self, batch: Batch) -> TeacherOutputs:
        if "index" not in batch:
            raise KeyError(
                f"the batch has keys {sorted(batch)} but a TeacherCache needs 'index' (the rows of "
                "the training set); sample with methods.distillation.IndexedBatchSampler"
            )
        idx = batch["index"]
        return {
            "logits": jnp.take(self.logits, idx, axis=0),
            "features": {k: jnp.take(v, idx, axis=0) for k, v in self.features.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the cache to an ``.npz`` file."""
        arrays = {"logits": np.asarray(self.logits)}
        arrays.update({f"feature:{k}": np.asarray(v) for k, v in self.features.items()})
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TeacherCache:
        """Reads a cache written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            feats = {k.removeprefix("feature:"): data[k] for k in data.files if k.startswith("feature:")}
            return cls(data["logits"], feats)


def build_teacher_cache(
    teacher: nnx.Module,
    x: np.ndarray,
    *,
    batch_size: int = 512,
    feature_paths: Sequence[str] = (),
) -> TeacherCache:
    """Runs ``teacher`` (evaluation mode) once over all of ``x`` and stores its outputs.

    Args:
      teacher: the teacher model (copied; the original is left alone).
      x: the training inputs, in the order :class:`IndexedBatchSampler` indexes them.
      batch_size: rows per forward pass (the last batch is padded, so one compilation).
      feature_paths: intermediate outputs to cache too.

    Returns:
      A :class:`TeacherCache` with ``len(x)`` rows.
    """
    online = OnlineTeacher(teacher, feature_paths)
    forward = jax.jit(online.outputs)
    n = len(x)
    dummy_y = np.zeros(n, np.int32)
    chunks = []
    for b in eval_batches(x, dummy_y, min(batch_size, n)):
        out = forward(jnp.asarray(b["x"]))
        real = int(b["mask"].sum())
        chunks.append(jax.tree.map(lambda a, r=real: a[:r], out))
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *chunks)
    return TeacherCache(stacked["logits"], stacked["features"])


class IndexedBatchSampler(BatchSampler):
    """:class:`research.data.BatchSampler` whose batches also carry ``"index"`` (int32 rows).

    Batch ``i`` has the same ``x`` and ``y`` as ``BatchSampler(x, y, batch_size=..., seed=...)``
    gives for step ``i`` (it draws the same permutations), so cached and online distillation
    see identical data.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int = 0, shuffle: bool = True):
        super().__init__(x, y, batch_size=batch_size, seed=seed, shuffle=shuffle)
        self._rows = BatchSampler(np.arange(len(x)), y, batch_size=batch_size, seed=seed, shuffle=shuffle)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self._rows.batch(step)["x"]
        return {"x": self.x[idx], "y": self.y[idx], "index": idx.astype(np.int32)}
