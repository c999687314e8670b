"""Run configuration: pydantic models (unknown keys are errors), YAML presets and dotted overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nas_headprune.errors import ConfigError


def _allowed(model: type[BaseModel] | None, loc: tuple) -> str:
    """The allowed choices / fields at ``loc``, for error messages."""
    if model is None:
        return ""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return ""
        current = fields[part].annotation
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return ""
    fields = getattr(current, "model_fields", None)
    if fields is None:
        return ""
    last = loc[-1]
    if last not in fields:
        return "; valid keys here: " + ", ".join(sorted(fields))
    return ""


def validation_message(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One readable line per error, each naming the dotted field."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(((prefix,) if prefix else ()) + loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key{_allowed(model, loc)}")
        else:
            got = err.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{dotted}: {err['msg']}{got_s}")
    return "invalid configuration: " + "; ".join(lines)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("embedded", description="'embedded' (the shipped model) or a timm model name")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model arguments")
    checkpoint: str | None = Field(None, description="weights to load (.safetensors or .pt state dict)")


class SpaceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    skip_unsupported: bool = False


class RunConfig(BaseModel):
    """Everything a ``search`` run needs; ``strategy_options`` is validated by the strategy."""

    model_config = ConfigDict(extra="forbid")
    strategy: str = "magnitude"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    budget: float = Field(0.5, gt=0, le=1, description="target MACs as a fraction of dense, in (0, 1]")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    data: dict[str, Any] = Field(default_factory=dict)
    reweight: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)
    throughput_batch: int = Field(64, ge=1)
    progress: bool = True


def preset_names(subdir: str = "") -> list[str]:
    folder = resources.files("nas_headprune.configs")
    if subdir:
        folder = folder / subdir
        if not folder.is_dir():
            return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(source: str, subdir: str = "", what: str = "config") -> dict[str, Any]:
    """A YAML file path or a preset name from ``nas_headprune.configs`` (``/subdir``); ``yaml.safe_load``
    only. ``what`` names the kind of file in error messages."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {source!r} does not exist")
        text = path.read_text()
    else:
        folder = resources.files("nas_headprune.configs")
        candidate = (folder / subdir if subdir else folder) / f"{source}.yaml"
        if not candidate.is_file():
            raise ConfigError(
                f"{source!r} is neither a {what} file nor a preset; presets: {', '.join(preset_names(subdir))}"
            )
        text = candidate.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {source!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {source!r} must be a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(source: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    data: dict[str, Any] = read_yaml(source) if source else {}
    for item in overrides or []:
        apply_override(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, model=RunConfig)) from exc


class TrainConfig(BaseModel):
    """``nas-headprune train``: a dense model trained from scratch on one data set."""

    model_config = ConfigDict(extra="forbid")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="vit_tiny_patch16_224"))
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True


def load_train_config(source: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = read_yaml(source) if source else {}
    for item in overrides or []:
        apply_override(data, item)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, model=TrainConfig)) from exc
