"""Shared pieces of feed-forward adapters whose hidden units are the input of one module."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from nas_headprune.space import ChannelSink, LayerSpace, MaskSet, SpaceAdapter


class HiddenUnitsAdapter(SpaceAdapter):
    """A feed-forward adapter whose ``hidden`` units are what one submodule receives (the second
    linear, after the activation, a gate or a depthwise conv): masks and channel watching hook that
    input, so both are exact for any activation. Subclasses name the submodule."""

    kind = "mlp"
    #: the submodule, relative to the layer module, whose input holds the hidden units
    hidden_consumer: ClassVar[str] = "fc2"

    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        label = layer.dims["hidden"].label

        def mask_hidden(mod: nn.Module, args: tuple) -> tuple | None:
            m = masks.get(label)
            if m is None:
                return None
            return (args[0] * m.to(args[0].dtype), *args[1:])

        return [module.get_submodule(self.hidden_consumer).register_forward_pre_hook(mask_hidden)]

    def watch_channels(
        self, module: nn.Module, layer: LayerSpace, sink: ChannelSink
    ) -> list[torch.utils.hooks.RemovableHandle] | None:
        """The hidden units as the consumer receives them, ``(..., m)``."""

        def read(mod: nn.Module, args: tuple) -> None:
            sink("hidden", args[0])  # (..., m)

        return [module.get_submodule(self.hidden_consumer).register_forward_pre_hook(read)]
