"""Datasets and loaders: Fashion-MNIST, scikit-learn digits and ImageNet-style image folders.

Three sources, chosen by :class:`DataConfig.name`:

``fashion_mnist``
    The original IDX files (gzipped or not), read with numpy and kept in memory as a
    :class:`~torch.utils.data.TensorDataset` of normalised ``(N, 1, 28, 28)`` images. The files are
    looked for, in order, in ``data.root``, in ``$NAS_HEADPRUNE_DATA``, in the folder of the Debian
    package ``dataset-fashion-mnist`` and in this project's cache; if none holds them and
    ``data.download`` is true, torchvision downloads them into the cache.
``digits``
    scikit-learn's 1,797 handwritten digits of 8x8, split by a fixed permutation into 1,437 training
    and 360 test images. Always available, small enough for unit tests.
``imagefolder``
    ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``validation``) read with timm, with
    timm's training augmentation for the training split and its eval transform for the test split.

The sources are read in :mod:`nas_headprune.datasets`; this module chooses one, applies the seeded
subsets and the validation split, and builds the loaders and the calibration batches.

Every random choice (subsets, shuffling, calibration batches) comes from a ``torch.Generator``
seeded from the run's seed, so the same seed gives the same data in the same order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nas_headprune.config import DataConfig
from nas_headprune.datasets.digits import DIGITS_CLASSES as DIGITS_CLASSES
from nas_headprune.datasets.digits import DIGITS_MEAN as DIGITS_MEAN
from nas_headprune.datasets.digits import DIGITS_SPLIT_SEED as DIGITS_SPLIT_SEED
from nas_headprune.datasets.digits import DIGITS_STD as DIGITS_STD
from nas_headprune.datasets.digits import DIGITS_TRAIN_SIZE, load_digits
from nas_headprune.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    load_fashion_mnist,
)
from nas_headprune.datasets.fashion_mnist import FASHION_MNIST_MEAN as FASHION_MNIST_MEAN
from nas_headprune.datasets.fashion_mnist import FASHION_MNIST_STD as FASHION_MNIST_STD
from nas_headprune.datasets.imagefolder import load_imagefolder
from nas_headprune.datasets.split import (
    SALT_CALIBRATION,
    SALT_TEST_SUBSET,
    SALT_TRAIN_SUBSET,
    dataset_labels,
    dataset_size,
    seeded_generator,
    stratified_split,
    subset_indices,
    take,
)
from nas_headprune.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_DIR",
    "DEBIAN_FASHION_MNIST_DIR",
    "DIGITS_TRAIN_SIZE",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "DataBundle",
    "DataConfig",
    "calibration_batches",
    "input_size",
    "load_datasets",
    "make_eval_loader",
    "make_loaders",
]

# --- places searched (module constants so tests and deployments can repoint them) -------------------
ENV_VAR = "NAS_HEADPRUNE_DATA"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/nas_headprune").expanduser()


@dataclass
class DataBundle:
    """The two splits of a dataset and what a model needs to know about them.

    ``train_eval`` holds the training images with the evaluation transform (no augmentation) where
    that differs from ``train``; calibration reads it so that calibration batches are deterministic.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    classes: tuple[str, ...] = ()
    train_eval: Dataset | None = field(default=None, repr=False)
    val: Dataset | None = None  # held out from the training split (data.val_split), eval transform


