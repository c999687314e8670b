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

import copy
import dataclasses
import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from nas_headprune.allocate import BudgetError, check_reachable
from nas_headprune.atomic import atomic_path
from nas_headprune.errors import (
    ArchitectureError,
    CheckpointError,
    NonFiniteLossError,
    StrategyError,
    UsageError,
)
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.finetune import kl_to_teacher
from nas_headprune.evaluator.metrics import amp_dtype, batch_inputs
from nas_headprune.space import (
    QUERY_SCALE,
    ChannelSink,
    DimSpec,
    HeadSpace,
    LayerSpace,
    MaskSet,
    SpaceAdapter,
    split_label,
)
from nas_headprune.strategy import (
    SearchContext,
    SearchResult,
    Strategy,
    WidthConfig,
    resolve_width_step,
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
    """Options of :class:`SimilarityIndicator`; each names the METHOD.md choice it implements."""

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
        "uniform",
        description="start of the indicators the attention-difference init does not set (softmax "
        "attention, MLPs): 1.0 (uniform) or tau + init_margin * normalise(first-order Taylor score on "
        "the calibration batches), normalised like init_scale; shuffled_taylor is its control, the same "
        "values dealt in a seeded random order",
    )
    tau: float = Field(0.5, description="3.1 threshold: a channel is kept when its score exceeds tau")
    lam: float = Field(10.0, ge=0, description="3.6 weight of the MACs penalty")
    penalty: Literal["above", "two_sided"] = Field(
        "above",
        description="3.6 squared error of MACs/target - 1 only above the target, or on both sides",
    )
    steps: int = Field(200, ge=0, description="3.7 search steps (batches)")
    lr_indicator: float = Field(0.02, gt=0, description="Adam learning rate of the indicators")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="schedule of the indicators' learning rate: constant, or cosine to 0"
    )
    lam_warmup: float = Field(
        0.0,
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


# ====================================================================== data parallelism


class Reducer(Protocol):
    """Sums or maxes tensors across the processes of a data-parallel search, in place; every process
    calls it with tensors of the same shapes in the same order."""

    def sum_(self, tensors: Sequence[Tensor]) -> None: ...

    def max_(self, tensors: Sequence[Tensor]) -> None: ...


class _DataParallel:
    """The collectives of a search under ``torchrun``: one flattened buffer per dtype and call, on
    the backend's device (the GPU for NCCL, the CPU for gloo). In one process nothing happens."""

    def __init__(self, ctx: SearchContext, device: torch.device) -> None:
        self.rank, self.world = ctx.rank, ctx.world_size
        self.active = ctx.distributed
        nccl = self.active and dist.get_backend() == "nccl"
        self.device = device if nccl else torch.device("cpu")
        self._flags: dict[tuple[bool, ...], Tensor] = {}
        #: set (on the device, without a host sync) when the ranks' backwards reached different parameters
        self.mismatch: Tensor | None = None

    def _flat(self, tensors: Sequence[Tensor], collective: Callable[[Tensor], Any]) -> None:
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for dtype in sorted(by_dtype, key=str):  # the same order on every rank
            group = by_dtype[dtype]
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])  # (sum numel,)
            collective(flat)
            with torch.no_grad():
                for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                    t.copy_(part.view(t.shape))

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Every rank gets rank 0's values."""
        if self.active and tensors:
            self._flat(tensors, lambda flat: dist.broadcast(flat, src=0))

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        if self.active and tensors:
            self._flat(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))

    def max_(self, tensors: Sequence[Tensor]) -> None:
        if self.active and tensors:
            self._flat(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.MAX))

    def average_grads_(self, params: Sequence[Tensor]) -> None:
        """Replace every gradient by its mean over the ranks: one all-reduce for all of them, no host
        sync. A parameter without a gradient here adds zeros; if some rank had one for it (its
        backward took another path), ``mismatch`` is set and the search stops at its next sync."""
        if not self.active:
            return
        present = tuple(p.grad is not None for p in params)
        flags = self._flags.get(present)
        if flags is None:  # built once per pattern: no host-to-device copy per step
            flags = self._flags[present] = torch.tensor(present, dtype=torch.float32, device=self.device)
        counts = flags.clone()  # after the mean: 1 where every rank had a gradient, 0 where none had
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

        def mean(flat: Tensor) -> None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world)

        self._flat([*grads, counts], mean)
        partial = ((counts > 0) & (counts < 1)).any()
        self.mismatch = partial if self.mismatch is None else self.mismatch | partial


def _share(ctx: SearchContext, items: list[Any], comm: _DataParallel) -> tuple[list[Any], Reducer | None]:
    """This rank's share of ``items`` and the reducer that adds the shares up; every rank takes all
    of them (and nothing is reduced) in one process, or when there are fewer items than ranks."""
    if not comm.active or len(items) < comm.world:
        return items, None
    return ctx.shard(items), comm


# =============================================================== 3.2 channel-similarity weights


def channel_gram(features: Tensor) -> Tensor:
    """``(H, d, T)`` channel activations -> ``(H, d, d)`` Gram matrices ``z_i . z_j`` in float64."""
    z = features.double()
    return torch.einsum("hit,hjt->hij", z, z)  # (H, d, d)


def weights_from_gram(gram: Tensor, reading: Literal["redundancy", "alignment"]) -> Tensor:
    """Per-head channel weights ``(H, d)`` (mean 1 per head) from Gram matrices ``(H, d, d)``.

    ``redundancy``: ``w_j = 1 - mean_{i != j} |cos(z_i, z_j)|``; ``alignment``:
    ``w_j = |cos(z_j, mean_i z_i)|`` (the absolute value because a channel's sign is arbitrary: negating
    a q and k row, or a v row and its proj column, leaves the model unchanged). A channel that is
    zero on the calibration data carries nothing and gets weight 0. Each head's weights are then
    divided by their mean; a head whose weights are all 0 gets weight 1 everywhere.
    """
    g = gram.double()
    heads, d, _ = g.shape
    sq = g.diagonal(dim1=-2, dim2=-1).clamp_min(0)  # (H, d) squared norms
    live = sq > _EPS * sq.amax(dim=-1, keepdim=True).clamp_min(_EPS)  # (H, d)
    norm = sq.sqrt()
    if reading == "redundancy":
        if d == 1:
            return torch.ones(heads, d, dtype=torch.float32)
        cos = g / (norm.unsqueeze(-1) * norm.unsqueeze(-2)).clamp_min(_EPS)  # (H, d, d)
        cos = cos * (live.unsqueeze(-1) & live.unsqueeze(-2))
        off = cos.abs().sum(-1) - cos.abs().diagonal(dim1=-2, dim2=-1)  # (H, d)
        w = 1.0 - (off / (d - 1)).clamp(0, 1)
    elif reading == "alignment":
        to_mean = g.sum(-1)  # (H, d): z_j . sum_i z_i
        mean_norm = g.sum((-2, -1)).clamp_min(0).sqrt().unsqueeze(-1)  # (H, 1): |sum_i z_i|
        w = (to_mean.abs() / (norm * mean_norm).clamp_min(_EPS)).clamp(0, 1)
    else:
        raise UsageError(f"unknown similarity reading {reading!r}; choose 'redundancy' or 'alignment'")
    w = torch.where(live, w, torch.zeros_like(w))
    mean = w.mean(-1, keepdim=True)
    w = torch.where(mean > _EPS, w / mean.clamp_min(_EPS), torch.ones_like(w))
    return w.float()


def _gram_shape(space: HeadSpace, label: str) -> tuple[int, int]:
    """``(H, d)`` of an attention dimension, ``(1, m)`` of an MLP's: the leading shape of its Gram
    matrices."""
    d = space.dims[label]
    return (d.heads, d.max_width) if space.per_head(label) else (1, d.max_width)


