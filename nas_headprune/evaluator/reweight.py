"""Strategy-independent reweighting after surgery (METHOD.md sections 3.4, 3.7 and 5).

Surgery removes channels and leaves the surviving weights as they were, so each pruned layer's
output drifts from the dense model's. This step compensates the drift the same way for every
strategy, by refitting the *consumer* of each layer's pruned channels: the linear layer whose input
columns the pruning removed (``proj`` of an attention layer, ``fc2`` of an MLP; found from the
space's coupling, as the ``.weight`` slot sliced along axis 1). Three modes, chosen by
:class:`ReweightConfig`:

``"lstsq"``
    For each layer in module order, regress the dense model's consumer output ``Y`` (tokens, C_out)
    on the pruned model's consumer input ``X`` (tokens, kept channels) with a bias column:
    ``[X 1] W = Y``. The scheme is **sequential**: layer ``i``'s ``X`` is collected from the pruned
    model *after* layers ``0..i-1`` have been refitted, so each refit also absorbs the drift that the
    earlier pruned layers left in its input. (A layer's output depends only on layers before it, so
    a later refit never changes an earlier layer's fit.) The normal equations are accumulated in
    float64 over the calibration batches (subsampled to at most ``max_tokens`` tokens per layer)
    and solved with Tikhonov damping ``lambda = ridge * mean(diag(X^T X))`` on the weight rows
    (not the bias) **towards the surgery's weights** ``W0``:
    ``min ||[X 1] W - Y||^2 + lambda ||W - W0||^2``. Damping towards ``W0`` instead of zero keeps
    directions the calibration data does not excite (dead or duplicate channels) at their dense
    values, and the fit can never be worse than ``W0`` on the calibration tokens. Rank deficiency
    (e.g. ``ridge=0`` with dead channels) is handled by an SVD-based solver (``gelsd``), which gives
    the minimum-norm solution.

``"scales"``
    Train one scale per kept consumer input channel (initialised at 1) with Adam for
    ``scale_steps`` steps, cycling over the calibration batches. The objective is the mean over
    layers of the relative squared error between the pruned and dense consumer outputs (the same
    per-layer quantity :func:`block_output_error` reports, rather than the final logits: every layer
    gives a signal, which matters with few steps). All scales are trained jointly, end to end through
    the pruned model. The scales are then folded exactly into the consumers' weight columns
    (``W diag(s)``), so the model keeps its architecture and cost. They are kept only if they lower
    the mean calibration error; otherwise the model is left as it was (logged).

``"lstsq+scales"``
    ``"lstsq"`` first, then ``"scales"`` from the refitted weights.

A layer dropped whole (``space.drop_sublayers``) has no consumer left: its constant output is set
to the mean of the dense consumer's output over the calibration tokens in the ``"lstsq"`` modes
(the same least-squares fit with only the bias column), before the other layers are refitted; the
report compares the constant with the dense consumer's output.

``"none"``
    Leaves the model untouched (bit for bit) and reports the current errors.

Both models run on the same calibration images in eval mode; ``dense`` is never modified (its
training flag and device are restored, and every hook is removed). ``pruned`` is modified in place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from nas_headprune.config import ReweightConfig
from nas_headprune.errors import ArchitectureError, UsageError
from nas_headprune.evaluator.activations import capture_activation, module_outputs
from nas_headprune.evaluator.metrics import batch_inputs
from nas_headprune.space import HeadSpace
from nas_headprune.space.dropped import DroppedSublayer

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor] | list[Tensor] | Tensor
_SEED = 0  # token subsampling is deterministic


@dataclass
class LayerReweight:
    """One layer: its consumer and the relative error ``||Y - Y_hat|| / ||Y||`` before and after."""

    consumer: str
    before: float
    after: float


@dataclass
class ReweightReport:
    """Per-layer relative errors of the consumer outputs on the calibration images.

    ``before`` is the pruned model as handed in, ``after`` the model as returned, both measured on
    every calibration token. ``tokens`` is the largest number of tokens one lstsq fit used (0 when no
    fit ran); ``scales_kept`` says whether trained scales were folded (``None`` when none trained).
    """

    mode: str
    layers: dict[str, LayerReweight] = field(default_factory=dict)
    tokens: int = 0
    scales_kept: bool | None = None

    @property
    def mean_before(self) -> float:
        return _mean([r.before for r in self.layers.values()])

    @property
    def mean_after(self) -> float:
        return _mean([r.after for r in self.layers.values()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "mean_before": self.mean_before,
            "mean_after": self.mean_after,
            "tokens": self.tokens,
            "scales_kept": self.scales_kept,
            "layers": {
                name: {"consumer": r.consumer, "before": r.before, "after": r.after}
                for name, r in self.layers.items()
            },
        }


# ------------------------------------------------------------------------------------ public API
def consumers(space: HeadSpace) -> dict[str, str]:
    """``{layer label: full module name of its consumer}``, in module order.

    The consumer is the linear layer whose input columns a dimension of the layer slices (the
    coupling slot ``"<name>.weight"`` on axis 1): ``proj`` for attention, ``fc2`` for an MLP.
    """
    out: dict[str, str] = {}
    for name, layer in space.layers.items():
        found = sorted(
            {
                s.param.rpartition(".")[0]
                for slots in layer.adapter.coupling(layer).values()
                for s in slots
                if s.axis == 1 and s.param.endswith(".weight")
            }
        )
        if len(found) != 1:
            raise ArchitectureError(
                f"{name}: cannot reweight, expected one consumer whose input columns are pruned, "
                f"found {found or 'none'}"
            )
        out[name] = f"{name}.{found[0]}"
    return out


def block_output_error(
    dense: nn.Module,
    pruned: nn.Module,
    space: HeadSpace,
    batches: Sequence[Batch],
    device: str | torch.device = "cpu",
) -> float:
    """Mean over layers of ``||Y - Y_hat|| / ||Y||``, the dense (``Y``) vs pruned (``Y_hat``)
    consumer outputs on ``batches`` (``(images, labels)`` pairs or image tensors)."""
    return _mean(list(layer_errors(dense, pruned, space, batches, device).values()))


def layer_errors(
    dense: nn.Module,
    pruned: nn.Module,
    space: HeadSpace,
    batches: Sequence[Batch],
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Per layer, ``||Y - Y_hat|| / ||Y||`` over every token of ``batches`` (for a layer the pruned
    model dropped whole, ``Y_hat`` is its constant output)."""
    names = consumers(space)
    _, _, outputs = _split_dropped(dense, pruned, names)
    with _prepared(dense, device), _prepared(pruned, device), torch.no_grad():
        return _relative(_error_sums(dense, pruned, names, batches, device, outputs))