def load_datasets(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the dataset named by ``cfg`` and apply the seeded ``train_subset`` / ``test_subset``."""
    train: Dataset
    test: Dataset
    train_eval: Dataset | None = None
    if cfg.name == "fashion_mnist":
        # the places are this module's constants, read when the data loads, so repointing them works
        train, test = load_fashion_mnist(
            cfg, env_var=ENV_VAR, debian_dir=DEBIAN_FASHION_MNIST_DIR, cache_dir=CACHE_DIR
        )
        classes, in_chans, img_size = FASHION_MNIST_CLASSES, 1, 28
    elif cfg.name == "digits":
        train, test = load_digits()
        classes, in_chans, img_size = DIGITS_CLASSES, 1, 8
    elif cfg.name == "imagefolder":
        train, test, train_eval, classes, img_size = load_imagefolder(cfg)
        in_chans = 3
    else:  # pragma: no cover - DataConfig.name is a Literal
        raise ConfigError(f"data.name={cfg.name!r} is not one of fashion_mnist, digits, imagefolder")

    val: Dataset | None = None
    if cfg.val_split is not None:
        val_idx, rest = stratified_split(dataset_labels(train), cfg.val_split, cfg.val_seed)
        val = take(train_eval if train_eval is not None else train, val_idx)
        train = take(train, rest)
        if train_eval is not None:
            train_eval = take(train_eval, rest)
    train_idx = subset_indices(dataset_size(train), cfg.train_subset, seed, SALT_TRAIN_SUBSET)
    test_idx = subset_indices(dataset_size(test), cfg.test_subset, seed, SALT_TEST_SUBSET)
    train = take(train, train_idx)
    test = take(test, test_idx)
    if train_eval is not None:
        train_eval = take(train_eval, train_idx)
    logger.info(
        "data %s: %d train / %d validation / %d test samples, %d classes, input %dx%dx%d",
        cfg.name,
        dataset_size(train),
        dataset_size(val) if val is not None else 0,
        dataset_size(test),
        len(classes),
        in_chans,
        img_size,
        img_size,
    )
    return DataBundle(
        name=cfg.name,
        train=train,
        test=test,
        num_classes=len(classes),
        in_chans=in_chans,
        img_size=img_size,
        classes=tuple(classes),
        train_eval=train_eval,
        val=val,
    )


def make_loaders(
    bundle: DataBundle, cfg: DataConfig, seed: int = 0, distributed: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Return ``(train_loader, test_loader)``.

    The training loader reshuffles every epoch from a generator seeded with ``seed``, so a run with
    the same seed sees the same batches in the same order. With ``distributed`` it uses a
    :class:`~torch.utils.data.distributed.DistributedSampler` (an initialised process group is
    needed; call ``train_loader.sampler.set_epoch(epoch)`` each epoch). The test loader is never
    shuffled and never sharded: every process evaluates the whole test set.
    """
    common: dict[str, Any] = {
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
    }
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler: DistributedSampler[Any] = DistributedSampler(bundle.train, shuffle=True, seed=seed)
        train_loader = DataLoader(
            bundle.train,
            batch_size=cfg.batch_size,
            sampler=sampler,
            generator=seeded_generator(seed, 0),  # seeds the workers' augmentation
            **common,
        )
    else:
        train_loader = DataLoader(
            bundle.train,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=seeded_generator(seed, 0),
            **common,
        )
    test_loader = DataLoader(bundle.test, batch_size=cfg.eval_batch_size, shuffle=False, **common)
    return train_loader, test_loader


def make_eval_loader(dataset: Dataset, cfg: DataConfig) -> DataLoader:
    """A loader that evaluates ``dataset`` in order (e.g. ``bundle.val``)."""
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )


def calibration_batches(bundle: DataBundle, cfg: DataConfig, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``cfg.calib_batches`` batches of ``cfg.calib_batch_size`` training samples, drawn by ``seed``.

    Samples are distinct and come without augmentation (``bundle.train_eval`` when it exists). If the
    training set is smaller than requested, fewer (and a last, smaller) batch are returned.
    """
    source = bundle.train_eval if bundle.train_eval is not None else bundle.train
    n = dataset_size(source)
    wanted = cfg.calib_batches * cfg.calib_batch_size
    if wanted > n:
        logger.warning("calibration wants %d samples but the training set has %d; using all", wanted, n)
    order = torch.randperm(n, generator=seeded_generator(seed, SALT_CALIBRATION))[:wanted]
    batches: list[tuple[Tensor, Tensor]] = []
    for chunk in order.split(cfg.calib_batch_size):
        if isinstance(source, TensorDataset):
            x, y = source.tensors[0][chunk], source.tensors[1][chunk]
        else:
            items = [source[int(i)] for i in chunk]
            x = torch.stack([_as_tensor(img) for img, _ in items])
            y = torch.as_tensor([int(label) for _, label in items], dtype=torch.int64)
        batches.append((x, y))
    return batches


def _as_tensor(value: object) -> Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"calibration expects tensor samples, got {type(value).__name__}")


def input_size(bundle: DataBundle) -> tuple[int, int, int]:
    """The ``(C, H, W)`` of one input image."""
    return (bundle.in_chans, bundle.img_size, bundle.img_size)
