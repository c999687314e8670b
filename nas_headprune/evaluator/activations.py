"""Reading a layer's activations with forward hooks: one module's input or output, or several outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn

from nas_headprune.errors import ArchitectureError

__all__ = ["capture_activation", "module_outputs"]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted activation is captured."""


def capture_activation(
    model: nn.Module, module_name: str, images: Tensor, want: Literal["input", "output"]
) -> Tensor:
    """The input or output of ``module_name`` on ``images``, flattened to ``(tokens, channels)``;
    the forward pass stops right after it."""
    store: dict[str, Tensor] = {}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        t = args[0] if want == "input" else out
        store["t"] = t.detach().reshape(-1, t.shape[-1])  # (B*N or nW*B*M, channels)
        raise _Stop

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "t" not in store:
        raise ArchitectureError(f"{module_name} was not called in the forward pass")
    return store["t"]


def module_outputs(model: nn.Module, names: Mapping[str, str], images: Tensor) -> dict[str, Tensor]:
    """``{key: output of module names[key]}`` on ``images`` (kept in the graph when grad is enabled)."""
    outs: dict[str, Tensor] = {}
    handles = []
    for name, cons in names.items():

        def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
            outs[name] = out

        handles.append(model.get_submodule(cons).register_forward_hook(hook))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in outs]
    if missing:
        raise ArchitectureError(f"{names[missing[0]]} was not called in the forward pass")
    return outs
