"""What the stages of one run share: the config, the run folder, the dense model, the data, the space,
and the run's ``metrics.jsonl``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nas_headprune.config import DataConfig, RunConfig
from nas_headprune.jsonlog import JsonLines
from nas_headprune.runfolder import RunFolder


class MetricsLog:
    """The run's ``metrics.jsonl``: one event per line, with its name and time."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.lines = JsonLines(path, enabled)

    def write(self, event: str, **fields: Any) -> None:
        self.lines.write({"event": event, "time": time.time(), **fields})


@dataclass
class RunState:
    """What the stages share: the config, the folder, the dense model, the data and the space."""

    cfg: RunConfig
    folder: RunFolder
    restart: bool
    strategy: Any
    data_cfg: DataConfig
    record: dict[str, Any]
    model: torch.nn.Module
    device: str | torch.device
    rank: int
    world: int
    mlog: MetricsLog
    resolved: dict[str, Any]
    dense_sha256: str
    timings: dict[str, float] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # filled by the stages
    bundle: Any = None
    train_loader: Any = None
    test_loader: Any = None
    calib: Any = None
    size: tuple[int, ...] = ()
    space: Any = None
    dense_macs: int = 0
    latency: Any = None  # the LatencyTable of a budget_kind: latency run
    latency_rounds: Any = None  # the refinement's rounds (latency.refine_rounds), when it ran

    @property
    def out(self) -> Path:
        return self.folder.path

    @property
    def main(self) -> bool:
        return self.rank == 0

    def base_record(self) -> dict[str, Any]:
        return {"name": self.record["name"], "kwargs": self.record.get("kwargs", {})}