def reweight(
    dense: nn.Module,
    pruned: nn.Module,
    space: HeadSpace,
    calib_batches: Sequence[Batch],
    cfg: ReweightConfig | None = None,
    device: str | torch.device = "cpu",
) -> ReweightReport:
    """Refit ``pruned`` (in place) so its layers' outputs match ``dense``'s; see the module doc.

    ``space`` is the space ``dense`` was built from and ``pruned`` the model surgery returned for
    it. ``calib_batches`` are ``(images, labels)`` pairs (labels are ignored) or image tensors.
    Returns the per-layer relative errors before and after.
    """
    cfg = cfg if cfg is not None else ReweightConfig()
    if not calib_batches:
        raise UsageError("reweight needs at least one calibration batch, got none")
    if pruned is dense:
        raise UsageError(
            "reweight modifies `pruned` in place: pass the materialised copy, not the dense model"
        )
    names = consumers(space)
    dropped, kept, outputs = _split_dropped(dense, pruned, names)
    report = ReweightReport(mode=cfg.mode)
    with _prepared(dense, device), _prepared(pruned, device):
        with torch.no_grad():
            before = _relative(_error_sums(dense, pruned, names, calib_batches, device, outputs))
        if cfg.mode in ("lstsq", "lstsq+scales"):
            _fit_constants(dense, pruned, {n: names[n] for n in dropped}, calib_batches, device)
            report.tokens = _fit_lstsq(dense, pruned, space, kept, calib_batches, cfg, device)
        if cfg.mode in ("scales", "lstsq+scales") and cfg.scale_steps > 0 and kept:
            report.scales_kept = _fit_scales(dense, pruned, kept, calib_batches, cfg, device)
        if cfg.mode == "none":
            after = before
        else:
            with torch.no_grad():
                after = _relative(_error_sums(dense, pruned, names, calib_batches, device, outputs))
    for name, cons in names.items():
        report.layers[name] = LayerReweight(cons, before[name], after[name])
    log.info(
        "reweight (%s): mean relative consumer-output error %.4g -> %.4g over %d layers",
        cfg.mode,
        report.mean_before,
        report.mean_after,
        len(names),
    )
    return report


