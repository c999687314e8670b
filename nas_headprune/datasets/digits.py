"""scikit-learn's 1,797 handwritten digits of 8x8, split by a fixed permutation into 1,437 training
and 360 test images. Always available, small enough for unit tests.

The images are read from the data file scikit-learn installs (``sklearn/datasets/data/digits.csv.gz``:
64 pixel values and the label per row), the same values ``sklearn.datasets.load_digits`` returns,
without importing scikit-learn, whose import costs seconds in every process that only wants the
digits.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

from nas_headprune.datasets.tensors import to_tensors

DIGITS_TRAIN_SIZE = 1437
DIGITS_SPLIT_SEED = 0  # fixed: the train/test split never depends on the run's seed
DIGITS_MEAN = 0.3053  # of the 1,797 images scaled to [0, 1]
DIGITS_STD = 0.3760
DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))


def digits_file() -> Path:
    """Where scikit-learn keeps the digits (found without importing the package)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data set comes with scikit-learn: pip install scikit-learn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images, ``(1797, 8, 8)`` float64 with values 0..16, and their labels ``(1797,)``."""
    with gzip.open(digits_file(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_digits() -> tuple[TensorDataset, TensorDataset]:
    """The fixed training and test splits, normalised."""
    images, labels = read_digits()
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    train_idx, test_idx = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    train = to_tensors(images[train_idx], labels[train_idx], DIGITS_MEAN, DIGITS_STD, 16.0)
    test = to_tensors(images[test_idx], labels[test_idx], DIGITS_MEAN, DIGITS_STD, 16.0)
    return train, test
