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

Every random choice (subsets, shuffling, calibration batches) comes from a ``torch.Generator``
seeded from the run's seed, so the same seed gives the same data in the same order.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from nas_headprune.config import DEFAULT_IMG_SIZE, DataConfig
from nas_headprune.errors import ConfigError, DataNotFoundError

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
# Sub-folders of a searched folder that may hold the IDX files: the folder itself, the layout of the
# Debian package and of NAS_HEADPRUNE_DATA ("fashion-mnist"), and torchvision's download layout.
_FASHION_MNIST_SUBDIRS: tuple[str, ...] = ("", "fashion-mnist", os.path.join("FashionMNIST", "raw"))

# --- Fashion-MNIST --------------------------------------------------------------------------------
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}

_IDX_UBYTE = 0x08
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
_GZIP_MAGIC = b"\x1f\x8b"

# --- digits ---------------------------------------------------------------------------------------
DIGITS_TRAIN_SIZE = 1437
DIGITS_SPLIT_SEED = 0  # fixed: the train/test split never depends on the run's seed
DIGITS_MEAN = 0.3053  # of the 1,797 images scaled to [0, 1]
DIGITS_STD = 0.3760
DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

# --- imagefolder ----------------------------------------------------------------------------------
_VAL_DIR_NAMES = ("val", "validation")

# Salts that decorrelate the generators drawn from one run seed.
_SALT_TRAIN_SUBSET = 1
_SALT_TEST_SUBSET = 2
_SALT_CALIBRATION = 3
_SALT_VALIDATION = 4


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


