"""Independent MACs count: run the model under torch's FlopCounterMode.

This is the check on the analytic cost model (:mod:`nas_headprune.evaluator.cost`): it knows
nothing about search spaces, it just counts the matrix products the model executes. FlopCounterMode
counts 0 for scaled_dot_product_attention on the CPU, so a formula for the CPU kernel is registered
here. One convention: ``flops = 2 * macs``.

Counting runs in eval mode with gradients enabled: under ``no_grad``, torch's module tracker (which
FlopCounterMode uses to attribute counts to modules) fails on a view of a parameter passed to a
submodule, such as the learned query of attention pooling (CaiT, SigLIP): the view requires grad but
has no gradient function. Nothing is differentiated and the input needs no grad, so no ``.grad`` is
left behind; each module's training flag is restored afterwards.

:func:`trace_forward` runs the same count once more finely: per module path, and with every product
of two *activations* (tensors computed from the input, as in attention's ``q @ k^T`` and
``attn @ v``, as opposed to an activation times a weight) attributed to the module whose own
forward performs it. :func:`~nas_headprune.space.build.build_space` uses it to charge the fixed part of
the model and to find attention that no space adapter knows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_cpu_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any) -> int:
    # q: (B, H, L, E), k: (B, H, S, E), v: (B, H, S, Ev); q @ k^T and attn @ v, 2 FLOPs per MAC
    b, h, lq, e = q_shape
    s = k_shape[-2]
    ev = v_shape[-1]
    return 2 * b * h * lq * s * (e + ev)


def _custom_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    return mapping


def _counter() -> FlopCounterMode:
    from torch.utils.flop_counter import register_flop_formula  # noqa: F401  (present in torch>=2.1)

    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


def example_call(
    model: nn.Module, input_size: tuple[int, ...] | None = None, example_inputs: Any = None
) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments of one batch-1 call of ``model``, on its device.

    Without ``example_inputs``: a blank image, ``torch.zeros(1, *input_size)``. ``example_inputs``
    is used instead when given: a tensor or a tuple/list of tensors (positional arguments), a
    mapping (keyword arguments: ``{"input_ids": ..., "attention_mask": ...}``), an ``(args,
    kwargs)`` pair as returned here, or a callable returning any of these. Every tensor is moved to
    the model's device.
    """
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if example_inputs is None:
        if input_size is None:
            raise ValueError("either input_size or example_inputs is required")
        return (torch.zeros(1, *input_size, device=device),), {}
    ex = example_inputs() if callable(example_inputs) else example_inputs
    args: tuple
    kwargs: dict[str, Any]
    if isinstance(ex, torch.Tensor):
        args, kwargs = (ex,), {}
    elif isinstance(ex, Mapping):
        args, kwargs = (), dict(ex)
    elif isinstance(ex, tuple) and len(ex) == 2 and isinstance(ex[0], tuple) and isinstance(ex[1], Mapping):
        args, kwargs = tuple(ex[0]), dict(ex[1])
    elif isinstance(ex, (tuple, list)):
        args, kwargs = tuple(ex), {}
    else:
        raise TypeError(
            f"example_inputs must be a tensor, a tuple of tensors, a mapping or a callable, not {type(ex).__name__}"
        )

    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every module's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _count(
    model: nn.Module, input_size: tuple[int, ...] | None, example_inputs: Any = None
) -> FlopCounterMode:
    """Run ``model`` once at batch 1 in eval mode under a flop counter; return the counter."""
    args, kwargs = example_call(model, input_size, example_inputs)
    with _eval_mode(model), torch.enable_grad(), _counter() as fc:
        model(*args, **kwargs)
    return fc


def measure_macs(
    model: nn.Module, input_size: tuple[int, ...] | None = None, *, example_inputs: Any = None
) -> int:
    """Per-image MACs of ``model`` measured by FlopCounterMode (batch 1, eval mode), on a blank
    image of ``input_size`` or on ``example_inputs`` (see :func:`example_call`)."""
    return _count(model, input_size, example_inputs).get_total_flops() // 2


