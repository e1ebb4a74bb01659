"""Adapters for users who have the full data sets locally: TFDS and Grain.

These never download: TFDS is called with ``download=False`` and needs ``data_dir`` to hold
the prepared data set; Grain reads any random-access source (e.g. ArrayRecord files).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from research.data.datasets import Dataset


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this adapter needs the '{module}' package, which is not installed; install it with: pip install {extra}"
        ) from e


def _to_numpy(records, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for rec in records:
        xs.append(np.asarray(rec[image_key]))
        ys.append(int(rec[label_key]))
    x = np.stack(xs).astype(np.float32)
    if x.max() > 1.0:
        x = x / 255.0
    return x, np.asarray(ys, dtype=np.int32)


def from_tfds(
    name: str,
    *,
    data_dir: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
    limit: int | None = None,
) -> Dataset:
    """Loads a prepared TFDS data set (e.g. ``mnist``, ``cifar10``) from ``data_dir``.

    Raises:
      ImportError: tensorflow_datasets is not installed (names the pip command).
      FileNotFoundError: the data set is not prepared in ``data_dir`` (no download is attempted).
    """
    tfds = _require("tensorflow_datasets", "tensorflow-datasets")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS data set {name!r} is not prepared under data_dir={data_dir!r}; "
                f"prepare it once with `tfds build {name} --data_dir {data_dir}` on a machine with network"
            )
        splits = {s: tfds.as_numpy(builder.as_dataset(split=s)) for s in ("train", "test")}
    except FileNotFoundError:
        raise
    x, y = _to_numpy(splits["train"], image_key, label_key)
    xt, yt = _to_numpy(splits["test"], image_key, label_key)
    return _split_train(name, x, y, xt, yt, val_fraction, seed, limit)


def from_grain(
    source: Any,
    test_source: Any,
    *,
    name: str = "grain",
    val_fraction: float = 0.1,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
    limit: int | None = None,
) -> Dataset:
    """Builds a :class:`Dataset` from Grain random-access sources (``len`` + ``__getitem__``).

    ``source`` and ``test_source`` are e.g. ``grain.sources.ArrayRecordDataSource`` whose
    records are dicts (after any parsing map) with ``image_key`` and ``label_key``.

    Raises:
      ImportError: grain is not installed.
    """
    grain = _require("grain", "grain")
    dataset = grain.MapDataset.source(source)
    n = len(source) if limit is None else min(limit, len(source))
    x, y = _to_numpy((dataset[i] for i in range(n)), image_key, label_key)
    xt, yt = _to_numpy((test_source[i] for i in range(len(test_source))), image_key, label_key)
    return _split_train(name, x, y, xt, yt, val_fraction, seed, None)


def _split_train(name, x, y, xt, yt, val_fraction, seed, limit) -> Dataset:
    if x.ndim == 3:
        x, xt = x[..., None], xt[..., None]
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    tr = perm[n_val:] if limit is None else perm[n_val:][:limit]
    num_classes = int(max(y.max(), yt.max())) + 1
    return Dataset(name, x[tr], y[tr], x[perm[:n_val]], y[perm[:n_val]], xt, yt, num_classes)
