"""METHOD.md 3.5: indicator initialisation, from the attention difference (linear attention) or from
first-order Taylor scores (the other layers, ``init_other``)."""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Literal

import torch
from torch import Tensor, nn

from nas_headprune.allocate import head_scores
from nas_headprune.errors import (
    UsageError,
)
from nas_headprune.evaluator.metrics import batch_inputs
from nas_headprune.space import (
    HeadSpace,
    LayerSpace,
)
from nas_headprune.strategy import (
    SearchContext,
)

from .config import _EPS, SimilarityIndicatorConfig
from .parallel import Reducer, _DataParallel, _share

log = logging.getLogger(__name__)


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
    like the attention-difference init: ``tau + init_margin * normalise(score)`` per dimension. A
    head count (``space.prune_heads``) starts from :func:`~nas_headprune.allocate.head_scores`."""
    from nas_headprune.strategies.taylor import Taylor

    calib = ctx.calib[: cfg.calib_batches_for_similarity]
    scores = Taylor().score(dataclasses.replace(ctx, space=space.without_heads(), calib=calib))
    if space.has_heads:  # a head starts from the sum of its channels' scores, as the allocator ranks it
        scores = head_scores(space, scores)
    out: dict[str, Tensor] = {}
    for label in sorted(scores):
        m0 = indicator_init_from_difference(scores[label].double(), cfg.tau, cfg.init_margin, cfg.init_scale)
        if cfg.init_other == "shuffled_taylor":
            gen = ctx.torch_generator(f"similarity_indicator:taylor-shuffle:{label}")
            m0 = m0.flatten()[torch.randperm(m0.numel(), generator=gen)].reshape(m0.shape)
        out[label] = m0.reshape(space.shape(label))
    log.info("indicators of %d dimensions initialised from first-order Taylor scores", len(out))
    return out
