"""scikit-learn's 1,797 handwritten digits of 8x8, split by a fixed permutation into 1,437 training
and 360 test images. Always available, small enough for unit tests."""

from __future__ import annotations

import numpy as np
from torch.utils.data import TensorDataset

from nas_headprune.datasets.tensors import to_tensors

DIGITS_TRAIN_SIZE = 1437
DIGITS_SPLIT_SEED = 0  # fixed: the train/test split never depends on the run's seed
DIGITS_MEAN = 0.3053  # of the 1,797 images scaled to [0, 1]
DIGITS_STD = 0.3760
DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))


def load_digits() -> tuple[TensorDataset, TensorDataset]:
    """The fixed training and test splits, normalised."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    images = np.asarray(digits.images)  # (1797, 8, 8), values 0..16
    labels = np.asarray(digits.target)  # (1797,)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    train_idx, test_idx = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    train = to_tensors(images[train_idx], labels[train_idx], DIGITS_MEAN, DIGITS_STD, 16.0)
    test = to_tensors(images[test_idx], labels[test_idx], DIGITS_MEAN, DIGITS_STD, 16.0)
    return train, test