@torch.no_grad()
def channel_grams(
    model: nn.Module,
    space: HeadSpace,
    batches: Sequence[Any],
    device: str | torch.device = "cpu",
    *,
    reduce: Reducer | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Gram matrices of every dimension's channel activations over all tokens of ``batches``, and
    the labels of the dimensions that got no activations.

    Each layer's adapter hands the activations over through hooks
    (:meth:`~nas_headprune.space.SpaceAdapter.watch_channels`): the queries and the keys for
    ``:qk`` (their Gram matrices add up, as if the two were concatenated over tokens), the values
    for ``:v``, the hidden units for ``:hidden``. A Gram matrix is ``(H, d, d)``, ``(1, m, m)`` for
    an MLP, float64, on the CPU. Dimensions of width 1 are in neither result: their weight is 1 by
    definition. A dimension whose adapter cannot watch its layer, or whose hooks handed nothing
    over, is logged as a warning and listed. ``model`` is run in eval mode and left as it was.
    Under ``torchrun`` each process passes its share of the batches and a ``reduce`` that sums the
    matrices and the token counts over the processes, so every one gets those of all the batches.
    """
    modules = dict(model.named_modules())
    wanted = [label for label, d in space.dims.items() if d.max_width > 1]
    grams: dict[str, Tensor] = {}
    tokens = dict.fromkeys(wanted, 0)

    def sink_for(layer: LayerSpace) -> ChannelSink:
        def sink(kind: str, z: Tensor) -> None:
            d = layer.dims.get(kind)
            if d is None:
                raise ArchitectureError(
                    f"{layer.label}: the {layer.adapter.name} adapter handed over activations of "
                    f"{kind!r}; the layer's dimensions are {', '.join(layer.dims)}"
                )
            if d.label not in tokens:  # width 1
                return
            heads, width = _gram_shape(space, d.label)
            channels = (width,) if layer.kind == "mlp" else (heads, width)
            if tuple(z.shape[-len(channels) :]) != channels:
                raise ArchitectureError(
                    f"{d.label}: the {layer.adapter.name} adapter handed over activations of shape "
                    f"{tuple(z.shape)}, expected (..., {', '.join(map(str, channels))})"
                )
            flat = z.reshape(-1, heads, width).contiguous()  # (T, H, d): every token of every image
            g = channel_gram(rearrange(flat, "t h d -> h d t")).cpu()  # (H, d, d)
            grams[d.label] = grams[d.label] + g if d.label in grams else g
            tokens[d.label] += flat.shape[0]

        return sink

    cannot: dict[str, list[str]] = {}  # layer -> its dimensions, when its adapter cannot watch it
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, layer in space.layers.items():
            labels = [d.label for d in layer.dims.values() if d.label in tokens]
            if not labels:
                continue
            if name not in modules:
                raise ArchitectureError(f"model has no module {name!r}: was the space built from it?")
            found = layer.adapter.watch_channels(modules[name], layer, sink_for(layer))
            if found is None:
                cannot[name] = labels
            else:
                handles.extend(found)
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                model(batch_inputs(batch).to(device))
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if reduce is not None:  # every process sums the same tensors in the same order, even with no batch
        for label in wanted:
            heads, width = _gram_shape(space, label)
            grams.setdefault(label, torch.zeros(heads, width, width, dtype=torch.float64))
        counts = torch.tensor([float(tokens[label]) for label in wanted], dtype=torch.float64)
        reduce.sum_([*(grams[label] for label in wanted), counts])
        tokens = {label: int(n) for label, n in zip(wanted, counts.tolist(), strict=True)}
    unseen = [label for label in wanted if tokens[label] == 0]
    for name, labels in cannot.items():
        log.warning(
            "%s: the %s adapter cannot hand over channel activations (watch_channels); similarity "
            "weight 1 for %s",
            name,
            space.layers[name].adapter.name,
            ", ".join(labels),
        )
    idle = [label for label in unseen if split_label(label)[0] not in cannot]
    if idle:
        log.warning(
            "no channel activations reached the similarity weights of %s in %d calibration batches "
            "(the adapter's hooks never ran); similarity weight 1",
            ", ".join(idle),
            len(batches),
        )
    for label in unseen:
        grams.pop(label, None)
    return grams, unseen


def weights_from_grams(
    space: HeadSpace, grams: Mapping[str, Tensor], reading: Literal["redundancy", "alignment"]
) -> dict[str, Tensor]:
    """:func:`weights_from_gram` of every dimension that has Gram matrices, 1 for the others:
    ``(H, d)`` per attention dimension, ``(m,)`` per MLP."""
    out: dict[str, Tensor] = {}
    for label, d in space.dims.items():
        if label in grams:
            w = weights_from_gram(grams[label], reading)
        else:
            w = torch.ones(d.heads, d.max_width)
        out[label] = w if space.per_head(label) else w[0]
    return out


def similarity_weights(
    model: nn.Module,
    space: HeadSpace,
    batches: Sequence[Any],
    reading: Literal["redundancy", "alignment"],
    device: str | torch.device = "cpu",
    *,
    reduce: Reducer | None = None,
) -> dict[str, Tensor]:
    """Channel-similarity weights per dimension label: ``(H, d)`` for attention, ``(m,)`` for MLPs.

    The Gram matrices of :func:`channel_grams` turned into weights by :func:`weights_from_gram`;
    weight 1 for a dimension of width 1 and for one that got no activations (logged as a warning
    by :func:`channel_grams`, which also lists them). ``reduce``: see :func:`channel_grams`.
    """
    grams, _ = channel_grams(model, space, batches, device, reduce=reduce)
    return weights_from_grams(space, grams, reading)


# ================================================== 3.5 attention-difference initialisation


def query_subset(tokens: int, max_query_tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted query positions: all of them when ``tokens <= max_query_tokens``, else a seeded sample."""
    if max_query_tokens < 1:
        raise UsageError(f"max_query_tokens must be >= 1, got {max_query_tokens}")
    if tokens <= max_query_tokens:
        return torch.arange(tokens)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.randperm(tokens, generator=gen)[:max_query_tokens].sort().values


def attention_difference_scores(
    phi_q: Tensor,
    phi_k: Tensor,
    max_query_tokens: int,
    *,
    generator: torch.Generator | None = None,
    reduce: Reducer | None = None,
) -> Tensor:
    """``D[h, j] = ||A_h - A_h^(-j)||_F / ||A_h||_F`` for a linear attention (METHOD.md 3.5).

    ``phi_q``, ``phi_k``: the (non-negative) focused query / key features, ``(B, H, N, d)``. ``A_h`` is
    the row-normalised map ``phi(Q) phi(K)^T`` (each row sums to 1) and ``A_h^(-j)`` the same map
    without channel ``j``'s term ``phi(Q)[:, j] phi(K)[:, j]^T``; the norms run over all images.
    At most ``max_query_tokens`` query rows are used per image (the same seeded sample for every
    image and head). A row that only channel ``j`` feeds has no map without it and counts as 0.

    Nothing of size ``queries x N`` is materialised: with ``S = phi(Q) phi(K)^T``, ``r = S 1`` and
    ``G = phi(K)^T phi(K)`` (``d x d``), each row's squared difference is
    ``(r^2 |S_j|^2 - 2 r r_j <S, S_j> + r_j^2 |S|^2) / (r^2 (r - r_j)^2)``, where ``|S|^2 = q G q^T``,
    ``<S, S_j> = q_j (q G)_j``, ``|S_j|^2 = q_j^2 G_jj`` and ``r_j = q_j sum_n k_nj``, so memory is
    ``O(B H (queries + d) d)``.

    Under ``torchrun`` each process passes its share of the images and a ``reduce`` across the
    processes: the numerators and denominators are summed (and the scale of the degenerate-row
    thresholds is maxed), so every process gets ``D`` over all the images.
    """
    if phi_q.dim() != 4 or phi_q.shape[:2] != phi_k.shape[:2] or phi_q.shape[-1] != phi_k.shape[-1]:
        raise UsageError(
            f"phi_q and phi_k must be (B, H, N, d) with the same B, H, d; got {tuple(phi_q.shape)} "
            f"and {tuple(phi_k.shape)}"
        )
    idx = query_subset(phi_q.shape[2], max_query_tokens, generator).to(phi_q.device)
    q = phi_q.index_select(2, idx).double()  # (B, H, Q, d)
    k = phi_k.double()  # (B, H, N, d)
    gram = torch.einsum("bhnd,bhne->bhde", k, k)  # (B, H, d, d)
    k_sum = k.sum(2)  # (B, H, d)
    qg = torch.einsum("bhqd,bhde->bhqe", q, gram)  # (B, H, Q, d)
    s_sq = (qg * q).sum(-1, keepdim=True)  # (B, H, Q, 1): |S_q|^2
    r = (q * k_sum.unsqueeze(2)).sum(-1, keepdim=True)  # (B, H, Q, 1): row sums of S
    r_j = q * k_sum.unsqueeze(2)  # (B, H, Q, d): row sums of channel j's term
    cross = q * qg  # (B, H, Q, d): <S_q, S_j,q>
    own = q.square() * gram.diagonal(dim1=-2, dim2=-1).unsqueeze(2)  # (B, H, Q, d): |S_j,q|^2
    rest = r - r_j  # (B, H, Q, d): row sums without channel j
    if reduce is None:
        scale = rest.abs().amax().clamp_min(_EPS)
    else:  # the thresholds below must not depend on how the images are split
        scale = rest.abs().amax().reshape(1)
        reduce.max_([scale])
        scale = scale[0].clamp_min(_EPS)
    valid_row = r > _EPS * scale  # (B, H, Q, 1)
    has_rest = rest > _EPS * scale  # (B, H, Q, d)
    num = (r.square() * own - 2 * r * r_j * cross + r_j.square() * s_sq).clamp_min(0)
    diff = num / (r.square() * rest.square()).clamp_min(_EPS**2)
    a_sq = s_sq / r.square().clamp_min(_EPS**2)  # (B, H, Q, 1): |A_q|^2
    diff = torch.where(has_rest, diff, a_sq.expand_as(diff)) * valid_row
    total = (a_sq * valid_row).sum((0, 2))  # (H, 1)
    if reduce is None:
        return (diff.sum((0, 2)) / total.clamp_min(_EPS)).sqrt().float()  # (H, d)
    sums = torch.cat([diff.sum((0, 2)), total], dim=-1)  # (H, d + 1): numerators, denominator
    reduce.sum_([sums])
    return (sums[:, :-1] / sums[:, -1:].clamp_min(_EPS)).sqrt().float()  # (H, d)


def indicator_init_from_difference(
    diff: Tensor, tau: float, margin: float, scale: Literal["minmax", "rank"] = "minmax"
) -> Tensor:
    """``m0 = tau + margin * normalise(D)`` over the whole layer (all 1 when every channel has the
    same ``D``). ``minmax`` rescales ``D`` to [0, 1]; ``rank`` puts the channel with the i-th smallest
    ``D`` at ``i / (n - 1)`` (equal values share their mean rank)."""
    lo, hi = diff.min(), diff.max()
    if not hi > lo:
        norm = torch.ones_like(diff)
    elif scale == "minmax":
        norm = (diff - lo) / (hi - lo)
    else:
        flat = diff.flatten().double()
        below = (flat.unsqueeze(1) > flat.unsqueeze(0)).sum(1).double()  # values strictly smaller
        ties = (flat.unsqueeze(1) == flat.unsqueeze(0)).sum(1).double()  # itself included
        norm = ((below + (ties - 1) / 2) / (flat.numel() - 1)).reshape(diff.shape)
    return (tau + margin * norm).float()


def _attention_difference_init(
    model: nn.Module,
    space: HeadSpace,
    ctx: SearchContext,
    cfg: SimilarityIndicatorConfig,
    comm: _DataParallel | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Initial qk indicators of the linear-attention layers whose adapter exposes
    ``focused_features(module, *args, **kwargs) -> (phi_q, phi_k)``, each ``(B, H, N, d)``. With a
    ``comm`` that spans several processes each one reads its share of the calibration batches."""
    linear = [lay for lay in space.layers.values() if lay.adapter.attention_kind == "linear"]
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    if not linear:
        return out, skipped
    modules = dict(model.named_modules())
    feats: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    missing: set[str] = set()
    handles = []
    for layer in linear:

        def hook(mod: nn.Module, args: tuple, kwargs: dict, _layer: LayerSpace = layer) -> None:
            found = _layer.adapter.focused_features(mod, *args, **kwargs)
            if found is None:  # the adapter cannot compute phi(Q), phi(K) for this module
                missing.add(_layer.label)
                return
            phi_q, phi_k = found
            feats[_layer.label].append((phi_q.detach().cpu(), phi_k.detach().cpu()))

        handles.append(modules[layer.label].register_forward_pre_hook(hook, with_kwargs=True))
    calib = ctx.calib[: cfg.calib_batches_for_similarity]
    batches, reduce = _share(ctx, calib, comm) if comm is not None else (calib, None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch_inputs(batch).to(ctx.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for label in sorted(missing):
        log.warning("%s: its adapter gives no focused_features(); qk indicators start at 1.0", label)
        skipped.append(label)
    for label in sorted(set(feats) - missing):  # the same order on every rank: one reduction each
        pairs = feats[label]
        phi_q = torch.cat([p[0] for p in pairs])  # (B, H, N, d)
        phi_k = torch.cat([p[1] for p in pairs])  # (B, H, N, d)
        gen = ctx.torch_generator(f"similarity_indicator:init:{label}")
        diff = attention_difference_scores(phi_q, phi_k, cfg.init_query_tokens, generator=gen, reduce=reduce)
        m0 = indicator_init_from_difference(diff, cfg.tau, cfg.init_margin, cfg.init_scale)
        if cfg.init == "shuffled_difference":
            order = torch.randperm(
                m0.numel(), generator=ctx.torch_generator(f"similarity_indicator:init-shuffle:{label}")
            )
            m0 = m0.flatten()[order].reshape(m0.shape)
        out[f"{label}:qk"] = m0
        log.info(
            "%s: qk indicators initialised from the attention difference (D in [%.3g, %.3g])",
            label,
            float(diff.min()),
            float(diff.max()),
        )
    return out, skipped


def _taylor_init(space: HeadSpace, ctx: SearchContext, cfg: SimilarityIndicatorConfig) -> dict[str, Tensor]:
    """Initial indicators of every dimension from its channels' first-order Taylor scores on the
    calibration batches (the ``taylor`` strategy's scores, summed over ranks under torchrun), mapped
    like the attention-difference init: ``tau + init_margin * normalise(score)`` per dimension."""
    from nas_headprune.strategies.taylor import Taylor

    calib = ctx.calib[: cfg.calib_batches_for_similarity]
    scores = Taylor().score(dataclasses.replace(ctx, space=space, calib=calib))
    out: dict[str, Tensor] = {}
    for label in sorted(scores):
        m0 = indicator_init_from_difference(scores[label].double(), cfg.tau, cfg.init_margin, cfg.init_scale)
        if cfg.init_other == "shuffled_taylor":
            gen = ctx.torch_generator(f"similarity_indicator:taylor-shuffle:{label}")
            m0 = m0.flatten()[torch.randperm(m0.numel(), generator=gen)].reshape(m0.shape)
        out[label] = m0.reshape(_shape(space, label))
    log.info("indicators of %d dimensions initialised from first-order Taylor scores", len(out))
    return out


def _lam(cfg: SimilarityIndicatorConfig, step: int) -> float:
    """The MACs penalty weight at ``step`` (0-based): ``lam``, ramped up over ``lam_warmup`` of the steps."""
    ramp = cfg.lam_warmup * cfg.steps
    return cfg.lam if ramp <= 0 else cfg.lam * min(1.0, (step + 1) / ramp)


def _indicator_lr(cfg: SimilarityIndicatorConfig, step: int) -> float:
    """The indicators' learning rate at ``step`` (0-based) under ``lr_schedule``."""
    if cfg.lr_schedule == "constant" or cfg.steps <= 0:
        return cfg.lr_indicator
    return cfg.lr_indicator * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))


# ======================================================= 3.1 / 3.3 masks and widths


def nearest_width(per_head: float, spec: DimSpec) -> int:
    """The allowed width of ``spec`` nearest to ``per_head`` (ties keep the wider)."""
    return min(spec.allowed(), key=lambda w: (abs(w - per_head), -w))


def padded_width(widest: int, spec: DimSpec) -> int:
    """The smallest allowed width of ``spec`` holding ``widest`` channels."""
    fits = [w for w in spec.allowed() if w >= widest]
    return min(fits) if fits else spec.max_width


def allowed_widths(spec: DimSpec, device: str | torch.device = "cpu") -> Tensor:
    """The allowed widths of ``spec``, widest first, as a long tensor (for :func:`dimension_masks`)."""
    return torch.tensor(sorted(spec.allowed(), reverse=True), dtype=torch.long, device=device)


def nearest_width_tensor(count: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """:func:`nearest_width` of ``count / heads`` on the device, without a host sync: ``allowed``
    widest first (:func:`allowed_widths`), compared in integers as ``|w * heads - count|``, so a tie
    keeps the wider width exactly as :func:`nearest_width` does."""
    gap = (allowed * heads - count).abs()  # (n,)
    # argmin takes the first, the widest, of equal gaps; gather, since indexing with a tensor syncs
    return allowed.gather(0, torch.argmin(gap).reshape(1)).squeeze(0)


def top_channels(score: Tensor, width: int | Tensor) -> Tensor:
    """0/1 mask ``(H, d)`` of each head's top-``width`` channels by score (ties: lower index), the
    same order as :meth:`HeadSpace.selection_from_scores`. ``width`` may be a 0-d tensor."""
    order = torch.sort(-score.detach().float(), dim=1, stable=True).indices  # (H, d)
    place = torch.arange(order.shape[1], device=order.device).expand_as(order)  # (H, d)
    rank = torch.empty_like(order).scatter_(1, order, place)  # (H, d): each channel's place in its head
    return (rank < width).to(score.dtype)


def dimension_masks(
    score: Tensor, spec: DimSpec, tau: float, balance: bool, allowed: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One dimension's masks from its scores (``(H, d)``, or ``(m,)`` for an MLP).

    Returns ``(hard, ste, width)``: the 0/1 mask; the same values with the straight-through gradient
    to ``score``; the per-head kept width as a tensor whose value is the hard width and whose
    gradient is the straight-through count of channels above ``tau``, divided by ``H``. With
    ``balance`` every head keeps its top ``nearest_width(k / H)`` channels (``k`` the count above
    ``tau`` in the whole dimension); without it the mask is ``score > tau`` as is and the width the
    mean per-head count. Everything stays on the scores' device (no host sync); ``allowed`` is
    :func:`allowed_widths` of ``spec`` on that device, built once by a caller that loops.
    """
    heads = spec.heads
    s = score.reshape(heads, -1)  # (H, d)
    above = s.detach() > tau  # (H, d)
    through = s - s.detach()  # zeros that carry the gradient to the scores
    if balance:
        if allowed is None:
            allowed = allowed_widths(spec, s.device)
        width = nearest_width_tensor(above.sum(), heads, allowed)  # 0-d long
        hard = top_channels(s, width)
        width_t = width + through.sum() / heads
    else:
        hard = above.to(s.dtype)
        width_t = (hard.sum() + through.sum()) / heads
    return hard.reshape(score.shape), (hard + through).reshape(score.shape), width_t


def fit_budget(
    space: HeadSpace, scores: Mapping[str, Tensor], arch: Mapping[str, int], target: float
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Narrow ``arch`` one width step at a time, always the dimension losing the least score per MAC
    saved (the scores of the channels each head would give up), until it costs at most ``target``.
    Returns the widths and the steps taken."""
    widths = dict(arch)
    ranked = {
        label: torch.sort(
            scores[label].detach().double().reshape(d.heads, d.max_width), dim=1, descending=True
        ).values  # (H, d)
        for label, d in space.dims.items()
    }
    removed: list[dict[str, Any]] = []
    total = float(analytic_cost(space, widths).macs)
    while total > target:
        best: tuple[float, str, int, float] | None = None
        for label, d in space.dims.items():
            w = widths[label]
            smaller = [a for a in d.allowed() if a < w]
            if not smaller:
                continue
            new_w = max(smaller)
            layer = space.layer_of(label)
            cur = {k: widths[dd.label] for k, dd in layer.dims.items()}
            saved = float(layer.macs(cur)) - float(layer.macs({**cur, d.kind: new_w}))
            lost = float(ranked[label][:, new_w:w].sum())
            key = lost / max(saved, _EPS)
            if best is None or key < best[0]:
                best = (key, label, new_w, saved)
        if best is None:  # pragma: no cover - excluded by check_reachable
            raise BudgetError("the budget cannot be met within the space's minimum widths")
        _, label, new_w, saved = best
        removed.append({"label": label, "from": widths[label], "to": new_w})
        widths[label] = new_w
        total = float(analytic_cost(space, widths).macs)
    return widths, removed


# ============================================================================ helpers


def _logits(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def foldable_kinds(layer: LayerSpace, module: nn.Module) -> list[str]:
    """The attention kinds (``"qk"``, ``"v"``) whose reweight scales ``layer``'s adapter folds at
    materialisation, asked by folding unit scales into the dense module's own parameters (an adapter
    that cannot fold a kind raises :class:`ArchitectureError`)."""
    if layer.kind != "attention" or type(layer.adapter).fold_scales is SpaceAdapter.fold_scales:
        return []
    params = {name: p.detach() for name, p in module.named_parameters()}
    widths = layer.dense_widths()
    kinds = []
    for kind in ("qk", "v"):
        d = layer.dims[kind]
        try:
            layer.adapter.fold_scales(layer, widths, params, {kind: torch.ones(d.heads, d.max_width)})
        except (ArchitectureError, NotImplementedError, KeyError) as exc:
            log.debug("%s: %s scales cannot be folded (%s)", layer.label, kind, exc)
            continue
        kinds.append(kind)
    return kinds


def _search_macs(space: HeadSpace, widths: Mapping[str, Tensor]) -> Tensor:
    """``analytic_cost(space, widths).macs`` (the same sum, in the same order) without the parameter
    counts, which the search does not use and which may read tensor widths back to the host."""
    per_layer: dict[str, dict[str, Any]] = defaultdict(dict)
    for label, value in widths.items():
        layer_name, kind = split_label(label)
        per_layer[layer_name][kind] = value
    total: Any = space.fixed_macs
    for name, layer in space.layers.items():
        total = total + layer.macs({**layer.dense_widths(), **per_layer[name]})
    return total


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Batches:
    """The training batches: ``ctx.train_loader`` epoch after epoch, or ``ctx.calib`` cycled.

    The loader's generator (if it has one) is recorded when the search starts, set back to that state
    on resume, and handed back to the caller as it was found: the search leaves no trace in it. A
    sampler with ``set_epoch`` (``DistributedSampler``) gets each epoch's number, and its epoch is
    handed back too. Without a loader, rank ``r`` of ``W`` takes calibration batch ``i * W + r`` at
    its ``i``-th step, so the ranks train on different batches.
    """

    def __init__(self, ctx: SearchContext) -> None:
        self.loader = ctx.train_loader
        self.calib = ctx.calib
        self.rank, self.world = ctx.rank, ctx.world_size
        gen = getattr(self.loader, "generator", None)
        self.generator: torch.Generator | None = gen if isinstance(gen, torch.Generator) else None
        self.caller_state = self.generator.get_state() if self.generator is not None else None
        self.start_state = self.caller_state
        sampler = getattr(self.loader, "sampler", None)
        set_epoch = getattr(sampler, "set_epoch", None)
        self.set_epoch: Callable[[int], None] | None = set_epoch if callable(set_epoch) else None
        self.caller_epoch = getattr(sampler, "epoch", None)
        self.epoch = 0
        self.index = 0
        self._it: Iterator | None = None
        if self.loader is None and not self.calib:
            raise UsageError("similarity_indicator needs ctx.train_loader or calibration batches")

    def _per_epoch(self) -> int | None:
        try:
            return len(self.loader) if self.loader is not None else None  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length
            return None

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "start": self.start_state,
            "world_size": self.world,
            "per_epoch": self._per_epoch(),
        }

    def _iter(self) -> Iterator:
        if self.set_epoch is not None:
            self.set_epoch(self.epoch)
        return iter(self.loader)  # type: ignore[arg-type]

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replay the batches consumed so far (re-read, not trained on) to reach the same position.

        A position saved by another number of processes is carried over by the samples all ranks
        had consumed: ``(epoch * per_epoch + index) * saved_world`` batches in all, shared by the
        ranks of this run."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            self._convert(saved_world, state.get("per_epoch"))
        if self.loader is None:
            return
        if self.generator is not None and state.get("start") is not None:
            self.start_state = state["start"]
            self.generator.set_state(self.start_state)
        target, self.epoch = self.epoch, 0
        while self.epoch < target:
            for _ in self._iter():
                pass
            self.epoch += 1
        self._it = self._iter()
        for i in range(self.index):
            try:
                next(self._it)
            except StopIteration:  # shorter than the saved position (another world size): next epoch
                log.debug(
                    "the loader ran out after %d of %d batches; resuming at the next epoch", i, self.index
                )
                self.epoch, self.index = self.epoch + 1, 0
                self._it = self._iter()
                break

    def _convert(self, saved_world: int, saved_per_epoch: Any) -> None:
        per_epoch = self._per_epoch()
        if self.loader is None:
            self.index = self.index * saved_world // self.world
        elif isinstance(saved_per_epoch, int) and per_epoch:
            consumed = (self.epoch * saved_per_epoch + self.index) * saved_world // self.world
            self.epoch, self.index = divmod(consumed, per_epoch)
        log.info(
            "the search checkpoint was written by %d process(es), this run has %d: it continues after "
            "the same number of samples (epoch %d, batch %d), with other batches than an uninterrupted run",
            saved_world,
            self.world,
            self.epoch,
            self.index,
        )

    def next(self) -> Any:
        if self.loader is None:
            batch = self.calib[(self.index * self.world + self.rank) % len(self.calib)]
            self.index += 1
            return batch
        if self._it is None:
            self._it = self._iter()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.index = 0
            self._it = self._iter()
            try:
                batch = next(self._it)
            except StopIteration:
                raise UsageError("ctx.train_loader yields no batches") from None
        self.index += 1
        return batch

    def close(self) -> None:
        self._it = None
        if self.generator is not None and self.caller_state is not None:
            self.generator.set_state(self.caller_state)
        if self.set_epoch is not None and isinstance(self.caller_epoch, int):
            self.set_epoch(self.caller_epoch)


@dataclass
class _History:
    loss: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    first_within: int | None = None

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss, "task": self.task, "ratio": self.ratio, "first_within": self.first_within}

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> _History:
        return cls(list(s["loss"]), list(s["task"]), list(s["ratio"]), s["first_within"])

    def extend(self, first_step: int, loss: list[float], task: list[float], ratio: list[float]) -> None:
        self.loss += loss
        self.task += task
        self.ratio += ratio
        if self.first_within is None:
            self.first_within = next((first_step + i for i, r in enumerate(ratio) if r <= 1.0), None)

    def summary(self, window: int = 10) -> dict[str, Any]:
        if not self.loss:
            return {}

        def mean(xs: list[float]) -> float:
            return float(sum(xs) / len(xs))

        stride = max(1, math.ceil(len(self.ratio) / 20))
        return {
            "loss_first": mean(self.loss[:window]),
            "loss_last": mean(self.loss[-window:]),
            "loss_min": float(min(self.loss)),
            "task_loss_first": mean(self.task[:window]),
            "task_loss_last": mean(self.task[-window:]),
            "macs_ratio_to_target_trace": [round(r, 4) for r in self.ratio[::stride]],
        }


@dataclass
class _Pending:
    """The per-step values not yet read back to the host: 0-d tensors, read at the logging cadence
    and before every checkpoint (one sync for all of them)."""

    loss: list[Tensor] = field(default_factory=list)
    task: list[Tensor] = field(default_factory=list)
    ratio: list[Tensor] = field(default_factory=list)

    def add(self, loss: Tensor, task: Tensor, ratio: Tensor) -> None:
        self.loss.append(loss.detach())
        self.task.append(task.detach())
        self.ratio.append(ratio.detach())

    def take(self) -> Tensor:
        """``(3, n)`` float64: loss, task loss and MACs / target of the pending steps (exact: every
        value is a float32 widened), and forget them."""
        values = torch.stack([torch.stack(col).double() for col in (self.loss, self.task, self.ratio)])
        self.loss, self.task, self.ratio = [], [], []
        return values


def load_searched_weights(model: nn.Module, work_dir: str | Path) -> nn.Module:
    """A copy of ``model`` holding the weights a finished search trained (its final checkpoint in
    ``work_dir``); materialise this copy, not the dense model, to keep what the search learned."""
    path = Path(work_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no similarity_indicator checkpoint here")
    device = next(model.parameters()).device
    state = _read_state(path, device)
    if "model" not in state:
        raise CheckpointError(f"{path}: the search checkpoint holds no trained weights ('model' is missing)")
    trained = copy.deepcopy(model)
    try:
        trained.load_state_dict(state["model"])
    except (RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: the trained weights do not fit the model ({type(exc).__name__}: {exc})"
        ) from exc
    return trained


def _check_state(state: Mapping[str, Any], space: HeadSpace, path: Path | None) -> None:
    """Raise :class:`CheckpointError` when an entry of a search checkpoint whose fingerprint matches
    has the wrong type, or an indicator / similarity tensor is missing or of the wrong shape."""
    problem = _state_problem(state, space)
    if problem is not None:
        raise CheckpointError(f"{path}: the search checkpoint is damaged: {problem}; delete it to start over")


def _state_problem(state: Mapping[str, Any], space: HeadSpace) -> str | None:
    kinds: dict[str, type] = {
        "step": int,
        "rng": Tensor,
        "indicators": dict,
        "gammas": dict,
        "similarity": dict,
        "model": dict,
        "optimizer": dict,
        "batches": dict,
        "history": dict,
        "init_layers": list,
        "init_skipped": list,
    }
    for key, kind in kinds.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} has type {type(value).__name__}, expected {kind.__name__}"
    skipped = state.get(_SIMILARITY_SKIPPED)
    if skipped is not None and not isinstance(skipped, list):
        return f"{_SIMILARITY_SKIPPED!r} has type {type(skipped).__name__}, expected list"
    for entry in ("indicators", "similarity"):
        for label in space.dims:
            value = state[entry].get(label)
            if not isinstance(value, Tensor):
                return f"{entry} of {label!r} is missing"
            if tuple(value.shape) != _shape(space, label):
                return f"{entry} of {label!r} has shape {tuple(value.shape)}, expected {_shape(space, label)}"
    return None


def _same_state_on_every_rank(
    scores: Mapping[str, Tensor], scales: Mapping[str, Tensor] | None, weights: Mapping[str, Tensor] | None
) -> None:
    """Raise :class:`StrategyError` unless every rank ends with the same scores, scales and weights
    (a SHA-256 of their bytes, gathered from every rank)."""
    h = hashlib.sha256()
    for group in (scores, scales or {}, weights or {}):
        for name in sorted(group):
            h.update(name.encode())
            h.update(group[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) > 1:
        raise StrategyError(
            "similarity_indicator: the ranks ended the search with different indicators, scales or "
            f"weights ({', '.join(f'rank {r}: {d[:12]}' for r, d in enumerate(digests))}); the "
            "data-parallel replicas drifted apart"
        )


def _read_state(path: Path, device: torch.device) -> dict[str, Any]:
    """The search checkpoint at ``path`` as a dict; a file torch cannot load, or that holds no
    dict, is a :class:`CheckpointError` saying how to start over."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
        raise CheckpointError(
            f"{path}: cannot read the search checkpoint ({type(exc).__name__}: {exc}); delete it to start over"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a similarity_indicator search checkpoint (it holds a {type(state).__name__}, "
            "not a dict); delete it to start over"
        )
    return state


# =========================================================================== strategy


def _shape(space: HeadSpace, label: str) -> tuple[int, ...]:
    return space.shape(label)


@dataclass
class _Run:
    """Everything one search holds; what :meth:`SimilarityIndicator._save` writes is its state."""

    ctx: SearchContext
    cfg: SimilarityIndicatorConfig
    space: HeadSpace
    device: torch.device
    model: nn.Module
    teacher: nn.Module | None
    similarity: dict[str, Tensor]
    mult: dict[str, Tensor]
    add: dict[str, Tensor]
    indicators: dict[str, nn.Parameter]
    gammas: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    batches: _Batches
    history: _History
    ckpt_path: Path | None
    fingerprint: str
    unfoldable: list[str]
    init_layers: list[str]
    init_skipped: list[str]
    #: dimensions that got no similarity weights (weight 1); None: unknown (an older checkpoint)
    similarity_skipped: list[str] | None
    comm: _DataParallel
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    pending: _Pending = field(default_factory=_Pending)
    step: int = 0
    resumed_from: int | None = None
    resumed_world: int | None = None
    last_saved: int = -1

    @property
    def target(self) -> float:
        return float(self.ctx.target_macs)

    def scores(self) -> dict[str, Tensor]:
        return {k: m * self.mult[k] + self.add[k] for k, m in self.indicators.items()}


class SimilarityIndicator(Strategy[SimilarityIndicatorConfig]):
    """Learnable channel indicators with similarity weights, head-balanced masks and reweight
    scales, trained jointly with the weights under a differentiable MACs penalty."""

    summary = (
        "learned channel indicators x similarity weights, head-balanced every step, reweight scales, "
        "MACs penalty (METHOD.md 3)"
    )
    Config = SimilarityIndicatorConfig
    reports_steps = True  # ctx.step_done(step, hard masks) after every step and its checkpoint

    def planned_weight_steps(self) -> int:
        """Every search step updates the model's weights unless they are frozen."""
        cfg = self.config
        return cfg.steps if cfg.train_weights and cfg.lr_weights > 0 else 0

    # -------------------------------------------------------------------- search
    def search(self, ctx: SearchContext) -> SearchResult:
        """Search on a copy of ``ctx.model``; resumes from ``ctx.work_dir`` when it holds this search."""
        cfg = self.config
        space = ctx.space.with_step(resolve_width_step(cfg.width_step, ctx.device), cfg.min_width)
        check_reachable(space, ctx.target_macs)
        dev = torch.device(ctx.device)
        forked = (
            [dev.index if dev.index is not None else torch.cuda.current_device()]
            if dev.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=forked):
            run = self._setup(ctx, space, cfg)
            try:
                with space.apply_masks(run.model, MaskSet()) as handle:
                    self._train(run, handle.masks)
            finally:
                run.batches.close()
            self._save(run)  # the finished state: trained weights; a rerun only re-finalises
            return self._finish(run)

    def _fingerprint(self, ctx: SearchContext, space: HeadSpace, cfg: SimilarityIndicatorConfig) -> str:
        record = {
            "config": cfg.model_dump(mode="json", exclude=set(_NOT_FINGERPRINTED)),
            "seed": ctx.seed,
            "budget": ctx.budget,
            "dense_macs": ctx.dense_macs,
            "dims": {k: [d.heads, d.max_width, d.min_width, d.step] for k, d in space.dims.items()},
            "model": _model_digest(ctx.model),
        }
        # neither the device nor the world size: a search resumes on another number of processes
        # (docs/similarity_indicator.md); autocast changes the numbers, so its dtype is recorded
        dtype = amp_dtype(torch.device(ctx.device)) if cfg.amp else None
        if dtype is not None:
            record["amp"] = str(dtype)
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def _load_checkpoint(self, path: Path | None, fingerprint: str, device: torch.device) -> dict | None:
        if path is None or not path.is_file():
            return None
        state = _read_state(path, device)
        if state.get("format") != _FORMAT or state.get("fingerprint") != fingerprint:
            log.warning(
                "%s belongs to another search (model, budget, seed or config differ); starting over", path
            )
            return None
        missing = sorted(_STATE_KEYS - state.keys())
        if missing:
            raise CheckpointError(
                f"{path}: the search checkpoint is incomplete, it lacks {', '.join(missing)}; "
                "delete it to start over"
            )
        return state

    def _setup(self, ctx: SearchContext, space: HeadSpace, cfg: SimilarityIndicatorConfig) -> _Run:
        device = torch.device(ctx.device)
        model = copy.deepcopy(ctx.model).to(device)  # never touch the caller's model
        model.train(cfg.train_weights)
        model.requires_grad_(cfg.train_weights)
        teacher = copy.deepcopy(ctx.model).to(device).eval().requires_grad_(False) if cfg.distill else None
        comm = _DataParallel(ctx, device)
        dtype = amp_dtype(device) if cfg.amp else None
        ckpt_path = Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir is not None else None
        fingerprint = self._fingerprint(ctx, space, cfg) if ckpt_path is not None else ""
        saved = self._load_checkpoint(ckpt_path, fingerprint, device)
        if saved is not None:
            _check_state(saved, space, ckpt_path)
        if comm.active:  # every rank reads rank 0's file: they must agree on where to start
            step = int(saved["step"]) if saved is not None else -1
            first = ctx.broadcast(step)
            if ctx.any_rank(first != step):
                raise CheckpointError(
                    f"{ckpt_path}: the ranks found different search checkpoints (rank 0: step {first}, "
                    f"rank {ctx.rank}: step {step}; -1 is none); put ctx.work_dir on a file system "
                    "every rank shares"
                )

        modules = dict(ctx.model.named_modules())
        foldable: list[str] = []
        unfoldable: list[str] = []
        for name, layer in space.layers.items():
            if layer.kind == "attention":
                kinds = foldable_kinds(layer, modules[name])
                foldable += [layer.dims[k].label for k in kinds]
                unfoldable += [layer.dims[k].label for k in ("qk", "v") if k not in kinds]
        if cfg.reweight and unfoldable:
            log.info("reweight scales cannot be folded for %s; those get none", ", ".join(unfoldable))

        # similarity weights (3.2) and initial indicators (3.1, 3.5): computed once, then checkpointed
        init_layers: list[str] = []
        init_skipped: list[str] = []
        similarity_skipped: list[str] | None = []
        if saved is not None:
            similarity = saved["similarity"]
            start = saved["indicators"]
            init_layers, init_skipped = list(saved["init_layers"]), list(saved["init_skipped"])
            similarity_skipped = saved.get(_SIMILARITY_SKIPPED)
            if similarity_skipped is None:
                log.warning(
                    "%s predates the record of the dimensions that got no similarity weights; their "
                    "weights are taken as saved (delete the file to compute them again)",
                    ckpt_path,
                )
            else:
                similarity_skipped = list(similarity_skipped)
        else:
            if cfg.similarity == "none":
                similarity = {label: torch.ones(_shape(space, label)) for label in space.dims}
            else:  # under torchrun: each rank reads its share, the Gram matrices are summed
                calib, reduce = _share(ctx, ctx.calib[: cfg.calib_batches_for_similarity], comm)
                grams, similarity_skipped = channel_grams(model, space, calib, device, reduce=reduce)
                similarity = weights_from_grams(space, grams, cfg.similarity)
            start = {label: torch.ones(_shape(space, label)) for label in space.dims}
            if cfg.init_other != "uniform":
                start.update(_taylor_init(space, ctx, cfg))
            if cfg.init in ("attention_difference", "shuffled_difference"):
                init, init_skipped = _attention_difference_init(model, space, ctx, cfg, comm)
                start.update(init)
                init_layers = sorted(k.rpartition(":")[0] for k in init)
        similarity = {k: v.float().to(device) for k, v in similarity.items()}
        # score = m * mult + add: alpha = 0 gives mult = 1 and add = 0 exactly, the plain indicator
        if cfg.combine == "multiplicative":
            mult = {k: 1.0 + cfg.alpha * (w - 1.0) for k, w in similarity.items()}
            add = {k: torch.zeros_like(w) for k, w in similarity.items()}
        else:
            mult = {k: torch.ones_like(w) for k, w in similarity.items()}
            add = {k: cfg.alpha * (w - 1.0) for k, w in similarity.items()}

        indicators = {k: nn.Parameter(start[k].detach().float().to(device).clone()) for k in space.dims}
        gammas: dict[str, nn.Parameter] = {}
        if cfg.reweight:
            for label in foldable:
                gammas[label] = nn.Parameter(torch.ones(_shape(space, label), device=device))
        # no momentum on the indicators: they all see the same MACs gradient, and momentum carries
        # them across tau together, far below the target (docs/similarity_indicator.md)
        groups: list[dict[str, Any]] = [
            {
                "params": list(indicators.values()),
                "lr": cfg.lr_indicator,
                "weight_decay": 0.0,
                "betas": (0.0, 0.999),
            }
        ]
        if gammas:
            groups.append({"params": list(gammas.values()), "lr": cfg.lr_scales, "weight_decay": 0.0})
        if cfg.train_weights:
            groups.append(
                {"params": list(model.parameters()), "lr": cfg.lr_weights, "weight_decay": cfg.weight_decay}
            )
        opt = torch.optim.AdamW(groups)

        run = _Run(
            ctx=ctx,
            cfg=cfg,
            space=space,
            device=device,
            model=model,
            teacher=teacher,
            similarity=similarity,
            mult=mult,
            add=add,
            indicators=indicators,
            gammas=gammas,
            opt=opt,
            batches=_Batches(ctx),
            history=_History(),
            ckpt_path=ckpt_path,
            fingerprint=fingerprint,
            unfoldable=unfoldable,
            init_layers=init_layers,
            init_skipped=init_skipped,
            similarity_skipped=similarity_skipped,
            comm=comm,
            amp_dtype=dtype,
            # fp16 (a GPU without bf16) needs loss scaling; bf16 and the CPU do not
            scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
        )
        if saved is None:
            torch.default_generator.manual_seed(ctx.rng("similarity_indicator").getrandbits(62))
            if device.type == "cuda":
                torch.cuda.manual_seed(ctx.rng("similarity_indicator:cuda").getrandbits(62))
            self._sync_replicas(run)
            return run
        try:
            with torch.no_grad():
                for k, p in gammas.items():
                    p.copy_(saved["gammas"][k])
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if run.scaler is not None and saved.get("scaler") is not None:
                run.scaler.load_state_dict(saved["scaler"])
            run.history = _History.from_state(saved["history"])
            run.step = run.resumed_from = run.last_saved = int(saved["step"])
            saved_world = int(saved["batches"].get("world_size", 1))
            run.resumed_world = saved_world if saved_world != ctx.world_size else None
            run.batches.restore(saved["batches"])
            torch.set_rng_state(saved["rng"].cpu())
            if saved.get("cuda_rng") is not None and device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
        # entries of the wrong type or shape in a file whose fingerprint matches: edited or damaged
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{ckpt_path}: the search checkpoint is damaged ({type(exc).__name__}: {exc}); "
                "delete it to start over"
            ) from exc
        self._sync_replicas(run)
        if ctx.rank == 0:
            log.info("resuming the search from step %d of %d (%s)", run.step, cfg.steps, ckpt_path)
        return run

    @staticmethod
    def _sync_replicas(run: _Run) -> None:
        """Under torchrun, every rank starts from rank 0's weights, indicators, scales and similarity
        weights (one broadcast, as DistributedDataParallel does); from then on the averaged gradients
        keep them equal."""
        if not run.comm.active:
            return
        tensors = [
            *(t for t in run.model.state_dict().values() if t.is_floating_point()),  # not index buffers
            *run.indicators.values(),
            *run.gammas.values(),
            *(t for k in sorted(run.similarity) for t in (run.similarity[k], run.mult[k], run.add[k])),
        ]
        run.comm.broadcast_(tensors)

    def _save(self, run: _Run) -> None:
        """Write the whole state atomically (temporary file, then ``os.replace``); rank 0 alone
        writes (every rank holds the same state)."""
        if run.ckpt_path is None or run.last_saved == run.step:
            return
        if run.ctx.rank != 0:
            run.last_saved = run.step
            return
        state = {
            "format": _FORMAT,
            "fingerprint": run.fingerprint,
            "step": run.step,
            "indicators": {k: v.detach() for k, v in run.indicators.items()},
            "gammas": {k: v.detach() for k, v in run.gammas.items()},
            "similarity": run.similarity,
            "model": run.model.state_dict(),
            "optimizer": run.opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
            "batches": run.batches.state(),
            "history": run.history.state(),
            "init_layers": run.init_layers,
            "init_skipped": run.init_skipped,
            _SIMILARITY_SKIPPED: run.similarity_skipped,
        }
        if run.scaler is not None:
            state["scaler"] = run.scaler.state_dict()
        run.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.ckpt_path) as tmp:
            torch.save(state, tmp)
        run.last_saved = run.step

    def _train(self, run: _Run, masks: MaskSet) -> None:
        """The search loop. Nothing in a step waits for the device: the loss, task loss and MACs
        ratio stay on it until :meth:`_flush` reads them, every ``log_every = max(1, steps // 10)``
        steps, before every checkpoint and after the last step."""
        from nas_headprune.progress import stderr_progress

        cfg, space, history = run.cfg, run.space, run.history
        dims = space.dims
        balanced = {label: cfg.balance or space.layer_of(label).kind == "mlp" for label in dims}
        allowed = {label: allowed_widths(d, run.device) for label, d in dims.items()}
        trainable = [p for group in run.opt.param_groups for p in group["params"]]
        log_every = max(1, cfg.steps // 10)
        dtype = run.amp_dtype
        non_blocking = run.device.type == "cuda"
        with stderr_progress(enabled=run.ctx.progress, transient=True) as bar:
            task_id = bar.add_task("similarity_indicator search", total=cfg.steps, completed=run.step)
            while run.step < cfg.steps:
                x, y = (t.to(run.device, non_blocking=non_blocking) for t in run.batches.next()[:2])
                hard: dict[str, Tensor] = {}
                widths: dict[str, Tensor] = {}
                masks.clear()
                for label, score in run.scores().items():
                    hard[label], ste, widths[label] = dimension_masks(
                        score, dims[label], cfg.tau, balanced[label], allowed[label]
                    )
                    gamma = run.gammas.get(label)
                    if gamma is not None and label.endswith(":v"):
                        ste = ste * gamma  # value scales ride on the value mask
                    elif gamma is not None:
                        masks[label + QUERY_SCALE] = gamma  # query scales: queries only
                    masks[label] = ste
                autocast = (
                    torch.autocast(device_type=run.device.type, dtype=dtype)
                    if dtype is not None
                    else nullcontext()
                )
                with autocast:
                    logits = _logits(run.model(x)).float()  # (B, classes); a no-op in float32
                    teacher = None
                    if run.teacher is not None:
                        with torch.no_grad():
                            teacher = _logits(run.teacher(x)).float()
                task = F.cross_entropy(logits, y)
                loss = task
                if teacher is not None:
                    loss = loss + kl_to_teacher(logits, teacher)
                ratio = _search_macs(space, widths) / run.target  # differentiable in the scores
                excess = ratio - 1.0
                penalty = torch.relu(excess).square() if cfg.penalty == "above" else excess.square()
                loss = loss + _lam(cfg, run.step) * penalty
                run.opt.zero_grad(set_to_none=True)
                (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
                run.comm.average_grads_(trainable)  # under torchrun: the mean gradient of all ranks
                if run.scaler is not None:
                    run.scaler.step(run.opt)
                    run.scaler.update()
                else:
                    run.opt.step()
                if cfg.lr_schedule != "constant":  # the next step's rate: a function of the step alone
                    run.opt.param_groups[0]["lr"] = _indicator_lr(cfg, run.step + 1)

                run.step += 1
                run.pending.add(loss, task, ratio)
                checkpoint = bool(cfg.checkpoint_every) and run.step % cfg.checkpoint_every == 0
                logged = run.step % log_every == 0
                if checkpoint or logged or run.step == cfg.steps:
                    self._flush(run)  # raises before a checkpoint of a non-finite step is written
                if checkpoint:
                    self._save(run)
                if logged and run.ctx.rank == 0:
                    log.info(
                        "step %d/%d: loss %.4f (task %.4f), MACs %.3f of the target",
                        run.step,
                        cfg.steps,
                        history.loss[-1],
                        history.task[-1],
                        history.ratio[-1],
                    )
                bar.update(task_id, completed=run.step)
                run.ctx.step_done(run.step, {k: v.detach() for k, v in hard.items()})

    def _flush(self, run: _Run) -> None:
        """Read the pending steps' values (one host sync), averaged over the ranks under torchrun,
        into the history. A NaN or infinite loss on any rank makes the mean non-finite on every rank,
        so all of them raise :class:`NonFiniteLossError` here, together, naming the first such step."""
        pending = len(run.pending.loss)
        if not pending:
            return
        first = run.step - pending + 1
        values = run.pending.take()  # (3, n): loss, task, ratio
        if run.comm.active:
            run.comm.sum_([values[:2]])  # the ratio is the same on every rank
            values[:2] /= run.comm.world
        loss, task, ratio = values.tolist()
        cfg = run.cfg
        for i, value in enumerate(loss):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"similarity_indicator: the search loss is {value} at step {first + i} of "
                    f"{cfg.steps} (task loss {task[i]}); the search stops without saving that step or "
                    f"any later one. Lower strategy_options.lr_weights (now {cfg.lr_weights:g}) or "
                    f"strategy_options.lr_indicator (now {cfg.lr_indicator:g}), or check the model "
                    "and data for NaN or inf values"
                )
        if run.comm.mismatch is not None and bool(run.comm.mismatch):
            raise StrategyError(
                "similarity_indicator: the ranks' backward passes reached different parameters (the "
                "model took another path on some rank), so their copies would drift apart; the search "
                "stops without saving"
            )
        run.history.extend(first, loss, task, ratio)

    def _finish(self, run: _Run) -> SearchResult:
        cfg, ctx = run.cfg, run.ctx
        scores = {k: v.detach().float().cpu() for k, v in run.scores().items()}
        scales = {k: v.detach().float().cpu().clone() for k, v in run.gammas.items()} or None
        weights = None
        if cfg.train_weights:
            weights = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        info: dict[str, Any] = {
            "similarity": cfg.similarity,
            "combine": cfg.combine,
            "alpha": cfg.alpha,
            "balance": cfg.balance,
            "reweight": cfg.reweight,
            "init": cfg.init,
            "steps": cfg.steps,
            "resumed_from_step": run.resumed_from,
        }
        if run.comm.active:
            _same_state_on_every_rank(scores, scales, weights)
            # rank 0 picks the architecture (and any fix-up) and hands it to the others
            decided = ctx.broadcast(self._decide(run, scores) if ctx.rank == 0 else None)
            info.update(world_size=ctx.world_size)
        else:
            decided = self._decide(run, scores)
        if run.resumed_world is not None:
            info.update(resumed_from_world_size=run.resumed_world)
        if run.amp_dtype is not None:
            info.update(amp=str(run.amp_dtype).removeprefix("torch."))
        selection, decision, macs = decided
        info.update(decision)
        info.update(
            first_step_within_budget=run.history.first_within,
            loss=run.history.summary(),
            scales_left_out=run.unfoldable if cfg.reweight else [],
            init_layers=run.init_layers,
            init_skipped=run.init_skipped,
            similarity_skipped=run.similarity_skipped,
            trained_weights=bool(cfg.train_weights),
        )
        return SearchResult(
            selection,
            info=info,
            scales=scales,
            reported_macs=None if cfg.balance else macs,
            weights=weights,
            weight_steps=self.planned_weight_steps(),
        )

    @staticmethod
    def _decide(run: _Run, scores: Mapping[str, Tensor]) -> tuple[Any, dict[str, Any], float]:
        """The final selection from the final scores: the architecture the next forward would use,
        padded without balance, narrowed by :func:`fit_budget` when above the budget. Returns the
        selection, its ``info`` entries and its MACs."""
        cfg, space, ctx = run.cfg, run.space, run.ctx
        decision: dict[str, Any] = {}
        # the architecture the next forward would use: the same rule as dimension_masks
        arch: dict[str, int] = {}
        raw_widths: dict[str, float] = {}
        for label, d in space.dims.items():
            counts = (scores[label].reshape(d.heads, d.max_width) > cfg.tau).sum(1)  # (H,)
            raw_widths[label] = float(counts.sum()) / d.heads
            if cfg.balance or space.layer_of(label).kind == "mlp":
                arch[label] = nearest_width(raw_widths[label], d)
            else:  # pad every head to the widest one, each with its next-best channels
                arch[label] = padded_width(int(counts.max()), d)
        searched_macs = float(analytic_cost(space, arch).macs)
        if not cfg.balance:
            raw_macs = float(analytic_cost(space, raw_widths).macs)
            decision.update(padded=True, raw_macs=raw_macs, padded_macs_before_fixup=searched_macs)
            log.info(
                "unbalanced search: the raw masks cost %.4g MACs, padded to equal heads %.4g",
                raw_macs,
                searched_macs,
            )
        widths, removed = fit_budget(space, scores, arch, run.target)
        if removed:
            log.warning(
                "the searched architecture costs %.4g MACs, above the target of %.4g: removed %d width "
                "step(s) head-balanced, lowest score per MAC first",
                searched_macs,
                run.target,
                len(removed),
            )
        selection = space.selection_from_scores(scores, widths)
        macs = float(analytic_cost(space, selection.architecture()).macs)
        dense = float(ctx.dense_macs)
        decision.update(
            macs=macs,
            macs_ratio=macs / dense,
            searched_macs_ratio=searched_macs / dense,
            under_budget=(run.target - macs) / dense,
            fixup=bool(removed),
            fixup_steps=removed,
        )
        return selection, decision, macs
