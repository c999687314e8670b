"""ImageNet-style image folders: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or
``validation``) read with timm, with timm's training augmentation for the training split and its
eval transform for the test split."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from nas_headprune.config import DEFAULT_IMG_SIZE, DataConfig
from nas_headprune.errors import ConfigError, DataNotFoundError

logger = logging.getLogger(__name__)

_VAL_DIR_NAMES = ("val", "validation")


def load_imagefolder(cfg: DataConfig) -> tuple[Dataset, Dataset, Dataset, tuple[str, ...], int]:
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
