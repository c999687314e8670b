"""What a run starts from: the device, the dense model and its data section, the dense weights' hash,
the library versions a record names, and the check that the model takes the data's images."""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from nas_headprune import __version__
from nas_headprune.config import DataConfig, RunConfig
from nas_headprune.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    """A run config's ``device`` as the device string the stages use (``"auto"``: CUDA when
    available); the rule is :func:`nas_headprune.evaluator.metrics.resolve_device`'s."""
    from nas_headprune.evaluator.metrics import resolve_device as resolve

    return str(resolve(name))


def load_base_model(cfg: RunConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The dense model and what is known about it (``data`` defaults for the embedded one)."""
    from nas_headprune.models.dense import embedded_dir, load_dense, load_weights
    from nas_headprune.models.factory import create_model

    if cfg.model.name.startswith("embedded"):
        model, record = load_dense(embedded_dir(cfg.model.name))
        return model, record
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # random initial weights are the seed's, so a rerun gets the same model
        model = create_model(cfg.model.name, **cfg.model.kwargs)
    if cfg.model.checkpoint and cfg.model.checkpoint_format == "flatten_official":
        from nas_headprune.models.flatten import load_official_checkpoint

        if not Path(cfg.model.checkpoint).is_file():
            raise ConfigError(f"model.checkpoint: weights file {cfg.model.checkpoint} does not exist")
        load_official_checkpoint(model, cfg.model.checkpoint)
    elif cfg.model.checkpoint:
        load_weights(model, cfg.model.checkpoint)
    else:
        log.warning(
            "model %s has no checkpoint: pruning randomly initialised weights",
            cfg.model.name,
        )
    return model.eval(), {"name": cfg.model.name, "kwargs": cfg.model.kwargs}


def resolve_data(cfg: RunConfig, record: dict[str, Any]) -> DataConfig:
    """The run's data section: the embedded model's defaults, then what the config sets."""
    if not cfg.model.name.startswith("embedded"):
        return cfg.data
    merged = {**record.get("data", {}), **cfg.data.model_dump(exclude_unset=True)}
    return DataConfig.model_validate(merged)


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's state (names, shapes, dtypes and values): what the dense model *is*."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{list(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import timm

    return {
        "nas_headprune": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def check_fits_data(model: torch.nn.Module, size: tuple[int, ...], num_classes: int, cfg: RunConfig) -> None:
    """One forward on a blank image of the data's size: a model that cannot take it is a config error."""
    p = next(model.parameters(), None)
    x = torch.zeros(1, *size, device=p.device if p is not None else "cpu")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model {cfg.model.name!r} cannot take the images of data.name={cfg.data.name!r} "
            f"(channels, height, width = {tuple(size)}): {first}. Build the model to fit the data, e.g. "
            "--set model.kwargs.in_chans=1 --set model.kwargs.img_size=28 --set model.kwargs.num_classes=10"
        ) from exc
    finally:
        model.train(was)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[-1] < num_classes:
        raise ConfigError(
            f"model {cfg.model.name!r} has {logits.shape[-1]} outputs but data.name={cfg.data.name!r} has "
            f"{num_classes} classes; set model.kwargs.num_classes={num_classes}"
        )
