"""Data sets (shipped, no downloads), deterministic splits, batching, adapters."""

from research.data.adapters import from_grain
from research.data.adapters import from_tfds
from research.data.batching import BatchSampler
from research.data.batching import calibration_subset
from research.data.batching import eval_batches
from research.data.datasets import DATASETS
from research.data.datasets import Dataset
from research.data.datasets import dataset_options
from research.data.datasets import list_datasets
from research.data.datasets import load_dataset
from research.data.datasets import register_dataset

__all__ = [
    "DATASETS",
    "BatchSampler",
    "Dataset",
    "calibration_subset",
    "eval_batches",
    "from_grain",
    "from_tfds",
    "dataset_options",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]
