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
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from nas_headprune.allocate import BudgetError, check_reachable
from nas_headprune.atomic import atomic_path
from nas_headprune.errors import ArchitectureError, CheckpointError, NonFiniteLossError, UsageError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.space import (
    QUERY_SCALE,
    DimSpec,
    HeadSpace,
    LayerSpace,
    MaskSet,
    SpaceAdapter,
)
from nas_headprune.strategy import SearchContext, SearchResult, Strategy, StrategyConfig

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "similarity_indicator.pt"
_FORMAT = 1
_EPS = 1e-12
#: config fields that do not change the result (left out of the resume fingerprint)
_NOT_FINGERPRINTED = ("checkpoint_every",)
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


class SimilarityIndicatorConfig(StrategyConfig):
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
    tau: float = Field(0.5, description="3.1 threshold: a channel is kept when its score exceeds tau")
    lam: float = Field(10.0, ge=0, description="3.6 weight of the MACs penalty")
    penalty: Literal["above", "two_sided"] = Field(
        "above",
        description="3.6 squared error of MACs/target - 1 only above the target, or on both sides",
    )
    steps: int = Field(200, ge=0, description="3.7 search steps (batches)")
    lr_indicator: float = Field(0.02, gt=0, description="Adam learning rate of the indicators")
    lr_weights: float = Field(1e-4, ge=0, description="AdamW learning rate of the model weights")
    lr_scales: float = Field(5e-3, ge=0, description="Adam learning rate of the reweight scales")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the model weights")
    train_weights: bool = Field(
        True, description="3.7 train the weights jointly (on a copy; the input model is never changed)"
    )
    distill: bool = Field(False, description="3.6 add KL(teacher || student) from the frozen dense model")
    width_step: int = Field(1, ge=1, description="3.3 per-head widths are multiples of this (8 suits GPUs)")
    min_width: int = Field(1, ge=1, description="3.3 smallest per-head width / MLP width kept")
    calib_batches_for_similarity: int = Field(
        4, ge=1, description="3.2/3.5 calibration batches used for the similarity weights and the init"
    )
    checkpoint_every: int = Field(
        50, ge=0, description="save the search state every this many steps into ctx.work_dir (0: never)"
    )


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


@dataclass(frozen=True)
class _FeatureTap:
    """Where the activations of one dimension's channels are read: an output (``axis=0`` slot of a
    Linear weight) or an input (``axis=1`` slot) of the submodule ``module``, at ``positions``."""

    label: str
    module: str
    on_input: bool
    positions: Tensor  # (H, d) long


def _feature_taps(space: HeadSpace) -> tuple[list[_FeatureTap], list[str]]:
    """qk / v channels are read at the rows of their projection (the q, k and v activations), MLP
    hidden units at the input columns of their consumer (after the activation: the fc2 input)."""
    graph = space.coupling_graph()
    taps: list[_FeatureTap] = []
    missing: list[str] = []
    for label, d in space.dims.items():
        layer = space.layer_of(label)
        want_axis = 1 if layer.kind == "mlp" else 0
        found = False
        for node in graph.successors(label):
            slot = graph.nodes[node]
            if slot["axis"] != want_axis or not slot["local"].endswith(".weight"):
                continue
            sub = slot["local"][: -len(".weight")]
            pos = (
                slot["offset"]
                + torch.arange(d.heads).unsqueeze(1) * slot["head_stride"]
                + torch.arange(d.max_width)
            )
            taps.append(_FeatureTap(label, f"{layer.label}.{sub}", want_axis == 1, pos))  # pos: (H, d)
            found = True
        if not found:
            missing.append(label)
    return taps, missing


