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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nas_headprune.config import ReweightConfig
from nas_headprune.errors import ArchitectureError, UsageError
from nas_headprune.evaluator.reweight_fit import (
    Batch,
    error_sums,
    fit_constants,
    fit_lstsq,
    fit_scales,
    mean_of,
    relative,
)
from nas_headprune.space import HeadSpace
from nas_headprune.space.dropped import DroppedSublayer

log = logging.getLogger(__name__)


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
        return mean_of([r.before for r in self.layers.values()])

    @property
    def mean_after(self) -> float:
        return mean_of([r.after for r in self.layers.values()])

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
    return mean_of(list(layer_errors(dense, pruned, space, batches, device).values()))


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
        return relative(error_sums(dense, pruned, names, batches, device, outputs))


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
            before = relative(error_sums(dense, pruned, names, calib_batches, device, outputs))
        if cfg.mode in ("lstsq", "lstsq+scales"):
            fit_constants(dense, pruned, {n: names[n] for n in dropped}, calib_batches, device)
            report.tokens = fit_lstsq(dense, pruned, space, kept, calib_batches, cfg, device)
        if cfg.mode in ("scales", "lstsq+scales") and cfg.scale_steps > 0 and kept:
            report.scales_kept = fit_scales(dense, pruned, kept, calib_batches, cfg, device)
        if cfg.mode == "none":
            after = before
        else:
            with torch.no_grad():
                after = relative(error_sums(dense, pruned, names, calib_batches, device, outputs))
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


# ----------------------------------------------------------------------------------- helpers
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