def measure_macs_by_module(
    model: nn.Module, input_size: tuple[int, ...] | None = None, *, example_inputs: Any = None
) -> dict[str, int]:
    """Per-image MACs per module path (``""`` is the whole model), measured; each module's count
    includes its submodules'. Modules that count nothing are absent."""
    trace = trace_forward(model, input_size, example_inputs=example_inputs)
    return {path: flops // 2 for path, flops in trace.module_flops.items()}


# ----------------------------------------------------------------- tracing one forward
# products of two matrices: positions of the two operands in the op's arguments
_PRODUCTS: dict[Any, tuple[int, int]] = {
    torch.ops.aten.mm: (0, 1),
    torch.ops.aten.bmm: (0, 1),
    torch.ops.aten.matmul: (0, 1),
    torch.ops.aten.mv: (0, 1),
    torch.ops.aten.dot: (0, 1),
    torch.ops.aten.addmm: (1, 2),
    torch.ops.aten.baddbmm: (1, 2),
    torch.ops.aten.addbmm: (1, 2),
    torch.ops.aten.addmv: (1, 2),
}
# fused attention kernels: (query, key, value) are the first three arguments
_ATTENTION_KERNELS = {
    op
    for op in (
        getattr(torch.ops.aten, name, None)
        for name in (
            "scaled_dot_product_attention",
            "_scaled_dot_product_attention_math",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_flash_attention_forward",
            "_efficient_attention_forward",
        )
    )
    if op is not None
}
# ops whose output holds no values of their tensor arguments (only their shapes)
_SHAPE_ONLY = {
    getattr(torch.ops.aten, name)
    for name in (
        "empty_like",
        "zeros_like",
        "ones_like",
        "full_like",
        "rand_like",
        "randn_like",
        "new_empty",
        "new_empty_strided",
        "new_zeros",
        "new_ones",
        "new_full",
    )
    if hasattr(torch.ops.aten, name)
}


@dataclass
class ForwardTrace:
    """What one batch-1 forward executed (counted by FlopCounterMode; ``flops = 2 * macs``).

    ``module_flops``: FLOPs per module path, each including its submodules' (``""`` is the whole
    model; modules that count nothing are absent). ``activation_products``: per module path, the ops
    in that module's own forward (not in a submodule's) that multiply two activations.
    """

    flops: int
    module_flops: dict[str, int] = field(default_factory=dict)
    activation_products: dict[str, set[str]] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return self.flops // 2


class _Tracer(TorchDispatchMode):
    """Runs inside a FlopCounterMode: charges each op's counted FLOPs to the modules on the call
    stack and records products of two activations.

    An activation is a tensor computed (through any chain of ops) from the model input. Storages
    are tracked, not tensors: every op output is marked as depending on the input or not, so a
    storage reused after a free gets the mark of its new contents; a view shares its base's mark.
    Parameters, buffers and anything computed from them alone are not activations.
    """

    def __init__(self, counter: FlopCounterMode, stack: list[str], trace: ForwardTrace) -> None:
        super().__init__()
        self.counter = counter
        self.stack = stack
        self.trace = trace
        self.dependent: set[tuple[str, int]] = set()

    def mark(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is not None:
            self.dependent.add(key)

    def is_activation(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and _storage_key(t) in self.dependent

    def _total(self) -> int:
        return sum(self.counter.flop_counts["Global"].values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = self._total()
        out = func(*args, **kwargs)
        flops = self._total() - before
        if flops:
            for path in self.stack:
                self.trace.module_flops[path] = self.trace.module_flops.get(path, 0) + flops
        packet = func.overloadpacket
        owner = self.stack[-1] if self.stack else ""
        pair = _PRODUCTS.get(packet)
        if pair is not None and len(args) > pair[1] and all(self.is_activation(args[i]) for i in pair):
            self.trace.activation_products.setdefault(owner, set()).add(str(packet))
        elif packet in _ATTENTION_KERNELS and len(args) >= 3:
            q, k, v = (self.is_activation(a) for a in args[:3])
            # q @ k^T, then softmax(q @ k^T) @ v: either product between two activations
            if (q and k) or ((q or k) and v):
                self.trace.activation_products.setdefault(owner, set()).add(str(packet))
        depends = packet not in _SHAPE_ONLY and any(
            self.is_activation(t) for t in tree_leaves((args, kwargs))
        )
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is None:
                    continue
                if depends:
                    self.dependent.add(key)
                else:
                    self.dependent.discard(key)
        return out


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (e.g. a sparse or meta tensor)
        return None
    return (str(t.device), ptr) if ptr else None


def trace_forward(
    model: nn.Module, input_size: tuple[int, ...] | None = None, *, example_inputs: Any = None
) -> ForwardTrace:
    """One batch-1 forward of ``model`` in eval mode, counted per module (see :class:`ForwardTrace`),
    on a blank image of ``input_size`` or on ``example_inputs`` (see :func:`example_call`; every
    tensor in them counts as an input).

    Hooks already registered on ``model`` run as usual during this forward.
    """
    stack: list[str] = []
    handles = []

    def push(path: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            stack.append(path)

        return hook

    def pop(mod: nn.Module, args: tuple, out: Any) -> None:
        stack.pop()

    trace = ForwardTrace(0)
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(push(path)))
        handles.append(module.register_forward_hook(pop, always_call=True))
    try:
        with _eval_mode(model), torch.enable_grad(), _counter() as fc:
            tracer = _Tracer(fc, stack, trace)
            args, kwargs = example_call(model, input_size, example_inputs)
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    tracer.mark(t)
            with tracer:
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    trace.flops = fc.get_total_flops()
    return trace


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once); only those with grad when ``trainable_only``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