@torch.no_grad()
def similarity_weights(
    model: nn.Module,
    space: HeadSpace,
    batches: Sequence[Any],
    reading: Literal["redundancy", "alignment"],
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Channel-similarity weights per dimension label: ``(H, d)`` for attention, ``(m,)`` for MLPs.

    Hooks gather every channel's activations over all tokens of ``batches`` (q and k activations
    together for ``:qk``); the Gram matrices are accumulated in float64 and turned into weights by
    :func:`weights_from_gram`. ``model`` is run in eval mode and left as it was.
    """
    taps, missing = _feature_taps(space)
    for label in missing:
        log.warning("%s: no projection slot to read activations from; similarity weight 1", label)
    grams: dict[str, Tensor] = {}
    by_module: dict[str, list[_FeatureTap]] = defaultdict(list)
    for tap in taps:
        by_module[tap.module].append(tap)
    modules = dict(model.named_modules())

    def make_hook(module_taps: list[_FeatureTap], on_input: bool):
        def hook(mod: nn.Module, args: tuple, out: Any = None) -> None:
            act = args[0] if on_input else out
            flat = act.reshape(-1, act.shape[-1])  # (T, F): every token of every image / window
            for tap in module_taps:
                z = rearrange(flat[:, tap.positions.to(flat.device)], "t h d -> h d t")  # (H, d, T)
                g = channel_gram(z).cpu()
                grams[tap.label] = grams[tap.label] + g if tap.label in grams else g

        return hook

    handles = []
    for name, module_taps in by_module.items():
        if not isinstance(modules.get(name), nn.Linear):  # channels on the last axis only
            for tap in module_taps:
                log.debug("%s: %s is not a Linear; not read for similarity", tap.label, name)
            continue
        for on_input in (False, True):
            group = [t for t in module_taps if t.on_input == on_input]
            if not group:
                continue
            hook = make_hook(group, on_input)
            if on_input:
                handles.append(modules[name].register_forward_pre_hook(hook))
            else:
                handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(_inputs(batch).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, Tensor] = {}
    for label, d in space.dims.items():
        if label in grams:
            w = weights_from_gram(grams[label], reading)
        else:
            w = torch.ones(d.heads, d.max_width)
        out[label] = w[0] if space.layer_of(label).kind == "mlp" else w
    return out


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
    phi_q: Tensor, phi_k: Tensor, max_query_tokens: int, *, generator: torch.Generator | None = None
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
    scale = rest.abs().amax().clamp_min(_EPS)
    valid_row = r > _EPS * scale  # (B, H, Q, 1)
    has_rest = rest > _EPS * scale  # (B, H, Q, d)
    num = (r.square() * own - 2 * r * r_j * cross + r_j.square() * s_sq).clamp_min(0)
    diff = num / (r.square() * rest.square()).clamp_min(_EPS**2)
    a_sq = s_sq / r.square().clamp_min(_EPS**2)  # (B, H, Q, 1): |A_q|^2
    diff = torch.where(has_rest, diff, a_sq.expand_as(diff)) * valid_row
    total = (a_sq * valid_row).sum((0, 2))  # (H, 1)
    return (diff.sum((0, 2)) / total.clamp_min(_EPS)).sqrt().float()  # (H, d)


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
    model: nn.Module, space: HeadSpace, ctx: SearchContext, cfg: SimilarityIndicatorConfig
) -> tuple[dict[str, Tensor], list[str]]:
    """Initial qk indicators of the linear-attention layers whose adapter exposes
    ``focused_features(module, *args, **kwargs) -> (phi_q, phi_k)``, each ``(B, H, N, d)``."""
    linear = [lay for lay in space.layers.values() if lay.meta.get("attention") == "linear"]
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    if not linear:
        return out, skipped
    modules = dict(model.named_modules())
    feats: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    handles = []
    for layer in linear:
        fn = getattr(layer.adapter, "focused_features", None)
        if fn is None:
            log.warning(
                "%s: adapter %s has no focused_features(); qk indicators start at 1.0",
                layer.label,
                layer.adapter.name,
            )
            skipped.append(layer.label)
            continue

        def hook(mod: nn.Module, args: tuple, kwargs: dict, _fn=fn, _label=layer.label) -> None:
            phi_q, phi_k = _fn(mod, *args, **kwargs)
            feats[_label].append((phi_q.detach().cpu(), phi_k.detach().cpu()))

        handles.append(modules[layer.label].register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in ctx.calib[: cfg.calib_batches_for_similarity]:
                model(_inputs(batch).to(ctx.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for label, pairs in feats.items():
        phi_q = torch.cat([p[0] for p in pairs])  # (B, H, N, d)
        phi_k = torch.cat([p[1] for p in pairs])  # (B, H, N, d)
        gen = ctx.torch_generator(f"similarity_indicator:init:{label}")
        diff = attention_difference_scores(phi_q, phi_k, cfg.init_query_tokens, generator=gen)
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


# ======================================================= 3.1 / 3.3 masks and widths


def nearest_width(per_head: float, spec: DimSpec) -> int:
    """The allowed width of ``spec`` nearest to ``per_head`` (ties keep the wider)."""
    return min(spec.allowed(), key=lambda w: (abs(w - per_head), -w))


def padded_width(widest: int, spec: DimSpec) -> int:
    """The smallest allowed width of ``spec`` holding ``widest`` channels."""
    fits = [w for w in spec.allowed() if w >= widest]
    return min(fits) if fits else spec.max_width


def top_channels(score: Tensor, width: int) -> Tensor:
    """0/1 mask ``(H, d)`` of each head's top-``width`` channels by score (ties: lower index), the
    same order as :meth:`HeadSpace.selection_from_scores`."""
    order = torch.sort(-score.detach().float(), dim=1, stable=True).indices[:, :width]  # (H, w)
    return torch.zeros_like(score).scatter_(1, order, 1.0)


def dimension_masks(score: Tensor, spec: DimSpec, tau: float, balance: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One dimension's masks from its scores (``(H, d)``, or ``(m,)`` for an MLP).

    Returns ``(hard, ste, width)``: the 0/1 mask; the same values with the straight-through gradient
    to ``score``; the per-head kept width as a tensor whose value is the hard width and whose
    gradient is the straight-through count of channels above ``tau``, divided by ``H``. With
    ``balance`` every head keeps its top ``nearest_width(k / H)`` channels (``k`` the count above
    ``tau`` in the whole dimension); without it the mask is ``score > tau`` as is and the width the
    mean per-head count.
    """
    heads = spec.heads
    s = score.reshape(heads, -1)  # (H, d)
    above = s.detach() > tau  # (H, d)
    through = s - s.detach()  # zeros that carry the gradient to the scores
    if balance:
        width = nearest_width(float(above.sum()) / heads, spec)
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


