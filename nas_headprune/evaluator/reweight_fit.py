"""The fits of the reweight step (:mod:`nas_headprune.evaluator.reweight` describes the modes):
the constants of dropped layers, the sequential ridge refit of the consumers, the trained per-channel
scales, and the consumer-output error sums they are judged by."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from nas_headprune.config import ReweightConfig
from nas_headprune.errors import ArchitectureError
from nas_headprune.evaluator.activations import capture_activation, module_outputs
from nas_headprune.evaluator.metrics import batch_inputs
from nas_headprune.space import HeadSpace
from nas_headprune.space.dropped import DroppedSublayer

# the reweight step's logger: its records keep one name, which callers may quieten as one
log = logging.getLogger("nas_headprune.evaluator.reweight")

Batch = tuple[Tensor, Tensor] | list[Tensor] | Tensor

SEED = 0  # token subsampling is deterministic


# ------------------------------------------------------------------------------------- lstsq
def fit_constants(
    dense: nn.Module,
    pruned: nn.Module,
    names: Mapping[str, str],
    batches: Sequence[Batch],
    device: str | torch.device,
) -> None:
    """Each dropped layer's constant set to the mean of the dense consumer's output over every
    calibration token: the least-squares fit of ``[1] W = Y``, the bias-only case of the lstsq refit.
    A constant without a bias parameter (zeros) stays as it is. One dense forward per batch serves
    every dropped layer."""
    fitted = {
        n: c for n, c in names.items() if cast(DroppedSublayer, pruned.get_submodule(n)).value is not None
    }
    if not fitted:
        return
    sums: dict[str, tuple[Tensor, int]] = {}  # per layer: output summed over tokens, token count
    with torch.no_grad():
        for batch in batches:
            for name, y in module_outputs(dense, fitted, batch_inputs(batch).to(device)).items():
                flat = y.reshape(-1, y.shape[-1]).double()  # (tokens, channels)
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (flat.sum(dim=0) + total, count + flat.shape[0])
        for name, (total, count) in sums.items():
            value = cast(DroppedSublayer, pruned.get_submodule(name)).value
            assert value is not None  # only layers with a constant are fitted
            value.copy_((total / count).to(value))
            log.debug("%s: dropped layer's constant fitted on %d tokens", name, count)


def fit_lstsq(
    dense: nn.Module,
    pruned: nn.Module,
    space: HeadSpace,
    names: Mapping[str, str],
    batches: Sequence[Batch],
    cfg: ReweightConfig,
    device: str | torch.device,
) -> int:
    """Sequential ridge refit of every consumer; returns the most tokens one fit used."""
    gen = torch.Generator().manual_seed(SEED)
    images_per_batch = [batch_inputs(b).shape[0] for b in batches]
    most = 0
    for name, cons in names.items():
        linear = cast(nn.Linear, pruned.get_submodule(cons))
        has_bias = linear.bias is not None
        per_image = space.layers[name].meta.get("tokens")
        total = sum(images_per_batch) * per_image if per_image else None
        keep = min(1.0, cfg.max_tokens / total) if total else 1.0
        gram: Tensor | None = None  # (k+1, k+1) float64: [X 1]^T [X 1]
        cross: Tensor | None = None  # (k+1, C_out) float64: [X 1]^T Y
        used = 0
        with torch.no_grad():
            for batch in batches:
                images = batch_inputs(batch).to(device)
                y = capture_activation(dense, cons, images, "output")  # (T, C_out)
                x = capture_activation(pruned, cons, images, "input")  # (T, k)
                if x.shape[0] != y.shape[0]:
                    raise ArchitectureError(
                        f"{cons}: dense and pruned models see {y.shape[0]} and {x.shape[0]} tokens"
                    )
                if keep < 1.0:
                    rows = max(1, math.ceil(x.shape[0] * keep))
                    idx = torch.randperm(x.shape[0], generator=gen)[:rows].to(x.device)
                    x, y = x[idx], y[idx]
                xa = x.double()
                if has_bias:
                    xa = torch.cat([xa, xa.new_ones(xa.shape[0], 1)], dim=1)  # (T, k+1)
                g, c = xa.T @ xa, xa.T @ y.double()
                gram = g if gram is None else gram + g
                cross = c if cross is None else cross + c
                used += x.shape[0]
        assert gram is not None and cross is not None  # batches is not empty
        w0 = linear.weight.detach().double().T  # (k, C_out)
        if has_bias:
            w0 = torch.cat([w0, linear.bias.detach().double().unsqueeze(0)], dim=0)  # (k+1, C_out)
        solution = ridge_solve(gram, cross, w0, linear.in_features, cfg.ridge)
        if not torch.isfinite(solution).all():
            log.warning("%s: least-squares refit is not finite; layer left as it was", cons)
            continue
        with torch.no_grad():
            k = linear.in_features
            linear.weight.copy_(solution[:k].T.to(linear.weight))
            if has_bias:
                linear.bias.copy_(solution[k].to(linear.bias))
        most = max(most, used)
        log.debug("%s: refitted on %d tokens", cons, used)
    return most


def ridge_solve(gram: Tensor, cross: Tensor, w0: Tensor, k: int, ridge: float) -> Tensor:
    """``argmin ||[X 1] W - Y||^2 + lambda ||W[:k] - W0[:k]||^2`` from the normal equations."""
    damp = torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if ridge > 0 and k > 0:
        lam = ridge * gram.diagonal()[:k].mean()
        damp[:k] = lam if lam > 0 else ridge  # all-zero inputs: damp absolutely
    lhs = gram + torch.diag(damp)
    rhs = cross + damp.unsqueeze(1) * w0
    # gelsd (SVD) copes with a singular system (ridge = 0 and dead or duplicate channels); CPU only
    return torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(gram.device)


# ------------------------------------------------------------------------------------ scales
def fit_scales(
    dense: nn.Module,
    pruned: nn.Module,
    names: Mapping[str, str],
    batches: Sequence[Batch],
    cfg: ReweightConfig,
    device: str | torch.device,
) -> bool:
    """Train per-input-channel scales of every consumer, fold them if they help; True if folded."""
    linears = {name: cast(nn.Linear, pruned.get_submodule(cons)) for name, cons in names.items()}
    scales = {
        name: torch.ones(
            lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device, requires_grad=True
        )
        for name, lin in linears.items()
    }

    def scale_input(s: Tensor):
        def hook(mod: nn.Module, args: tuple) -> tuple:
            return (args[0] * s, *args[1:])  # (..., k) * (k,)

        return hook

    trainable = [p for p in pruned.parameters() if p.requires_grad]
    handles = [lin.register_forward_pre_hook(scale_input(scales[n])) for n, lin in linears.items()]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            start = mean_of(list(relative(error_sums(dense, pruned, names, batches, device)).values()))
        opt = torch.optim.Adam(list(scales.values()), lr=cfg.scale_lr)
        for step in range(cfg.scale_steps):
            images = batch_inputs(batches[step % len(batches)]).to(device)
            with torch.no_grad():
                targets = module_outputs(dense, names, images)
            with torch.enable_grad():
                outs = module_outputs(pruned, names, images)
                loss = torch.stack(
                    [
                        ((outs[n] - targets[n]) ** 2).sum() / (targets[n] ** 2).sum().clamp_min(1e-12)
                        for n in names
                    ]
                ).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if step == 0 or step + 1 == cfg.scale_steps:
                log.debug("scales step %d: loss %.4g", step + 1, loss.item())
        with torch.no_grad():
            end = mean_of(list(relative(error_sums(dense, pruned, names, batches, device)).values()))
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    if not end < start:
        log.warning(
            "reweight scales did not lower the calibration error (%.4g -> %.4g); not folded", start, end
        )
        return False
    with torch.no_grad():
        for name, lin in linears.items():
            lin.weight.mul_(scales[name].detach().unsqueeze(0))  # (C_out, k) * (1, k): W diag(s)
    return True


def mean_of(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def error_sums(
    dense: nn.Module,
    pruned: nn.Module,
    names: Mapping[str, str],
    batches: Sequence[Batch],
    device: str | torch.device,
    pruned_names: Mapping[str, str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Per layer, ``(sum ||Y - Y_hat||^2, sum ||Y||^2)`` over every token of ``batches``; ``Y_hat`` is
    read from ``pruned_names`` (by default the same modules as ``names``)."""
    sums = {name: [0.0, 0.0] for name in names}
    for batch in batches:
        images = batch_inputs(batch).to(device)
        ref = module_outputs(dense, names, images)
        out = module_outputs(pruned, pruned_names or names, images)
        for name in names:
            y, y_hat = ref[name].double(), out[name].double()
            if y.shape != y_hat.shape:
                raise ArchitectureError(
                    f"{names[name]}: dense output {tuple(y.shape)} vs pruned {tuple(y_hat.shape)}; "
                    f"was `pruned` materialised from `dense`?"
                )
            sums[name][0] += float(((y - y_hat) ** 2).sum())
            sums[name][1] += float((y**2).sum())
    return {name: (e, n) for name, (e, n) in sums.items()}


def relative(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for name, (err, norm) in sums.items():
        out[name] = math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf)
    return out
