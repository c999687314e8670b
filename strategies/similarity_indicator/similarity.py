"""METHOD.md 3.2: channel-similarity weights from the Gram matrices of the channels' activations."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from nas_headprune.errors import (
    ArchitectureError,
    UsageError,
)
from nas_headprune.evaluator.metrics import batch_inputs
from nas_headprune.space import (
    ChannelSink,
    HeadSpace,
    LayerSpace,
    split_label,
)

from .config import _EPS
from .parallel import Reducer

log = logging.getLogger(__name__)


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
            channels = space.shape(d.label)  # (H, d) per head, (m,) for an MLP's hidden units
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