def _inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Batches:
    """The training batches: ``ctx.train_loader`` epoch after epoch, or ``ctx.calib`` cycled.

    The loader's generator (if it has one) is recorded when the search starts, set back to that state
    on resume, and handed back to the caller as it was found: the search leaves no trace in it.
    """

    def __init__(self, ctx: SearchContext) -> None:
        self.loader = ctx.train_loader
        self.calib = ctx.calib
        gen = getattr(self.loader, "generator", None)
        self.generator: torch.Generator | None = gen if isinstance(gen, torch.Generator) else None
        self.caller_state = self.generator.get_state() if self.generator is not None else None
        self.start_state = self.caller_state
        self.epoch = 0
        self.index = 0
        self._it: Iterator | None = None
        if self.loader is None and not self.calib:
            raise UsageError("similarity_indicator needs ctx.train_loader or calibration batches")

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "start": self.start_state}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replay the batches consumed so far (re-read, not trained on) to reach the same position."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if self.loader is None:
            return
        if self.generator is not None and state.get("start") is not None:
            self.start_state = state["start"]
            self.generator.set_state(self.start_state)
        for _ in range(self.epoch):
            for _ in iter(self.loader):
                pass
        self._it = iter(self.loader)
        for _ in range(self.index):
            next(self._it)

    def next(self) -> Any:
        if self.loader is None:
            batch = self.calib[self.index % len(self.calib)]
            self.index += 1
            return batch
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.index = 0
            self._it = iter(self.loader)
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
    for entry in ("indicators", "similarity"):
        for label in space.dims:
            value = state[entry].get(label)
            if not isinstance(value, Tensor):
                return f"{entry} of {label!r} is missing"
            if tuple(value.shape) != _shape(space, label):
                return f"{entry} of {label!r} has shape {tuple(value.shape)}, expected {_shape(space, label)}"
    return None


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
    d = space.dims[label]
    return (d.max_width,) if space.layer_of(label).kind == "mlp" else (d.heads, d.max_width)


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
    step: int = 0
    resumed_from: int | None = None
    last_saved: int = -1

    @property
    def target(self) -> float:
        return float(self.ctx.target_macs)

    def scores(self) -> dict[str, Tensor]:
        return {k: m * self.mult[k] + self.add[k] for k, m in self.indicators.items()}


