"""Which samples a run uses: generators drawn from the run's seed, the seeded train and test subsets,
and the validation split, held out of the training split class by class."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from nas_headprune.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

# Salts that decorrelate the generators drawn from one run seed.
SALT_TRAIN_SUBSET = 1
SALT_TEST_SUBSET = 2
SALT_CALIBRATION = 3
SALT_VALIDATION = 4


def seeded_generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for one purpose (``salt``) of one run seed."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % (2**63))


def subset_indices(n: int, keep: int | None, seed: int, salt: int) -> torch.Tensor | None:
    """The first ``keep`` of a seeded permutation of ``range(n)``, or None to keep everything."""
    if keep is None or keep >= n:
        return None
    return torch.randperm(n, generator=seeded_generator(seed, salt))[:keep]


def dataset_size(ds: Dataset) -> int:
    return len(ds)  # type: ignore[arg-type]  # every dataset here is map-style


def take(ds: Dataset, idx: torch.Tensor | None) -> Dataset:
    if idx is None:
        return ds
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


def dataset_labels(ds: Dataset) -> Tensor:
    """The class label of every sample, without loading images where the dataset knows them."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    samples = getattr(getattr(ds, "reader", None), "samples", None)  # timm's folder reader
    if samples is not None:
        return torch.as_tensor([int(target) for _, target in samples], dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(dataset_size(ds))], dtype=torch.long)


def stratified_split(labels: Tensor, size: float | int, seed: int) -> tuple[Tensor, Tensor]:
    """``(held out, rest)`` sample indices, both sorted: ``size`` (a fraction or a count) of the
    samples, each class contributing in proportion to its size (largest remainders get the rest),
    the members of each class drawn by ``seed``."""
    n = labels.numel()
    want = round(size * n) if isinstance(size, float) else int(size)
    if not 0 < want < n:
        raise ConfigError(
            f"data.val_split={size} holds out {want} of the {n} training samples; it must leave at "
            "least one sample on each side"
        )
    classes, counts = labels.unique(return_counts=True)  # sorted classes
    exact = counts.double() * want / n
    quota = exact.floor().long()
    remainder = exact - quota.double()
    order = sorted(range(len(classes)), key=lambda i: (-float(remainder[i]), i))
    for i in order[: want - int(quota.sum())]:
        quota[i] += 1
    gen = seeded_generator(seed, SALT_VALIDATION)
    held: list[Tensor] = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = (labels == cls).nonzero().flatten()  # (n_c,)
        held.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    held_idx = torch.cat(held).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held_idx] = False
    return held_idx, keep.nonzero().flatten()
