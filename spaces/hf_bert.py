"""Space adapters for Hugging Face ``transformers`` BERT encoders (the ``hf`` extra).

* ``BertAttention`` = ``self`` (``BertSelfAttention``: separate ``query``, ``key``, ``value``
  Linears) + ``output`` (``BertSelfOutput``: ``dense``, dropout, residual and ``LayerNorm``). A
  value channel is a row of ``self.value`` and a column of ``output.dense``; the LayerNorm after
  the residual sees the full embedding and is kept whole.
* The feed-forward is split over two siblings of ``BertLayer``: ``intermediate.dense`` (rows) and
  ``output.dense`` (columns). It is claimed through ``BertLayer``, whose ``attention`` stays open to
  the attention adapter (:meth:`~nas_headprune.space.SpaceAdapter.open_submodules`); its dimension
  is ``"<layer path>:hidden"``.

The pruned attention follows the model's attention implementation at every call, as Hugging Face's
own does: ``"eager"`` runs the plain matmuls, anything else (``"sdpa"``) the fused kernel. It keeps
the dense softmax scale and returns ``(output, None)`` (no attention weights). Encoder
self-attention only: cross-attention and causal (decoder) attention are refused.

Nothing here imports ``transformers``: classes are recognised by name and module, so the adapters
load (and claim nothing) where the extra is not installed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
from torch import nn

from nas_headprune.evaluator.cost import mlp_macs
from nas_headprune.space import DimSpec, LayerSpace, Slot, dim_label

from ._fused_qkv import attend, new_linear
from ._hidden_units import HiddenUnitsAdapter
from ._split_qkv import SplitQkvAdapter, split_heads

_BERT = "transformers.models.bert.modeling_bert"


def is_hf_class(module: nn.Module, module_name: str, *names: str) -> bool:
    """Whether ``module``'s class is one of ``names`` defined in the module ``module_name``."""
    cls = type(module)
    return cls.__module__ == module_name and cls.__name__ in names


def fused_for(config: Any) -> bool:
    """Whether a Hugging Face config runs the fused attention kernel (anything but ``eager``)."""
    return getattr(config, "_attn_implementation", "eager") != "eager"


class PrunedBertSelfAttention(nn.Module):
    """BERT self-attention whose heads keep ``head_dim_qk`` query/key and ``head_dim_v`` value
    channels; ``config`` is the model's (its attention implementation picks the path)."""

    def __init__(
        self, config: Any, hidden: int, num_heads: int, head_dim_qk: int, head_dim_v: int, scale: float
    ) -> None:
        super().__init__()
        self.config = config
        self.num_attention_heads = num_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_v = head_dim_v
        self.scaling = scale
        self.query = nn.Linear(hidden, num_heads * head_dim_qk)
        self.key = nn.Linear(hidden, num_heads * head_dim_qk)
        self.value = nn.Linear(hidden, num_heads * head_dim_v)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        heads = self.num_attention_heads
        q = split_heads(self.query(hidden_states), heads)  # (B, H, N, d_qk)
        k = split_heads(self.key(hidden_states), heads)  # (B, H, N, d_qk)
        v = split_heads(self.value(hidden_states), heads)  # (B, H, N, d_v)
        out = attend(
            q,
            k,
            v,
            self.scaling,
            fused=fused_for(self.config),
            dropout=self.dropout,
            bias=attention_mask,  # None, a boolean keep-mask or an additive mask, (B, 1, N, N)
        )  # (B, H, N, d_v)
        return rearrange(out, "b h n d -> b n (h d)")  # (B, N, H*d_v)


class PrunedBertAttention(nn.Module):
    """``BertAttention`` with a pruned ``self``; ``output`` is the dense ``BertSelfOutput`` with its
    ``dense`` narrowed to the kept value channels."""

    def __init__(self, self_attention: PrunedBertSelfAttention, output: nn.Module) -> None:
        super().__init__()
        self.self = self_attention
        self.output = output

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        attention = self.self(hidden_states, attention_mask)
        return self.output(attention, hidden_states), None