# =================================================================================================
# Fashion-MNIST: IDX files
# =================================================================================================
def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (plain or gzipped) into a uint8 array of its shape."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataNotFoundError(f"cannot read IDX file {path}: {exc}; delete it and fetch it again") from exc

    kind = "images" if expected_magic == _IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise DataNotFoundError(f"corrupt IDX file {path}: {len(raw)} bytes, too short for a header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataNotFoundError(
            f"corrupt IDX file {path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"for an IDX {kind} file; delete it and fetch it again"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataNotFoundError(f"corrupt IDX file {path}: truncated header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) + header
    if len(raw) != expected:
        raise DataNotFoundError(
            f"corrupt IDX file {path}: {len(raw)} bytes, expected {expected} for shape {shape}; "
            "the file is truncated or padded, delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, preferring the uncompressed file (faster to read)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files under ``folder`` (or one of its known sub-folders), or None."""
    for sub in _FASHION_MNIST_SUBDIRS:
        base = folder / sub if sub else folder
        files = {key: _idx_file(base, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(path is not None for path in files.values()):
            return {key: path for key, path in files.items() if path is not None}
    return None


def _describe_folder(folder: Path) -> str:
    subs = ", ".join(f"{sub}/" for sub in _FASHION_MNIST_SUBDIRS if sub)
    return f"{folder} (and its {subs} sub-folders)"


def _download_fashion_mnist(cache: Path) -> str | None:
    """Download with torchvision into ``cache``; return None on success or the reason it failed."""
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        return f"torchvision is not importable ({exc})"
    logger.info("downloading Fashion-MNIST into %s", cache)
    captured = io.StringIO()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(captured):  # keep stdout clean: only the CLI prints
            FashionMNIST(root=str(cache), train=True, download=True)
    except (RuntimeError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"download failed: {first_line}"
    finally:
        if captured.getvalue():
            logger.debug("torchvision: %s", captured.getvalue().strip())
    return None


def _find_fashion_mnist(cfg: DataConfig) -> dict[str, Path]:
    """Search every place in order; raise :class:`DataNotFoundError` listing them all if none has it."""
    tried: list[str] = []

    def look(folder: Path, origin: str) -> dict[str, Path] | None:
        files = _fashion_mnist_files(folder)
        if files is None:
            tried.append(f"{origin}: {_describe_folder(folder)}")
        else:
            logger.info("Fashion-MNIST found in %s (%s)", files["train_images"].parent, origin)
        return files

    if cfg.root:
        found = look(Path(cfg.root).expanduser(), "data.root")
        if found:
            return found
        # the user named this folder: reading another copy instead would be a silent substitution
        names = ", ".join(f"{stem}[.gz]" for stem in FASHION_MNIST_FILES.values())
        raise DataNotFoundError(
            f"data.root={cfg.root} holds no Fashion-MNIST IDX files ({tried[-1]}); expected {names} "
            "in that folder or in its fashion-mnist/ sub-folder. Point data.root at such a folder, or "
            "leave it unset to search $NAS_HEADPRUNE_DATA, the Debian package folder and the cache"
        )
    else:
        tried.append("data.root: not set")

    env = os.environ.get(ENV_VAR)
    if env:
        found = look(Path(env).expanduser(), f"${ENV_VAR}")
        if found:
            return found
    else:
        tried.append(f"${ENV_VAR}: not set")

    found = look(DEBIAN_FASHION_MNIST_DIR, "Debian package dataset-fashion-mnist")
    if found:
        return found

    found = look(CACHE_DIR, "download cache")
    if found:
        return found

    if cfg.download:
        reason = _download_fashion_mnist(CACHE_DIR)
        if reason is None:
            found = _fashion_mnist_files(CACHE_DIR)
            if found:
                return found
            reason = "torchvision finished but the IDX files are not where expected"
        tried.append(f"torchvision download into {CACHE_DIR}: {reason}")
    else:
        tried.append("torchvision download: disabled (data.download=false)")

    places = "\n".join(f"  - {line}" for line in tried)
    names = ", ".join(f"{stem}[.gz]" for stem in FASHION_MNIST_FILES.values())
    raise DataNotFoundError(
        f"Fashion-MNIST not found. Looked for {names} in:\n{places}\n"
        "Fix it with one of:\n"
        "  - set data.root to a folder that holds the four IDX files\n"
        f"  - set {ENV_VAR} to such a folder (or to a folder with a fashion-mnist/ sub-folder)\n"
        "  - apt-get install dataset-fashion-mnist (puts them in "
        f"{DEBIAN_FASHION_MNIST_DIR})\n"
        "  - allow the download: data.download=true and internet access"
    )


def _to_tensors(
    images: np.ndarray, labels: np.ndarray, mean: float, std: float, scale: float
) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # (N, 1, H, W)
    x = x.div_(scale).sub_(mean).div_(std)
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return TensorDataset(x, y)


def _load_fashion_mnist(cfg: DataConfig) -> tuple[TensorDataset, TensorDataset]:
    files = _find_fashion_mnist(cfg)
    splits = []
    for split in ("train", "test"):
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC)  # (N, 28, 28) uint8
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)  # (N,) uint8
        if images.shape[1:] != (28, 28):
            raise DataNotFoundError(
                f"corrupt IDX file {images_path}: images of {images.shape[1:]}, expected (28, 28)"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataNotFoundError(
                f"IDX files disagree: {images_path} holds {images.shape[0]} images but {labels_path} "
                f"holds {labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataNotFoundError(
                f"corrupt IDX file {labels_path}: label {int(labels.max())} outside 0..{len(FASHION_MNIST_CLASSES) - 1}"
            )
        if images.shape[0] != _FASHION_MNIST_SIZES[split]:
            logger.info(
                "Fashion-MNIST %s split has %d samples (full set: %d)",
                split,
                images.shape[0],
                _FASHION_MNIST_SIZES[split],
            )
        splits.append(_to_tensors(images, labels, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 255.0))
    return splits[0], splits[1]


# =================================================================================================
# digits
# =================================================================================================
def _load_digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images)  # (1797, 8, 8), values 0..16
    labels = np.asarray(digits.target)  # (1797,)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    train_idx, test_idx = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    train = _to_tensors(images[train_idx], labels[train_idx], DIGITS_MEAN, DIGITS_STD, 16.0)
    test = _to_tensors(images[test_idx], labels[test_idx], DIGITS_MEAN, DIGITS_STD, 16.0)
    return train, test


# =================================================================================================
# imagefolder
# =================================================================================================
def _load_imagefolder(cfg: DataConfig) -> tuple[Dataset, Dataset, Dataset, tuple[str, ...], int]:
    """Return (train with augmentation, test, train with eval transform, class names, img size)."""
    if not cfg.root:
        raise ConfigError(
            "data.root must be set for name='imagefolder': a folder with train/<class>/* and "
            "val/<class>/* (or validation/<class>/*)"
        )
    from timm.data import create_dataset, create_transform

    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"data.root={cfg.root} is not a folder (name='imagefolder')")
    train_dir = root / "train"
    val_dir = next((root / n for n in _VAL_DIR_NAMES if (root / n).is_dir()), None)
    missing = []
    if not train_dir.is_dir():
        missing.append(str(train_dir))
    if val_dir is None:
        missing.append(" or ".join(str(root / n) for n in _VAL_DIR_NAMES))
    if missing or val_dir is None:
        raise DataNotFoundError(
            f"imagefolder data.root={cfg.root} lacks {' and '.join(missing)}; expected "
            "train/<class>/<image> and val/<class>/<image>"
        )

    img_size = cfg.img_size or DEFAULT_IMG_SIZE
    train_tf = create_transform(
        img_size, is_training=True, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob
    )
    eval_tf = create_transform(img_size, is_training=False)

    def build(folder: Path, transform: object, class_map: dict[str, int] | None) -> Dataset:
        try:
            return create_dataset(
                "", root=str(folder), search_split=False, class_map=class_map or {}, transform=transform
            )
        except RuntimeError as exc:  # timm: "Found 0 images in subfolders of ..."
            raise DataNotFoundError(f"imagefolder: {exc}") from exc

    train = build(train_dir, train_tf, None)
    class_to_idx: dict[str, int] = dict(train.reader.class_to_idx)  # type: ignore[attr-defined]
    train_eval = build(train_dir, eval_tf, class_to_idx)
    test = build(val_dir, eval_tf, class_to_idx)

    val_classes = {p.name for p in val_dir.iterdir() if p.is_dir()}
    unknown = sorted(val_classes - set(class_to_idx))
    if unknown:
        logger.warning("imagefolder: %s has classes absent from train/, skipped: %s", val_dir, unknown)
    classes = tuple(name for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1]))
    return train, test, train_eval, classes, img_size


