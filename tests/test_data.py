from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from nas_headprune import data
from nas_headprune.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataConfig,
    calibration_batches,
    input_size,
    load_datasets,
    make_loaders,
)
from nas_headprune.errors import ConfigError, DataNotFoundError

N_TRAIN, N_TEST = 12, 5


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the user's environment or writes to the real cache."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")


def _write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _write_fashion(folder: Path, compress: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Write four tiny IDX files into ``folder``; return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": np.array([9, 8, 7, 6, 5], dtype=np.uint8),
    }
    for key, stem in data.FASHION_MNIST_FILES.items():
        magic = 0x0803 if key.endswith("images") else 0x0801
        _write_idx(folder / stem, arrays[key], magic, compress)
    return arrays


def _nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point the Debian folder at an empty place so only what a test writes can be found."""
    empty = tmp_path / "no-debian"
    empty.mkdir(exist_ok=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", empty)


def _labels_in_order(loader: torch.utils.data.DataLoader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


# --- Fashion-MNIST --------------------------------------------------------------------------------
@pytest.mark.skipif(
    not data.DEBIAN_FASHION_MNIST_DIR.is_dir(),
    reason="Debian package dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)",
)
def test_fashion_mnist_from_debian_package() -> None:
    bundle = load_datasets(DataConfig(name="fashion_mnist", download=False))
    x_train, y_train = bundle.train.tensors
    x_test, y_test = bundle.test.tensors
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert bundle.num_classes == 10 and bundle.classes == FASHION_MNIST_CLASSES
    assert (bundle.in_chans, bundle.img_size, bundle.name) == (1, 28, "fashion_mnist")
    assert input_size(bundle) == (1, 28, 28)
    # the set is balanced: 6000 / 1000 of every class, labels 0..9
    assert torch.bincount(y_train).tolist() == [6000] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [1000] * 10
    # byte order: the first training and test images are ankle boots
    assert y_train[0].item() == 9 and y_test[0].item() == 9
    # normalised with the published statistics
    assert abs(x_train.mean().item()) < 0.01 and abs(x_train.std().item() - 1.0) < 0.01
    raw_min = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert x_train.min().item() == pytest.approx(raw_min, abs=1e-5)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_fashion_mnist_from_configured_root(tmp_path, monkeypatch, compress) -> None:
    _nowhere(monkeypatch, tmp_path)
    arrays = _write_fashion(tmp_path / "fm", compress)
    bundle = load_datasets(DataConfig(root=str(tmp_path / "fm"), download=False))
    x, y = bundle.train.tensors
    assert x.shape == (N_TRAIN, 1, 28, 28) and len(bundle.test) == N_TEST
    expected = (
        torch.from_numpy(arrays["train_images"]).float() / 255 - FASHION_MNIST_MEAN
    ) / FASHION_MNIST_STD
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == arrays["train_labels"].tolist()
    assert bundle.test.tensors[1].tolist() == [9, 8, 7, 6, 5]


def test_corrupt_idx_magic_names_the_file(tmp_path, monkeypatch) -> None:
    _nowhere(monkeypatch, tmp_path)
    arrays = _write_fashion(tmp_path / "fm", compress=True)
    bad = _write_idx(tmp_path / "fm" / "train-images-idx3-ubyte", arrays["train_images"], 0x0802, True)
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte.gz") as info:
        load_datasets(DataConfig(root=str(tmp_path / "fm"), download=False))
    assert "magic" in str(info.value) and str(bad) in str(info.value)


def test_truncated_idx_names_the_file(tmp_path, monkeypatch) -> None:
    _nowhere(monkeypatch, tmp_path)
    _write_fashion(tmp_path / "fm", compress=False)
    path = tmp_path / "fm" / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_datasets(DataConfig(root=str(tmp_path / "fm"), download=False))
    assert "expected" in str(info.value)


@pytest.mark.parametrize("layout", ["folder", "subfolder"])
def test_fashion_mnist_from_env_var(tmp_path, monkeypatch, layout) -> None:
    _nowhere(monkeypatch, tmp_path)
    base = tmp_path / "datasets"
    _write_fashion(base / "fashion-mnist" if layout == "subfolder" else base, compress=True)
    monkeypatch.setenv(data.ENV_VAR, str(base))
    bundle = load_datasets(DataConfig(download=False))
    assert len(bundle.train) == N_TRAIN and len(bundle.test) == N_TEST


def test_configured_root_comes_before_env_var(tmp_path, monkeypatch) -> None:
    _nowhere(monkeypatch, tmp_path)
    from_root = _write_fashion(tmp_path / "root", compress=False, seed=1)
    _write_fashion(tmp_path / "env", compress=False, seed=2)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    bundle = load_datasets(DataConfig(root=str(tmp_path / "root"), download=False))
    got = bundle.train.tensors[0][:, 0]
    expected = (
        torch.from_numpy(from_root["train_images"]).float() / 255 - FASHION_MNIST_MEAN
    ) / FASHION_MNIST_STD
    torch.testing.assert_close(got, expected)


def test_not_found_lists_every_place_and_fix(tmp_path, monkeypatch) -> None:
    _nowhere(monkeypatch, tmp_path)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env-empty"))
    with pytest.raises(DataNotFoundError) as info:
        load_datasets(DataConfig(download=False))
    msg = str(info.value)
    for place in (tmp_path / "env-empty", data.DEBIAN_FASHION_MNIST_DIR, data.CACHE_DIR):
        assert str(place) in msg
    for fix in ("data.root", data.ENV_VAR, "apt-get install dataset-fashion-mnist", "download"):
        assert fix in msg


@pytest.mark.parametrize("exists", [True, False])
def test_a_named_root_without_the_files_is_refused_not_replaced(tmp_path, monkeypatch, exists) -> None:
    _nowhere(monkeypatch, tmp_path)
    _write_fashion(tmp_path / "env", compress=False)  # a copy elsewhere must not be read instead
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    root = tmp_path / "empty-root"
    if exists:
        root.mkdir()
    with pytest.raises(DataNotFoundError, match=r"data\.root=.*empty-root holds no Fashion-MNIST"):
        load_datasets(DataConfig(root=str(root), download=False))


def test_download_failure_is_caught_and_reported(tmp_path, monkeypatch) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: network is unreachable")

    _nowhere(monkeypatch, tmp_path)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataNotFoundError, match="network is unreachable") as info:
        load_datasets(DataConfig(download=True))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_download_lands_in_cache_and_is_read(tmp_path, monkeypatch) -> None:
    import torchvision.datasets

    calls: list[str] = []

    class FakeDownload:  # writes the files where torchvision puts them
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(root)
            _write_fashion(Path(root) / "FashionMNIST" / "raw", compress=False)

    _nowhere(monkeypatch, tmp_path)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownload)
    bundle = load_datasets(DataConfig(download=True))
    assert calls == [str(data.CACHE_DIR)]
    assert len(bundle.train) == N_TRAIN
    # a second load finds the cache and does not download again
    load_datasets(DataConfig(download=True))
    assert len(calls) == 1


# --- digits, subsets, loaders, calibration -------------------------------------------------------
def test_digits_sizes_and_fixed_split() -> None:
    a = load_datasets(DataConfig(name="digits"), seed=0)
    b = load_datasets(DataConfig(name="digits"), seed=7)
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.train.tensors[0].shape == (1437, 1, 8, 8) and a.train.tensors[0].dtype == torch.float32
    assert a.train.tensors[1].dtype == torch.int64
    assert set(a.train.tensors[1].tolist()) == set(range(10)) and a.num_classes == 10
    assert input_size(a) == (1, 8, 8)
    # the split does not depend on the run seed
    for split in ("train", "test"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(ta, tb)
    # train and test together are exactly the 1,797 scikit-learn images, each once
    from sklearn.datasets import load_digits

    full = load_digits()
    ours = torch.cat([a.train.tensors[0], a.test.tensors[0]]).flatten(1) * data.DIGITS_STD + data.DIGITS_MEAN
    ours_keys = sorted(
        zip(
            (ours * 16).round().sum(1).long().tolist(),
            torch.cat([a.train.tensors[1], a.test.tensors[1]]).tolist(),
            strict=True,
        )
    )
    full_keys = sorted(zip(full.data.sum(1).astype(int).tolist(), full.target.tolist(), strict=True))
    assert ours_keys == full_keys


def test_digits_are_read_as_scikit_learn_reads_them_without_importing_it(monkeypatch) -> None:
    import sys

    import numpy as np
    from sklearn.datasets import load_digits

    from nas_headprune.datasets.digits import read_digits

    full = load_digits()
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    images, labels = read_digits()
    assert "sklearn" not in sys.modules  # reading the file imported no scikit-learn
    assert images.dtype == full.images.dtype and np.array_equal(images, full.images)
    assert np.array_equal(labels, full.target)


def _shared_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    rows_a = {tuple(r.tolist()) for r in a}
    return len({tuple(r.tolist()) for r in b} & rows_a)


def test_subsets_are_seeded() -> None:
    cfg = DataConfig(name="digits", train_subset=100, test_subset=40)
    a, b, c = (load_datasets(cfg, seed=s) for s in (3, 3, 4))
    assert (len(a.train), len(a.test)) == (100, 40)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    full = load_datasets(DataConfig(name="digits"))
    assert len(load_datasets(DataConfig(name="digits", train_subset=10_000)).train) == len(full.train)


def test_loader_order_is_seeded() -> None:
    cfg = DataConfig(name="digits", batch_size=64, eval_batch_size=100)
    bundle = load_datasets(cfg)
    first = _labels_in_order(make_loaders(bundle, cfg, seed=0)[0])
    again = _labels_in_order(make_loaders(bundle, cfg, seed=0)[0])
    other = _labels_in_order(make_loaders(bundle, cfg, seed=1)[0])
    assert first == again and first != other
    assert sorted(first) == sorted(bundle.train.tensors[1].tolist())
    train_loader, test_loader = make_loaders(bundle, cfg, seed=0)
    assert _labels_in_order(train_loader) == first
    assert _labels_in_order(train_loader) != first  # the next epoch is reshuffled
    assert _labels_in_order(test_loader) == bundle.test.tensors[1].tolist()  # never shuffled
    x, _ = next(iter(train_loader))
    assert x.shape == (64, 1, 8, 8)


def test_distributed_loader_uses_seeded_sampler(tmp_path) -> None:
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cfg = DataConfig(name="digits", batch_size=128)
        bundle = load_datasets(cfg)
        loader, _ = make_loaders(bundle, cfg, seed=5, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 5
        again, _ = make_loaders(bundle, cfg, seed=5, distributed=True)
        other, _ = make_loaders(bundle, cfg, seed=6, distributed=True)
        assert _labels_in_order(loader) == _labels_in_order(again) != _labels_in_order(other)
    finally:
        dist.destroy_process_group()


def test_calibration_batches_are_deterministic() -> None:
    cfg = DataConfig(name="digits", calib_batches=3, calib_batch_size=16)
    bundle = load_datasets(cfg)
    a = calibration_batches(bundle, cfg, seed=0)
    b = calibration_batches(bundle, cfg, seed=0)
    c = calibration_batches(bundle, cfg, seed=1)
    assert [x.shape for x, _ in a] == [(16, 1, 8, 8)] * 3 and all(y.shape == (16,) for _, y in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    # every sample comes from the training set, none twice
    drawn = torch.cat([x for x, _ in a]).flatten(1)
    assert _shared_rows(drawn, bundle.train.tensors[0].flatten(1)) == torch.unique(drawn, dim=0).shape[0]
    assert torch.unique(drawn, dim=0).shape[0] == 48


def test_calibration_on_small_training_set() -> None:
    cfg = DataConfig(name="digits", train_subset=20, calib_batches=3, calib_batch_size=16)
    bundle = load_datasets(cfg)
    sizes = [x.shape[0] for x, _ in calibration_batches(bundle, cfg, seed=0)]
    assert sizes == [16, 4]


# --- imagefolder ----------------------------------------------------------------------------------
def _write_images(root: Path, val_name: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), (val_name, 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_imagefolder(tmp_path, val_name) -> None:
    _write_images(tmp_path / "imgs", val_name)
    cfg = DataConfig(
        name="imagefolder", root=str(tmp_path / "imgs"), img_size=32, calib_batches=1, calib_batch_size=4
    )
    bundle = load_datasets(cfg)
    assert (len(bundle.train), len(bundle.test)) == (6, 4)
    assert bundle.num_classes == 2 and bundle.classes == ("cat", "dog")
    assert input_size(bundle) == (3, 32, 32)
    img, label = bundle.test[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert sorted(int(bundle.test[i][1]) for i in range(4)) == [0, 0, 1, 1]
    assert bundle.train[0][0].shape == (3, 32, 32)
    (xa, ya), (xb, yb) = calibration_batches(bundle, cfg, 0)[0], calibration_batches(bundle, cfg, 0)[0]
    assert xa.shape == (4, 3, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    train_loader, _ = make_loaders(bundle, DataConfig(**{**cfg.model_dump(), "batch_size": 6}), seed=0)
    x, y = next(iter(train_loader))
    assert x.shape == (6, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


def test_imagefolder_needs_root() -> None:
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_datasets(DataConfig(name="imagefolder"))


def test_imagefolder_without_val_folder(tmp_path) -> None:
    _write_images(tmp_path / "imgs", "val")
    (tmp_path / "imgs" / "val").rename(tmp_path / "imgs" / "holdout")
    with pytest.raises(DataNotFoundError, match="validation"):
        load_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "imgs")))


# --- DataConfig -----------------------------------------------------------------------------------
def test_config_defaults() -> None:
    cfg = DataConfig()
    assert (cfg.name, cfg.batch_size, cfg.eval_batch_size, cfg.calib_batches, cfg.download) == (
        "fashion_mnist",
        256,
        512,
        4,
        True,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_sise": 32},
        {"batch_size": 0},
        {"eval_batch_size": -1},
        {"num_workers": -1},
        {"calib_batches": 0},
        {"train_subset": 0},
        {"name": "cifar10"},
        {"name": "fashion_mnist", "img_size": 224},
    ],
    ids=lambda kw: ",".join(kw),
)
def test_config_rejects(kwargs) -> None:
    with pytest.raises(ValidationError):
        DataConfig(**kwargs)


# ----------------------------------------------------------------------------- validation split


def _digit_labels(ds) -> torch.Tensor:
    return ds.tensors[1]


@pytest.mark.parametrize("size, expected", [(0.2, 287), (100, 100)])
def test_val_split_is_stratified_disjoint_and_seeded(size, expected) -> None:
    full = load_datasets(DataConfig(name="digits"))
    bundle = load_datasets(DataConfig(name="digits", val_split=size), seed=3)
    assert bundle.val is not None and len(bundle.val) == expected
    assert len(bundle.train) + len(bundle.val) == len(full.train)
    # disjoint: no training image is in the validation split
    train_x = {tuple(x.flatten().tolist()) for x in bundle.train.tensors[0]}
    assert not any(tuple(x.flatten().tolist()) in train_x for x in bundle.val.tensors[0])
    # stratified: every class holds out its share, within one sample
    all_counts = torch.bincount(_digit_labels(full.train), minlength=10).double()
    val_counts = torch.bincount(_digit_labels(bundle.val), minlength=10).double()
    assert (val_counts - all_counts * expected / len(full.train)).abs().max() < 1.0
    # the split depends on val_seed only, not on the run seed; calibration never draws from it
    again = load_datasets(DataConfig(name="digits", val_split=size), seed=7)
    assert torch.equal(again.val.tensors[0], bundle.val.tensors[0])
    other = load_datasets(DataConfig(name="digits", val_split=size, val_seed=1), seed=3)
    assert not torch.equal(other.val.tensors[0], bundle.val.tensors[0])
    calib = calibration_batches(
        bundle, DataConfig(name="digits", calib_batches=4, calib_batch_size=64), seed=3
    )
    assert not any(tuple(x.flatten().tolist()) not in train_x for b in calib for x in b[0])


def test_train_subset_is_drawn_after_the_val_split() -> None:
    bundle = load_datasets(DataConfig(name="digits", val_split=0.25, train_subset=200))
    assert len(bundle.train) == 200 and bundle.val is not None and len(bundle.val) == 359


@pytest.mark.parametrize("size", [0.0, 1.0, -3, 0])
def test_val_split_out_of_range_is_refused(size) -> None:
    with pytest.raises(ValueError, match="val_split"):
        DataConfig(name="digits", val_split=size)


def test_val_split_that_leaves_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="val_split=5000"):
        load_datasets(DataConfig(name="digits", val_split=5000))


def test_decoded_idx_files_are_kept_until_the_file_changes(tmp_path) -> None:
    from nas_headprune.datasets import fashion_mnist as fm

    rng = np.random.default_rng(3)
    first, second = (rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8) for _ in range(2))
    path = _write_idx(tmp_path / "images", first, 0x0803, True)
    a, b = fm._read_idx(path, 0x0803), fm._read_idx(path, 0x0803)
    assert b is a and np.array_equal(a, first)  # read once, kept
    assert not a.flags.writeable  # what is kept cannot be changed by a caller
    # the same file with other contents (a new size or modification time) is read again
    _write_idx(tmp_path / "images", second, 0x0803, False).replace(path)
    assert np.array_equal(fm._read_idx(path, 0x0803), second)
    with pytest.raises(DataNotFoundError, match="cannot read IDX file"):
        fm._read_idx(tmp_path / "missing.gz", 0x0803)


def test_normalised_splits_are_kept_until_the_files_change(tmp_path) -> None:
    from nas_headprune.config import DataConfig
    from nas_headprune.datasets.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from nas_headprune.datasets.tensors import to_tensors

    arrays = _write_fashion(tmp_path / "fm", compress=False)
    cfg = DataConfig(root=str(tmp_path / "fm"))

    def load() -> tuple[torch.Tensor, ...]:
        train, test = data.load_datasets(cfg).train, data.load_datasets(cfg).test
        return (*train.tensors, *test.tensors)

    first, again = load(), load()
    assert all(a is b for a, b in zip(first, again, strict=True))  # converted once, shared
    expected = to_tensors(
        arrays["train_images"], arrays["train_labels"], FASHION_MNIST_MEAN, FASHION_MNIST_STD, 255.0
    )
    assert torch.equal(first[0], expected.tensors[0]) and torch.equal(first[1], expected.tensors[1])
    # new contents in the same place (another size) are converted again
    images = data.FASHION_MNIST_FILES["train_images"]
    bigger = np.concatenate([arrays["train_images"], arrays["train_images"][:1]])
    _write_idx(tmp_path / "fm" / images, bigger, 0x0803, False)
    _write_idx(
        tmp_path / "fm" / data.FASHION_MNIST_FILES["train_labels"], np.arange(len(bigger)) % 10, 0x0801, False
    )
    changed = load()
    assert changed[0].shape[0] == len(bigger) and changed[0] is not first[0]