class BertAttentionAdapter(SplitQkvAdapter):
    """Hugging Face ``BertAttention`` (self-attention + its output dense) and the pruned version."""

    name = "hf_bert_attention"
    q_name, k_name, v_name, out_name = "self.query", "self.key", "self.value", "output.dense"

    def claims(self, module: nn.Module) -> bool:
        return type(module) is PrunedBertAttention or is_hf_class(module, _BERT, "BertAttention")

    def check(self, module: nn.Module) -> str | None:
        if getattr(module, "is_cross_attention", False):
            return "cross-attention (keys and values from another sequence) is not supported"
        if getattr(module.get_submodule("self"), "is_causal", False):
            return "causal (decoder) self-attention is not supported"
        return None

    def head_widths(self, module: nn.Module) -> tuple[int, int, int]:
        sa = module.get_submodule("self")
        heads = cast(int, sa.num_attention_heads)
        d_qk = getattr(sa, "head_dim_qk", None)
        if d_qk is None:
            d = cast(int, sa.attention_head_size)
            return heads, d, d
        return heads, d_qk, cast(int, sa.head_dim_v)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        return self._describe(label, module, tokens, q_tokens=tokens, kv_tokens=tokens)

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = self.head_widths(module)
        sa = module.get_submodule("self")
        query = cast(nn.Linear, sa.query)
        attention = PrunedBertSelfAttention(
            sa.config, query.in_features, heads, widths["qk"], widths["v"], float(cast(float, sa.scaling))
        ).to(device=query.weight.device, dtype=query.weight.dtype)
        for name in ("query", "key", "value"):
            setattr(
                attention, name, new_linear(params[f"self.{name}.weight"], params.get(f"self.{name}.bias"))
            )
        output = cast(nn.Module, module.output)
        dense = cast(nn.Linear, output.dense)
        output.dense = nn.Identity()
        try:
            new_output = copy.deepcopy(output)  # LayerNorm and dropout, without the old dense
        finally:
            output.dense = dense
        new_output.dense = new_linear(params["output.dense.weight"], dense.bias)
        new = PrunedBertAttention(attention, new_output)
        new.train(module.training)
        return new


class BertFeedForwardAdapter(HiddenUnitsAdapter):
    """The feed-forward of a Hugging Face ``BertLayer``: ``intermediate.dense`` rows and
    ``output.dense`` columns (the layer is labelled by the ``BertLayer`` path)."""

    name = "hf_bert_feed_forward"
    hidden_consumer = "output.dense"
    kind = "mlp"

    def claims(self, module: nn.Module) -> bool:
        return is_hf_class(module, _BERT, "BertLayer")

    def check(self, module: nn.Module) -> str | None:
        for path in ("intermediate.dense", "output.dense"):
            if not isinstance(module.get_submodule(path), nn.Linear):
                return f"{path} is not a Linear"
        return None

    def open_submodules(self, module: nn.Module) -> tuple[str, ...]:
        return tuple(name for name in ("attention", "crossattention") if hasattr(module, name))

    def input_dim(self, module: nn.Module) -> int:
        return cast(nn.Linear, module.get_submodule("intermediate.dense")).in_features

    def _own_params(self, module: nn.Module) -> int:
        opened = {
            id(p) for sub in self.open_submodules(module) for p in module.get_submodule(sub).parameters()
        }
        return sum(p.numel() for p in module.parameters() if id(p) not in opened)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        fc1 = cast(nn.Linear, module.get_submodule("intermediate.dense"))
        fc2 = cast(nn.Linear, module.get_submodule("output.dense"))
        dense = sum(p.numel() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias) if p is not None)
        meta = {
            "tokens": tokens,
            "in_dim": fc1.in_features,
            "out_dim": fc2.out_features,
            "fc1_bias": fc1.bias is not None,
            "fc2_bias": fc2.bias is not None,
            # the output LayerNorm; the open attention is not part of this layer
            "extra_params": self._own_params(module) - dense,
            "open_submodules": list(self.open_submodules(module)),
        }
        dims = {"hidden": DimSpec(dim_label(label, "hidden"), "hidden", 1, fc1.out_features)}
        return LayerSpace(label, self.name, self.kind, dims, meta, self)

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        slots = [Slot("intermediate.dense.weight", 0, 0, 0), Slot("output.dense.weight", 1, 0, 0)]
        if layer.meta["fc1_bias"]:
            slots.append(Slot("intermediate.dense.bias", 0, 0, 0))
        return {"hidden": slots}

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        intermediate, output = cast(nn.Module, module.intermediate), cast(nn.Module, module.output)
        fc1, fc2 = cast(nn.Linear, intermediate.dense), cast(nn.Linear, output.dense)
        opened = {name: cast(nn.Module, getattr(module, name)) for name in self.open_submodules(module)}
        intermediate.dense = output.dense = nn.Identity()
        for name in opened:
            setattr(module, name, nn.Identity())
        try:
            new = copy.deepcopy(module)  # norms, dropout, activation, chunking settings
        finally:
            intermediate.dense, output.dense = fc1, fc2
            for name, sub in opened.items():
                setattr(module, name, sub)
        for name, sub in opened.items():
            setattr(new, name, sub)  # the same objects: other adapters prune them
        cast(nn.Module, new.intermediate).dense = new_linear(
            params["intermediate.dense.weight"], params.get("intermediate.dense.bias")
        )
        cast(nn.Module, new.output).dense = new_linear(params["output.dense.weight"], fc2.bias)
        return new

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        return mlp_macs(m["tokens"], m["in_dim"], widths["hidden"], m["out_dim"])

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        h = widths["hidden"]
        count = m["in_dim"] * h + h * m["out_dim"] + m["extra_params"]
        if m["fc1_bias"]:
            count = count + h
        if m["fc2_bias"]:
            count = count + m["out_dim"]
        return count