# ------------------------------------------------------------------------------------- lstsq
def _dropped(pruned: nn.Module, names: Mapping[str, str]) -> set[str]:
    """The layers of ``names`` that ``pruned`` dropped whole (a constant module in their place)."""
    out = set()
    for name in names:
        try:
            module = pruned.get_submodule(name)
        except AttributeError:
            continue  # _check_models names the missing module
        if isinstance(module, DroppedSublayer):
            out.add(name)
    return out


def _split_dropped(
    dense: nn.Module, pruned: nn.Module, names: Mapping[str, str]
) -> tuple[set[str], dict[str, str], dict[str, str]]:
    """``names`` split by what ``pruned`` did with each layer: the layers it dropped whole, the kept
    ones (``{layer: consumer}``, checked in both models), and per layer the pruned module whose output
    is compared with the dense consumer's (a dropped layer's constant module, else the consumer)."""
    dropped = _dropped(pruned, names)
    kept = {name: cons for name, cons in names.items() if name not in dropped}
    _check_models(dense, pruned, kept)
    outputs = {name: name if name in dropped else cons for name, cons in names.items()}
    return dropped, kept, outputs


def _fit_constants(
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


def _fit_lstsq(
    dense: nn.Module,
    pruned: nn.Module,
    space: HeadSpace,
    names: Mapping[str, str],
    batches: Sequence[Batch],
    cfg: ReweightConfig,
    device: str | torch.device,
) -> int:
    """Sequential ridge refit of every consumer; returns the most tokens one fit used."""
    gen = torch.Generator().manual_seed(_SEED)
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
        solution = _ridge_solve(gram, cross, w0, linear.in_features, cfg.ridge)
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


def _ridge_solve(gram: Tensor, cross: Tensor, w0: Tensor, k: int, ridge: float) -> Tensor:
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
def _fit_scales(
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
            start = _mean(list(_relative(_error_sums(dense, pruned, names, batches, device)).values()))
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
            end = _mean(list(_relative(_error_sums(dense, pruned, names, batches, device)).values()))
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


# ----------------------------------------------------------------------------------- helpers
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _error_sums(
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


def _relative(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for name, (err, norm) in sums.items():
        out[name] = math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf)
    return out


def _check_models(dense: nn.Module, pruned: nn.Module, names: Mapping[str, str]) -> None:
    for cons in names.values():
        for which, model in (("dense", dense), ("pruned", pruned)):
            try:
                module = model.get_submodule(cons)
            except AttributeError:
                raise ArchitectureError(
                    f"the {which} model has no module {cons!r}: was the space built from the dense model?"
                ) from None
            if not isinstance(module, nn.Linear):
                raise ArchitectureError(
                    f"{which} {cons} is a {type(module).__name__}; reweighting refits nn.Linear consumers only"
                )


@contextmanager
def _prepared(model: nn.Module, device: str | torch.device) -> Iterator[None]:
    """``model`` in eval mode on ``device`` for the block; training flags and device restored."""
    flags = {m: m.training for m in model.modules()}
    first = next(model.parameters(), None)
    home = first.device if first is not None else None
    target = torch.device(device)
    moved = home is not None and home != target
    if moved:
        model.to(target)
    model.eval()
    try:
        yield
    finally:
        if moved:
            model.to(home)
        for m, flag in flags.items():
            m.training = flag
