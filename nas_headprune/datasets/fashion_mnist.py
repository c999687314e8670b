"""Fashion-MNIST: the original IDX files (gzipped or not), read with numpy and kept in memory as a
:class:`~torch.utils.data.TensorDataset` of normalised ``(N, 1, 28, 28)`` images.

The files are looked for, in order, in ``data.root``, in the folder named by an environment variable,
in the folder of the Debian package ``dataset-fashion-mnist`` and in a download cache; if none holds
them and ``data.download`` is true, torchvision downloads them into the cache. The caller names those
places (:mod:`nas_headprune.data` keeps them as module constants).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from nas_headprune.config import DataConfig
from nas_headprune.datasets.tensors import to_tensors
from nas_headprune.errors import DataNotFoundError

logger = logging.getLogger(__name__)

# Sub-folders of a searched folder that may hold the IDX files: the folder itself, the layout of the
# Debian package and of NAS_HEADPRUNE_DATA ("fashion-mnist"), and torchvision's download layout.
_FASHION_MNIST_SUBDIRS: tuple[str, ...] = ("", "fashion-mnist", os.path.join("FashionMNIST", "raw"))

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


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (plain or gzipped) into a uint8 array of its shape.

    The arrays are read-only and kept for the process's life, keyed by the file's path, size and
    modification time: an ablation runs many trials in one process, and each would otherwise
    decompress the same 30 MB again."""
    return _read_idx_cached(*_idx_key(path, expected_magic))


def _idx_key(path: Path, expected_magic: int) -> tuple[str, int, int, int]:
    """What the decoded file is kept under: its resolved path, size, modification time and magic."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataNotFoundError(f"cannot read IDX file {path}: {exc}; delete it and fetch it again") from exc
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected_magic


def _normalised(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as float images normalised with the Fashion-MNIST mean and std, and int64 labels.

    Kept for the process's life like the arrays they come from (keyed by both files' path, size and
    modification time): the tensors are shared by every load in the process, and nothing in the
    project writes into them (subsets and batches are copies)."""
    return _normalised_cached(
        _idx_key(images_path, _IDX_IMAGES_MAGIC), _idx_key(labels_path, _IDX_LABELS_MAGIC)
    )


@functools.lru_cache(maxsize=2)
def _normalised_cached(
    images: tuple[str, int, int, int], labels: tuple[str, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    ds = to_tensors(
        _read_idx_cached(*images), _read_idx_cached(*labels), FASHION_MNIST_MEAN, FASHION_MNIST_STD, 255.0
    )
    return ds.tensors[0], ds.tensors[1]


@functools.lru_cache(maxsize=8)
def _read_idx_cached(file: str, size: int, mtime_ns: int, expected_magic: int) -> np.ndarray:
    path = Path(file)
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


def find_fashion_mnist(
    cfg: DataConfig, *, env_var: str, debian_dir: Path, cache_dir: Path
) -> dict[str, Path]:
    """Search every place in order (``data.root``, the folder named by ``$env_var``, ``debian_dir``,
    ``cache_dir``, then a download into ``cache_dir``); raise :class:`DataNotFoundError` listing them
    all if none has it."""
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

    env = os.environ.get(env_var)
    if env:
        found = look(Path(env).expanduser(), f"${env_var}")
        if found:
            return found
    else:
        tried.append(f"${env_var}: not set")

    found = look(debian_dir, "Debian package dataset-fashion-mnist")
    if found:
        return found

    found = look(cache_dir, "download cache")
    if found:
        return found

    if cfg.download:
        reason = _download_fashion_mnist(cache_dir)
        if reason is None:
            found = _fashion_mnist_files(cache_dir)
            if found:
                return found
            reason = "torchvision finished but the IDX files are not where expected"
        tried.append(f"torchvision download into {cache_dir}: {reason}")
    else:
        tried.append("torchvision download: disabled (data.download=false)")

    places = "\n".join(f"  - {line}" for line in tried)
    names = ", ".join(f"{stem}[.gz]" for stem in FASHION_MNIST_FILES.values())
    raise DataNotFoundError(
        f"Fashion-MNIST not found. Looked for {names} in:\n{places}\n"
        "Fix it with one of:\n"
        "  - set data.root to a folder that holds the four IDX files\n"
        f"  - set {env_var} to such a folder (or to a folder with a fashion-mnist/ sub-folder)\n"
        "  - apt-get install dataset-fashion-mnist (puts them in "
        f"{debian_dir})\n"
        "  - allow the download: data.download=true and internet access"
    )


def load_fashion_mnist(
    cfg: DataConfig, *, env_var: str, debian_dir: Path, cache_dir: Path
) -> tuple[TensorDataset, TensorDataset]:
    """The training and test splits, from the files :func:`find_fashion_mnist` finds in those places."""
    files = find_fashion_mnist(cfg, env_var=env_var, debian_dir=debian_dir, cache_dir=cache_dir)
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
        splits.append(TensorDataset(*_normalised(images_path, labels_path)))
    return splits[0], splits[1]
