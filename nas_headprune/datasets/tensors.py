"""Images and labels held in numpy arrays as a normalised in-memory dataset."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def to_tensors(
    images: np.ndarray, labels: np.ndarray, mean: float, std: float, scale: float
) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # (N, 1, H, W)
    x = x.div_(scale).sub_(mean).div_(std)
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return TensorDataset(x, y)
