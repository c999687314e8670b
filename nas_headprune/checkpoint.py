"""Torch checkpoint files: the fingerprint they record, atomic writes and guarded reads.

A resumable loop (the fine-tune, a search that trains) saves its whole state now and then and, on
the next call, continues from it only when the file was written for the same work. The pieces every
such loop needs are here: :func:`fingerprint` hashes a JSON record of what the state depends on,
:func:`save_checkpoint` writes the state so that a reader never sees half a file, and
:func:`load_checkpoint` reads it with ``weights_only=True`` and turns whatever torch raises for a
damaged file into a :class:`~nas_headprune.errors.CheckpointError` with the caller's message. What the
state holds, and how its entries are checked, stays with each loop.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from nas_headprune.atomic import atomic_path
from nas_headprune.errors import CheckpointError

__all__ = ["fingerprint", "load_checkpoint", "save_checkpoint"]


def fingerprint(record: Any) -> str:
    """SHA-256 (hex digits) of ``record`` as JSON with sorted keys; equal records give equal hashes."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save(state)`` to ``path`` atomically: a reader sees the old file or the new one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device, *, unreadable: str
) -> Any:
    """What ``torch.load(path, weights_only=True)`` gives, tensors mapped to ``map_location``.

    A file torch cannot load (truncated, not a torch file, holding types ``weights_only`` refuses)
    raises :class:`~nas_headprune.errors.CheckpointError` with the message ``unreadable``, in which
    ``{path}`` becomes the path and ``{error}`` the exception's type and text.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
        raise CheckpointError(unreadable.format(path=path, error=f"{type(exc).__name__}: {exc}")) from exc
