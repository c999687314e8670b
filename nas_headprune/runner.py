"""The search pipeline's entry points, :func:`run_search` and :func:`run_train`, with the stages and
helpers they are built from.

The pipeline lives in :mod:`nas_headprune.pipeline`, one module per stage group (its docstring
describes the four stages and the run folder); the names here are the ones scripts import.
"""

from __future__ import annotations

from nas_headprune.pipeline.evaluate import stage_evaluate
from nas_headprune.pipeline.finetune import stage_finetune
from nas_headprune.pipeline.loading import (
    load_base_model,
    resolve_data,
    resolve_device,
    versions,
    weights_sha256,
)
from nas_headprune.pipeline.reweight import stage_reweight
from nas_headprune.pipeline.run import run_search
from nas_headprune.pipeline.search import Searched, stage_search
from nas_headprune.pipeline.state import MetricsLog
from nas_headprune.pipeline.train import run_train

__all__ = [
    "MetricsLog",
    "Searched",
    "load_base_model",
    "resolve_data",
    "resolve_device",
    "run_search",
    "run_train",
    "stage_evaluate",
    "stage_finetune",
    "stage_reweight",
    "stage_search",
    "versions",
    "weights_sha256",
]
