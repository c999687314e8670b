"""The strategy's options and schedules, and the constants its checkpoints use."""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import Field

from nas_headprune.strategy import (
    WidthConfig,
)

log = logging.getLogger(__name__)


CHECKPOINT_NAME = "similarity_indicator.pt"
_FORMAT = 1
_EPS = 1e-12
#: config fields left out of the resume fingerprint: ``checkpoint_every`` does not change the result;
#: ``amp`` is fingerprinted as the autocast dtype it gives on the device (none on the CPU)
_NOT_FINGERPRINTED = ("checkpoint_every", "amp")
#: what :meth:`SimilarityIndicator._save` writes (``cuda_rng`` may be None)
_STATE_KEYS = frozenset(
    {
        "format",
        "fingerprint",
        "step",
        "indicators",
        "gammas",
        "similarity",
        "model",
        "optimizer",
        "rng",
        "cuda_rng",
        "batches",
        "history",
        "init_layers",
        "init_skipped",
    }
)
#: also written by :meth:`SimilarityIndicator._save`; optional on reading, because checkpoints
#: written before it existed lack it (it is then unknown which dimensions got no similarity weights)
_SIMILARITY_SKIPPED = "similarity_skipped"


class SimilarityIndicatorConfig(WidthConfig):
    """Options of :class:`SimilarityIndicator`; each names the METHOD.md choice it implements.

    ``steps``, ``init_other`` and ``lam_warmup`` default to the setting the ``similarity_study``
    ablation picked on the validation split (docs/results/ablations/similarity_study); before it they
    were 200, uniform and 0.0, which the ablation files made before the study pin."""

    similarity: Literal["none", "redundancy", "alignment"] = Field(
        "redundancy",
        description="3.2 channel-similarity weights: 'redundancy' w = 1 - mean |cos| to the head's other "
        "channels; 'alignment' w = |cos| to the head's mean channel; 'none' w = 1",
    )
    combine: Literal["multiplicative", "additive"] = Field(
        "multiplicative",
        description="3.2 score = (1 + alpha*(w-1)) * m (multiplicative) or m + alpha*(w-1) (additive)",
    )
    alpha: float = Field(1.0, ge=0, description="3.2 strength of the similarity weights; 0 = plain indicator")
    balance: bool = Field(
        True,
        description="3.3 head-balanced adjustment every forward; false keeps the raw threshold masks "
        "(unequal heads) and reports the padded cost (widest head times H)",
    )
    reweight: bool = Field(
        True, description="3.4 train per-channel query/value scales, folded at materialisation"
    )
    init: Literal["uniform", "attention_difference", "shuffled_difference"] = Field(
        "uniform",
        description="3.5 start of the qk indicators of linear-attention layers: 1.0 (uniform) or "
        "tau + init_margin * normalise(D); softmax layers always start at 1.0. shuffled_difference is "
        "an ablation control: the same starting values, dealt to the layer's channels in a seeded "
        "random order",
    )
    init_margin: float = Field(
        1.0,
        ge=0,
        description="3.5 margin of the attention-difference initialisation; 1.0 puts the median channel "
        "(with init_scale=rank) at tau + 0.5, where the softmax layers' indicators start",
    )
    init_scale: Literal["minmax", "rank"] = Field(
        "rank",
        description="3.5 normalise(D) over the layer: min-max scaled to [0, 1], or the channel's rank "
        "spread evenly over [0, 1] (robust to a D dominated by a few channels)",
    )
    init_query_tokens: int = Field(
        256, ge=1, description="3.5 query tokens sampled per image for the attention difference"
    )
    init_other: Literal["uniform", "taylor", "shuffled_taylor"] = Field(
        "taylor",
        description="start of the indicators the attention-difference init does not set (softmax "
        "attention, MLPs): 1.0 (uniform) or tau + init_margin * normalise(first-order Taylor score on "
        "the calibration batches), normalised like init_scale; shuffled_taylor is its control, the same "
        "values dealt in a seeded random order",
    )
    head_indicator: bool = Field(
        False,
        description="an indicator per head in the layers that may drop whole heads (space.prune_heads): "
        "a layer keeps the heads whose indicator exceeds tau (at least one), trained with the channel "
        "indicators under the same MACs penalty; it starts at 1.0, or from the head's summed Taylor "
        "channel scores with init_other taylor. Off by default until measured; space.prune_heads "
        "needs it on",
    )
    tau: float = Field(0.5, description="3.1 threshold: a channel is kept when its score exceeds tau")
    lam: float = Field(10.0, ge=0, description="3.6 weight of the MACs penalty")
    penalty: Literal["above", "two_sided"] = Field(
        "above",
        description="3.6 squared error of MACs/target - 1 only above the target, or on both sides",
    )
    steps: int = Field(600, ge=0, description="3.7 search steps (batches)")
    lr_indicator: float = Field(0.02, gt=0, description="Adam learning rate of the indicators")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="schedule of the indicators' learning rate: constant, or cosine to 0"
    )
    lam_warmup: float = Field(
        0.3,
        ge=0,
        le=1,
        description="fraction of the steps over which the MACs penalty weight ramps linearly from 0 to "
        "lam (an annealed penalty); 0 applies lam from the first step",
    )
    lr_weights: float = Field(1e-4, ge=0, description="AdamW learning rate of the model weights")
    lr_scales: float = Field(5e-3, ge=0, description="Adam learning rate of the reweight scales")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the model weights")
    train_weights: bool = Field(
        True, description="3.7 train the weights jointly (on a copy; the input model is never changed)"
    )
    distill: bool = Field(False, description="3.6 add KL(teacher || student) from the frozen dense model")
    calib_batches_for_similarity: int = Field(
        4, ge=1, description="3.2/3.5 calibration batches used for the similarity weights and the init"
    )
    checkpoint_every: int = Field(
        50, ge=0, description="save the search state every this many steps into ctx.work_dir (0: never)"
    )
    amp: bool = Field(
        True,
        description="mixed precision on CUDA: the forward passes run under autocast (bf16 where the GPU "
        "supports it, else fp16 with a gradient scaler); ignored on the CPU",
    )


def _lam(cfg: SimilarityIndicatorConfig, step: int) -> float:
    """The MACs penalty weight at ``step`` (0-based): ``lam``, ramped up over ``lam_warmup`` of the steps."""
    ramp = cfg.lam_warmup * cfg.steps
    return cfg.lam if ramp <= 0 else cfg.lam * min(1.0, (step + 1) / ramp)


def _indicator_lr(cfg: SimilarityIndicatorConfig, step: int) -> float:
    """The indicators' learning rate at ``step`` (0-based) under ``lr_schedule``."""
    if cfg.lr_schedule == "constant" or cfg.steps <= 0:
        return cfg.lr_indicator
    return cfg.lr_indicator * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
