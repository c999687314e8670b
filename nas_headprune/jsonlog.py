"""JSON records that other tools can read: NaN and infinity become ``null``, and JSON-lines logs.

No torch, no project imports: the fine-tune (evaluator layer) and the run folder (pipeline layer)
both write these records.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["JsonLines", "finite_json"]


def finite_json(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """``value`` with every NaN or infinity replaced by ``None``, and the dotted places replaced.

    JSON has no NaN or infinity; a record that holds them is not JSON that other tools can read.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "<root>"]
    if isinstance(value, Mapping):
        out, bad = {}, []
        for key, item in value.items():
            out[key], sub = finite_json(item, f"{where}.{key}" if where else str(key))
            bad += sub
        return out, bad
    if isinstance(value, (list, tuple)):
        items, bad = [], []
        for i, item in enumerate(value):
            clean, sub = finite_json(item, f"{where}[{i}]")
            items.append(clean)
            bad += sub
        return items, bad
    return value, []


class JsonLines:
    """Appends one JSON object per line to ``path``, flushed at once (``metrics.jsonl`` of a run, of a
    fine-tune); NaN and infinity are written as ``null``. A no-op when ``path`` is None or the
    writer is not ``enabled`` (every rank but the first under torchrun)."""

    def __init__(self, path: str | os.PathLike[str] | None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        clean, _ = finite_json(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
            fh.flush()
