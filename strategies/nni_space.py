"""Head-balanced search spaces as NNI mutables, and NNI samples back as architectures.

:func:`to_nni` exports a :class:`~nas_headprune.space.HeadSpace` to NNI 3.0's search-space objects
(``nni.mutable``): a :class:`nni.mutable.MutableDict` holding one labelled
:class:`nni.mutable.Categorical` per dimension, keyed and labelled by the project's dimension label
(``"<module path>:qk|v|hidden"``), whose values are the widths the dimension allows (per-head widths
for attention, so every sample is head-balanced by construction). With a MACs target, the dict also
holds a :class:`nni.mutable.Constraint` under :data:`BUDGET_LABEL` that rejects every sample whose
analytic cost (:func:`~nas_headprune.evaluator.cost.analytic_cost`, the same count the runner
re-checks results against) is above the target. NNI's samplers and strategies treat a violated
constraint as an invalid sample and draw again.

An NNI sample is a flat ``{label: width}`` dict, the same shape as an
:class:`~nas_headprune.space.Architecture`; :func:`from_nni` checks it against the space and returns
one.

NNI is an optional extra (``pip install 'nas-headprune[nni]'``): this module imports it only inside
functions, and :func:`require_nni` turns a missing install into a usage error that names the
install command.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from nas_headprune.errors import ArchitectureError, MissingDependencyError, UsageError

if TYPE_CHECKING:
    from nas_headprune.space import Architecture, HeadSpace

#: the command that installs NNI and what its NAS modules import
INSTALL_COMMAND = "pip install 'nas-headprune[nni]'"
#: key and label of the MACs constraint inside an exported space
BUDGET_LABEL = "macs_budget"
#: modules the NNI strategies need (nni.nas imports pytorch_lightning, which nni does not declare)
_NAS_MODULES = ("nni.nas.space", "nni.nas.evaluator", "nni.nas.execution", "nni.nas.strategy")
#: bound on the exponent of the budget prior, so no weight underflows to exactly zero
_MAX_TILT = 30.0


def require_nni(nas: bool = False) -> ModuleType:
    """Import NNI (and, with ``nas=True``, the ``nni.nas`` modules the strategies drive); return ``nni``.

    Raises :class:`MissingDependencyError` (a usage error, exit code 2 on the command line) naming
    the missing module and the install command. NNI's import-time warnings about torch classes it
    does not know are silenced.
    """
    names = ("nni", "nni.mutable", *(_NAS_MODULES if nas else ()))
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(name)
        except ImportError as exc:
            what = "the NNI strategies need" if nas else "exporting a search space to NNI needs"
            raise MissingDependencyError(
                f"{what} NNI 3.0 and pytorch-lightning, which are not installed "
                f"(importing {name!r} failed: {exc}); install them with: {INSTALL_COMMAND}"
            ) from exc
    return importlib.import_module("nni")


@functools.cache
def _budget_class() -> type:
    """The constraint class, defined on first use so that this module never imports NNI at load."""
    from nni.mutable import Categorical, Constraint, ConstraintViolation, Mutable
    from nni.mutable.exception import SampleValidationError

    class MacsBudget(Constraint):
        """Valid when the analytic MACs of the sampled widths are at most ``target_macs``.

        ``dims`` are the categoricals it reads (one per dimension label); ``observer``, when set, is
        called with ``(sample, macs)`` for every sample the constraint rejects.
        """

        def __init__(
            self,
            space: HeadSpace,
            dims: list[Categorical],
            target_macs: float,
            *,
            label: str = BUDGET_LABEL,
        ) -> None:
            self.label = label
            self.space = space
            self.dims = dims
            self.target_macs = float(target_macs)
            self.observer: Callable[[Mapping[str, Any], float], None] | None = None

        def leaf_mutables(self, is_leaf: Callable[[Mutable], bool]) -> Any:
            for dim in self.dims:
                yield from dim.leaf_mutables(is_leaf)
            yield self

        def macs(self, sample: Mapping[str, Any]) -> float:
            """Analytic MACs per image of the widths in ``sample``."""
            from nas_headprune.evaluator.cost import analytic_cost

            return float(analytic_cost(self.space, {d.label: sample[d.label] for d in self.dims}).macs)

        def check_contains(self, sample: Mapping[str, Any]) -> SampleValidationError | None:
            for dim in self.dims:
                problem = dim.check_contains(sample)
                if problem is not None:
                    return problem
            macs = self.macs(sample)
            if macs > self.target_macs:
                if self.observer is not None:
                    self.observer(sample, macs)
                return ConstraintViolation(
                    f"{macs:.6g} MACs is above the budget of {self.target_macs:.6g} MACs"
                )
            return None

        def extra_repr(self) -> str:
            return f"macs <= {self.target_macs:.6g}, label={self.label!r}"

    return MacsBudget


def budget_constraint(exported: Any) -> Any:
    """The MACs constraint of a space exported by :func:`to_nni` (``None`` when it has none)."""
    return exported[BUDGET_LABEL] if BUDGET_LABEL in exported else None


def budget_prior(space: HeadSpace, target_macs: float) -> dict[str, list[float]]:
    """Sampling weights per dimension label (aligned with ``DimSpec.allowed()``) that centre the
    expected analytic MACs of a random draw on ``target_macs``.

    Each width ``w`` of dimension ``d`` gets weight ``exp(-t * c_d * (w - w_min) / c)``, ``c_d`` the
    MACs one unit of that width costs (with the other dimensions dense) and ``c`` their mean over
    the dimensions: the maximum-entropy distribution for a given expected cost when the cost is
    linear in the widths. The single tilt ``t`` is found by bisection (``t < 0`` favours wide
    layers when the uniform draw is cheaper than the target). With independent draws and a cost
    that is linear in each width, the expected cost is the cost of the expected widths, so roughly
    half of the draws meet the budget and those that do sit close to it.
    """
    from nas_headprune.evaluator.cost import analytic_cost

    dims = space.dims
    dense = space.dense().to_dict()
    dense_macs = float(analytic_cost(space).macs)
    values = {label: d.allowed() for label, d in dims.items()}
    slope: dict[str, float] = {}
    for label, d in dims.items():
        low = values[label][0]
        if low == d.max_width:
            slope[label] = 0.0
            continue
        cheaper = float(analytic_cost(space, {**dense, label: low}).macs)
        slope[label] = max(dense_macs - cheaper, 0.0) / (d.max_width - low)
    ranges = [slope[k] * (dims[k].max_width - values[k][0]) for k in dims]
    scale = sum(ranges) / len(ranges) if ranges and sum(ranges) > 0 else 1.0

    def weights(t: float) -> dict[str, list[float]]:
        out = {}
        for label, allowed in values.items():
            low = allowed[0]
            logits = [-t * slope[label] * (w - low) / scale for w in allowed]
            top = max(logits)
            raw = [math.exp(max(z - top, -700.0)) for z in logits]
            total = sum(raw)
            out[label] = [r / total for r in raw]
        return out

    def expected_macs(t: float) -> float:
        w = weights(t)
        mean = {k: sum(p * v for p, v in zip(w[k], values[k], strict=True)) for k in values}
        return float(analytic_cost(space, mean).macs)

    lo, hi = -_MAX_TILT, _MAX_TILT  # expected_macs decreases in t
    if expected_macs(lo) <= target_macs:
        return weights(lo)
    if expected_macs(hi) >= target_macs:
        return weights(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_macs(mid) > target_macs:
            lo = mid
        else:
            hi = mid
    return weights((lo + hi) / 2)


def to_nni(
    space: HeadSpace,
    target_macs: float | None = None,
    *,
    prior: Literal["uniform", "budget"] = "uniform",
) -> Any:
    """Export ``space`` to an NNI search space (an ``nni.mutable.MutableDict``).

    One :class:`nni.mutable.Categorical` per dimension, keyed and labelled by its dimension label,
    values the allowed widths in increasing order, default the dense width. With ``target_macs``,
    the dict also holds a MACs constraint under :data:`BUDGET_LABEL` (analytic MACs per image at most
    ``target_macs``), and ``prior="budget"`` sets the categoricals' sampling weights so that random
    draws centre on the budget (:func:`budget_prior`) instead of being uniform.

    Raises :class:`~nas_headprune.allocate.BudgetError` when even the smallest architecture costs
    more than ``target_macs``, and :class:`MissingDependencyError` without NNI.
    """
    require_nni()
    from nni.mutable import Categorical, MutableDict

    if prior not in ("uniform", "budget"):
        raise UsageError(f"unknown prior {prior!r}; choose 'uniform' or 'budget'")
    if prior == "budget" and target_macs is None:
        raise UsageError("prior='budget' needs a target_macs to centre the sampling weights on")
    weights: dict[str, list[float]] = {}
    if target_macs is not None:
        from nas_headprune.allocate import check_reachable

        check_reachable(space, float(target_macs))
        if prior == "budget":
            weights = budget_prior(space, float(target_macs))
    dims = []
    for label, d in space.dims.items():
        dims.append(Categorical(d.allowed(), weights=weights.get(label), default=d.max_width, label=label))
    exported = MutableDict({c.label: c for c in dims})
    if target_macs is not None:
        exported[BUDGET_LABEL] = _budget_class()(space, dims, float(target_macs))
    return exported


def from_nni(space: HeadSpace, sample: Mapping[str, Any], target_macs: float | None = None) -> Architecture:
    """The :class:`~nas_headprune.space.Architecture` an NNI sample describes, checked against ``space``.

    ``sample`` is an NNI sample (``{label: width}``, what NNI's strategies produce) or the frozen
    value of an exported space (which also holds :data:`BUDGET_LABEL` -> ``None``). Unknown or
    missing labels and disallowed widths raise :class:`~nas_headprune.errors.ArchitectureError`;
    so does a cost above ``target_macs`` when one is given.
    """
    widths: dict[str, object] = {}
    for label, value in sample.items():
        if label == BUDGET_LABEL and value is None:
            continue
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)  # numpy integers from NNI's samplers
        widths[label] = value
    arch = space.validate(widths)
    if target_macs is not None:
        from nas_headprune.evaluator.cost import analytic_cost

        macs = float(analytic_cost(space, arch).macs)
        if macs > target_macs:
            raise ArchitectureError(
                f"the NNI sample costs {macs:.6g} MACs, above the budget of {float(target_macs):.6g} MACs"
            )
    return arch
