"""Plugin discovery through entry points.

Strategies live in the group ``nas_headprune.strategies`` and space adapters in
``nas_headprune.spaces``; built-ins are declared in this project's ``pyproject.toml`` exactly as a
third-party package would declare its own. Entry points are loaded lazily, by name; two
distributions that publish the same name are an error; listing isolates a plugin that fails to load.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from nas_headprune.errors import ConfigError, DuplicatePluginError, UnknownNameError

if TYPE_CHECKING:
    from nas_headprune.strategy import Strategy

log = logging.getLogger(__name__)

STRATEGY_GROUP = "nas_headprune.strategies"
SPACE_GROUP = "nas_headprune.spaces"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    value: str
    provider: str


def _entries(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            raise DuplicatePluginError(
                f"plugin name {ep.name!r} in group {group!r} is published twice: "
                f"{found[ep.name].value} and {ep.value}; uninstall one of them"
            )
        found[ep.name] = ep
    return found


def _provider(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown"


def list_plugins(group: str) -> list[PluginInfo]:
    return [PluginInfo(n, ep.value, _provider(ep)) for n, ep in sorted(_entries(group).items())]


def load_object(spec: str) -> Any:
    """Import ``package.module:Attr``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UnknownNameError(f"{spec!r} is not of the form 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownNameError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise UnknownNameError(f"{module_name!r} has no attribute {attr!r}") from exc
    return obj


def load_plugin(group: str, name: str) -> Any:
    """Load one plugin by entry-point name, or by ``package.module:Name``."""
    if ":" in name:
        return load_object(name)
    entries = _entries(group)
    if name not in entries:
        choices = ", ".join(sorted(entries)) or "(none installed)"
        raise UnknownNameError(f"unknown name {name!r} in {group!r}; choose one of: {choices}")
    return entries[name].load()


def space_adapters() -> list[Any]:
    """One instance of every installed space adapter, in name order."""
    adapters = []
    for name, ep in sorted(_entries(SPACE_GROUP).items()):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            log.error("space adapter %r (%s) failed to load: %s", name, ep.value, exc)
            continue
        adapters.append(cls())
    return adapters


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class registered as ``name`` (or ``package.module:Class``)."""
    from nas_headprune.strategy import Strategy

    obj = load_plugin(STRATEGY_GROUP, name)
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise UnknownNameError(f"{name!r} is not a nas_headprune Strategy subclass (got {obj!r})")
    return obj


def make_strategy(
    name: str, options: dict[str, Any] | None = None, prefix: str = "strategy_options"
) -> Strategy[Any]:
    """Look up ``name`` and validate ``options`` against its ``Config`` (errors name the field,
    under ``prefix``: where the options came from)."""
    from pydantic import ValidationError

    from nas_headprune.config import validation_message

    cls = strategy_class(name)
    try:
        config = cls.Config.model_validate(options or {})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, prefix=prefix, model=cls.Config)) from exc
    return cls(config)
