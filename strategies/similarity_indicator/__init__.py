"""``similarity_indicator``: head-balanced automatic channel pruning (METHOD.md sections 3.1-3.7).

One search trains, on a deep copy of the dense model, a real-valued indicator per prunable channel
(query/key pair, value, MLP hidden unit) together with the model weights and per-channel reweight
scales. Every forward pass:

1. ``score = (1 + alpha * (w - 1)) * m`` (or ``m + alpha * (w - 1)``), ``w`` the channel-similarity
   weights computed once from calibration activations (section 3.2);
2. hard masks ``1[score > tau]``, made head-balanced: the layer keeps ``round(k / H)`` channels in
   every head, each head its own top channels by score (section 3.3); gradients reach the scores
   through a straight-through estimator (section 3.1);
3. reweight scales multiply the kept queries and values (section 3.4);
4. loss = cross-entropy (+ distillation) + ``lam * penalty(MACs / target - 1)``, the MACs being the
   analytic cost of the straight-through kept counts, so differentiable (section 3.6).

The final architecture always meets the budget: if the search ends above it, whole width steps are
taken away, head-balanced, from the dimension that loses the least score per MAC saved (logged and
recorded in ``info``). Indicators of focused linear-attention layers may start from the
attention-difference criterion of section 3.5 (:func:`attention_difference_scores`).

Every ``checkpoint_every`` steps the whole state goes atomically to
``ctx.work_dir / "similarity_indicator.pt"``; a later search with the same context and config resumes
from it and ends exactly where an uninterrupted one would. The trained weights are kept in that file
too (``info["trained_weights"]``).

Under ``torchrun`` the search is data-parallel: every rank trains the same copy on its shard of
``ctx.train_loader`` and the gradients of every trainable tensor are averaged across ranks after each
backward (one flattened all-reduce per step), so all ranks hold the same indicators, scales and
weights. The calibration statistics (Gram matrices, attention differences) are summed over the
ranks' shares of the calibration batches; rank 0 alone writes checkpoints and picks the final
selection, which it broadcasts. On CUDA the forward passes run under autocast (``amp``).
"""

from __future__ import annotations

from .config import CHECKPOINT_NAME, SimilarityIndicatorConfig
from .init import attention_difference_scores, indicator_init_from_difference, query_subset
from .masks import (
    allowed_widths,
    dimension_masks,
    fit_budget,
    foldable_kinds,
    nearest_width,
    nearest_width_tensor,
    padded_width,
    top_channels,
)
from .parallel import Reducer
from .search import SimilarityIndicator
from .similarity import channel_gram, channel_grams, similarity_weights, weights_from_gram, weights_from_grams
from .state import load_searched_weights

__all__ = [
    "CHECKPOINT_NAME",
    "Reducer",
    "SimilarityIndicator",
    "SimilarityIndicatorConfig",
    "allowed_widths",
    "attention_difference_scores",
    "channel_gram",
    "channel_grams",
    "dimension_masks",
    "fit_budget",
    "foldable_kinds",
    "indicator_init_from_difference",
    "load_searched_weights",
    "nearest_width",
    "nearest_width_tensor",
    "padded_width",
    "query_subset",
    "similarity_weights",
    "top_channels",
    "weights_from_gram",
    "weights_from_grams",
]
