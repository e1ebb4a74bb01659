"""Batching that is a pure function of the step, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from research.data.datasets import Dataset


class BatchSampler:
    """Shuffled mini-batches where batch ``i`` depends only on ``(seed, i)``.

    Each epoch is a fresh permutation drawn from ``(seed, epoch)``; with ``drop_remainder`` the
    last incomplete batch of an epoch is skipped, so every batch has ``batch_size`` rows and a
    jitted step never recompiles.

    Example:
      >>> import numpy as np
      >>> s = BatchSampler(np.arange(10), np.arange(10), batch_size=4, seed=0)
      >>> s.steps_per_epoch, s.batch(0)["x"].shape
      (2, (4,))
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if len(x) < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(x)} examples; lower batch_size")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = len(x) // batch_size
        self._epoch = -1
        self._perm = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            n = len(self.x)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return self._perm

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch for global step ``step`` (a dict with ``x`` and ``y``)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return {"x": self.x[idx], "y": self.y[idx]}

    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps ``start, start+1, ...`` (up to ``stop``)."""
        step = start
        while stop is None or step < stop:
            yield self.batch(step)
            step += 1


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ordered batches covering all rows; the last one is padded and carries a ``mask``.

    Padding keeps every batch the same shape (no recompilation); ``mask`` marks real rows.
    """
    n = len(x)
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        real = len(xb)
        mask = np.ones(batch_size, dtype=bool)
        if real < batch_size:
            pad = batch_size - real
            xb = np.concatenate([xb, np.repeat(xb[:1], pad, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], pad, axis=0)])
            mask[real:] = False
        yield {"x": xb, "y": yb, "mask": mask}


def calibration_subset(ds: Dataset, num_examples: int = 256, *, seed: int = 0, split: str = "train") -> np.ndarray:
    """A fixed random subset of inputs for calibration (quantization ranges, export).

    Raises:
      ValueError: when ``num_examples`` is not positive.
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples} must be positive")
    x, _ = ds.split(split)
    idx = np.random.default_rng(seed).permutation(len(x))[: min(num_examples, len(x))]
    return x[np.sort(idx)]