class SimilarityIndicator(Strategy):
    """Learnable channel indicators with similarity weights, head-balanced masks and reweight
    scales, trained jointly with the weights under a differentiable MACs penalty."""

    summary = (
        "learned channel indicators x similarity weights, head-balanced every step, reweight scales, "
        "MACs penalty (METHOD.md 3)"
    )
    Config = SimilarityIndicatorConfig

    # ------------------------------------------------------------------ test hook
    def _on_step(self, step: int, masks: Mapping[str, Tensor]) -> None:
        """Called after every step (and its checkpoint) with the hard masks of that step's forward;
        tests record or interrupt here, the benchmark times steps."""

    # -------------------------------------------------------------------- search
    def search(self, ctx: SearchContext) -> SearchResult:
        """Search on a copy of ``ctx.model``; resumes from ``ctx.work_dir`` when it holds this search."""
        cfg = self.config
        assert isinstance(cfg, SimilarityIndicatorConfig)
        space = ctx.space.with_step(cfg.width_step, cfg.min_width)
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
        ckpt_path = Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir is not None else None
        fingerprint = self._fingerprint(ctx, space, cfg) if ckpt_path is not None else ""
        saved = self._load_checkpoint(ckpt_path, fingerprint, device)
        if saved is not None:
            _check_state(saved, space, ckpt_path)

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
        if saved is not None:
            similarity = saved["similarity"]
            start = saved["indicators"]
            init_layers, init_skipped = list(saved["init_layers"]), list(saved["init_skipped"])
        else:
            if cfg.similarity == "none":
                similarity = {label: torch.ones(_shape(space, label)) for label in space.dims}
            else:
                calib = ctx.calib[: cfg.calib_batches_for_similarity]
                similarity = similarity_weights(model, space, calib, cfg.similarity, device)
            start = {label: torch.ones(_shape(space, label)) for label in space.dims}
            if cfg.init in ("attention_difference", "shuffled_difference"):
                init, init_skipped = _attention_difference_init(model, space, ctx, cfg)
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
        )
        if saved is None:
            torch.default_generator.manual_seed(ctx.rng("similarity_indicator").getrandbits(62))
            if device.type == "cuda":
                torch.cuda.manual_seed(ctx.rng("similarity_indicator:cuda").getrandbits(62))
            return run
        try:
            with torch.no_grad():
                for k, p in gammas.items():
                    p.copy_(saved["gammas"][k])
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            run.history = _History.from_state(saved["history"])
            run.step = run.resumed_from = run.last_saved = int(saved["step"])
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
        log.info("resuming the search from step %d of %d (%s)", run.step, cfg.steps, ckpt_path)
        return run

    def _save(self, run: _Run) -> None:
        """Write the whole state atomically (temporary file, then ``os.replace``)."""
        if run.ckpt_path is None or run.last_saved == run.step:
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
        }
        run.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.ckpt_path) as tmp:
            torch.save(state, tmp)
        run.last_saved = run.step

    def _train(self, run: _Run, masks: MaskSet) -> None:
        from nas_headprune.progress import stderr_progress

        cfg, space, history = run.cfg, run.space, run.history
        dims = space.dims
        balanced = {label: cfg.balance or space.layer_of(label).kind == "mlp" for label in dims}
        with stderr_progress(enabled=run.ctx.progress, transient=True) as bar:
            task_id = bar.add_task("similarity_indicator search", total=cfg.steps, completed=run.step)
            while run.step < cfg.steps:
                x, y = (t.to(run.device) for t in run.batches.next()[:2])
                hard: dict[str, Tensor] = {}
                widths: dict[str, Tensor] = {}
                masks.clear()
                for label, score in run.scores().items():
                    hard[label], ste, widths[label] = dimension_masks(
                        score, dims[label], cfg.tau, balanced[label]
                    )
                    gamma = run.gammas.get(label)
                    if gamma is not None and label.endswith(":v"):
                        ste = ste * gamma  # value scales ride on the value mask
                    elif gamma is not None:
                        masks[label + QUERY_SCALE] = gamma  # query scales: queries only
                    masks[label] = ste
                logits = _logits(run.model(x))
                task = F.cross_entropy(logits, y)
                loss = task
                if run.teacher is not None:
                    with torch.no_grad():
                        teacher = _logits(run.teacher(x))
                    loss = loss + F.kl_div(
                        F.log_softmax(logits, -1),
                        F.log_softmax(teacher, -1),
                        reduction="batchmean",
                        log_target=True,
                    )
                ratio = analytic_cost(space, widths).macs / run.target  # differentiable in the scores
                excess = ratio - 1.0
                penalty = torch.relu(excess).square() if cfg.penalty == "above" else excess.square()
                loss = loss + cfg.lam * penalty
                run.opt.zero_grad(set_to_none=True)
                loss.backward()
                run.opt.step()

                run.step += 1
                r = float(ratio.detach())
                loss_value = float(loss.detach())  # synced for the history anyway: checking it is free
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"similarity_indicator: the search loss is {loss_value} at step {run.step} of "
                        f"{cfg.steps} (task loss {float(task.detach())}); the search stops without saving "
                        f"this step. Lower strategy_options.lr_weights (now {cfg.lr_weights:g}) or "
                        f"strategy_options.lr_indicator (now {cfg.lr_indicator:g}), or check the model "
                        "and data for NaN or inf values"
                    )
                history.loss.append(loss_value)
                history.task.append(float(task.detach()))
                history.ratio.append(r)
                if history.first_within is None and r <= 1.0:
                    history.first_within = run.step
                if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                    self._save(run)
                if run.step % max(1, cfg.steps // 10) == 0:
                    log.info(
                        "step %d/%d: loss %.4f (task %.4f), MACs %.3f of the target",
                        run.step,
                        cfg.steps,
                        history.loss[-1],
                        history.task[-1],
                        r,
                    )
                bar.update(task_id, completed=run.step)
                self._on_step(run.step, {k: v.detach() for k, v in hard.items()})

    def _finish(self, run: _Run) -> SearchResult:
        cfg, space, ctx = run.cfg, run.space, run.ctx
        scores = {k: v.detach().float().cpu() for k, v in run.scores().items()}
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
            info.update(padded=True, raw_macs=raw_macs, padded_macs_before_fixup=searched_macs)
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
        info.update(
            macs=macs,
            macs_ratio=macs / dense,
            searched_macs_ratio=searched_macs / dense,
            under_budget=(run.target - macs) / dense,
            fixup=bool(removed),
            fixup_steps=removed,
            first_step_within_budget=run.history.first_within,
            loss=run.history.summary(),
            scales_left_out=run.unfoldable if cfg.reweight else [],
            init_layers=run.init_layers,
            init_skipped=run.init_skipped,
            trained_weights=bool(cfg.train_weights),
        )
        scales = {k: v.detach().float().cpu().clone() for k, v in run.gammas.items()} or None
        weights = None
        if cfg.train_weights:
            weights = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        return SearchResult(
            selection, info=info, scales=scales, reported_macs=None if cfg.balance else macs, weights=weights
        )
