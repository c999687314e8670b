"""``nas-headprune ablate``: a declared grid of search runs, executed resumably into a results store.

The ablation file's format, the expansion into trials and the way they run are described in
:mod:`nas_headprune.ablation`, whose modules hold the code; the names here are the ones the command
line, the launchers and scripts import.
"""

from __future__ import annotations

from nas_headprune.ablation.execute import run_trial, summarize
from nas_headprune.ablation.spec import (
    AblationSpec,
    LauncherConfig,
    QuickSpec,
    Variant,
    load_spec,
    preset_names,
)
from nas_headprune.ablation.sweep import AblationOutcome, open_store, run_ablation
from nas_headprune.ablation.trials import (
    BASE_VARIANT,
    Trial,
    expand,
    parse_shard,
    shard_trials,
    validate_trials,
)

__all__ = [
    "BASE_VARIANT",
    "AblationOutcome",
    "AblationSpec",
    "LauncherConfig",
    "QuickSpec",
    "Trial",
    "Variant",
    "expand",
    "load_spec",
    "open_store",
    "parse_shard",
    "preset_names",
    "run_ablation",
    "run_trial",
    "shard_trials",
    "summarize",
    "validate_trials",
]