# =================================================================================================
# public API
# =================================================================================================
def _generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for one purpose (``salt``) of one run seed."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % (2**63))


def _subset_indices(n: int, keep: int | None, seed: int, salt: int) -> torch.Tensor | None:
    """The first ``keep`` of a seeded permutation of ``range(n)``, or None to keep everything."""
    if keep is None or keep >= n:
        return None
    return torch.randperm(n, generator=_generator(seed, salt))[:keep]


def _size(ds: Dataset) -> int:
    return len(ds)  # type: ignore[arg-type]  # every dataset here is map-style


def _take(ds: Dataset, idx: torch.Tensor | None) -> Dataset:
    if idx is None:
        return ds
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


def load_datasets(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the dataset named by ``cfg`` and apply the seeded ``train_subset`` / ``test_subset``."""
    train: Dataset
    test: Dataset
    train_eval: Dataset | None = None
    if cfg.name == "fashion_mnist":
        train, test = _load_fashion_mnist(cfg)
        classes, in_chans, img_size = FASHION_MNIST_CLASSES, 1, 28
    elif cfg.name == "digits":
        train, test = _load_digits()
        classes, in_chans, img_size = DIGITS_CLASSES, 1, 8
    elif cfg.name == "imagefolder":
        train, test, train_eval, classes, img_size = _load_imagefolder(cfg)
        in_chans = 3
    else:  # pragma: no cover - DataConfig.name is a Literal
        raise ConfigError(f"data.name={cfg.name!r} is not one of fashion_mnist, digits, imagefolder")

    val: Dataset | None = None
    if cfg.val_split is not None:
        val_idx, rest = _stratified_split(_labels(train), cfg.val_split, cfg.val_seed)
        val = _take(train_eval if train_eval is not None else train, val_idx)
        train = _take(train, rest)
        if train_eval is not None:
            train_eval = _take(train_eval, rest)
    train_idx = _subset_indices(_size(train), cfg.train_subset, seed, _SALT_TRAIN_SUBSET)
    test_idx = _subset_indices(_size(test), cfg.test_subset, seed, _SALT_TEST_SUBSET)
    train = _take(train, train_idx)
    test = _take(test, test_idx)
    if train_eval is not None:
        train_eval = _take(train_eval, train_idx)
    logger.info(
        "data %s: %d train / %d validation / %d test samples, %d classes, input %dx%dx%d",
        cfg.name,
        _size(train),
        _size(val) if val is not None else 0,
        _size(test),
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


def _labels(ds: Dataset) -> Tensor:
    """The class label of every sample, without loading images where the dataset knows them."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if isinstance(ds, Subset):
        return _labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    samples = getattr(getattr(ds, "reader", None), "samples", None)  # timm's folder reader
    if samples is not None:
        return torch.as_tensor([int(target) for _, target in samples], dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(_size(ds))], dtype=torch.long)


def _stratified_split(labels: Tensor, size: float | int, seed: int) -> tuple[Tensor, Tensor]:
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
    gen = _generator(seed, _SALT_VALIDATION)
    held: list[Tensor] = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = (labels == cls).nonzero().flatten()  # (n_c,)
        held.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    held_idx = torch.cat(held).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held_idx] = False
    return held_idx, keep.nonzero().flatten()


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
            generator=_generator(seed, 0),  # seeds the workers' augmentation
            **common,
        )
    else:
        train_loader = DataLoader(
            bundle.train,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=_generator(seed, 0),
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
    n = _size(source)
    wanted = cfg.calib_batches * cfg.calib_batch_size
    if wanted > n:
        logger.warning("calibration wants %d samples but the training set has %d; using all", wanted, n)
    order = torch.randperm(n, generator=_generator(seed, _SALT_CALIBRATION))[:wanted]
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
