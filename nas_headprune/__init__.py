"""nas-headprune: head-balanced automatic channel pruning of multi-head attention.

Importing this package is cheap: it imports neither torch nor any strategy or space. The public
functions below are resolved lazily on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "save_pruned": "nas_headprune.io",
    "load_pruned": "nas_headprune.io",
    "build_space": "nas_headprune.space.build",
    "HeadSpace": "nas_headprune.space",
    "Architecture": "nas_headprune.space",
    "Selection": "nas_headprune.space",
    "materialize": "nas_headprune.evaluator.materialize",
    "analytic_cost": "nas_headprune.evaluator.cost",
    "measure_macs": "nas_headprune.evaluator.measure",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover  (names re-exported lazily by __getattr__)
    from nas_headprune.evaluator.cost import analytic_cost  # noqa: F401
    from nas_headprune.evaluator.materialize import materialize  # noqa: F401
    from nas_headprune.evaluator.measure import measure_macs  # noqa: F401
    from nas_headprune.io import load_pruned, save_pruned  # noqa: F401
    from nas_headprune.space import Architecture, HeadSpace, Selection  # noqa: F401
    from nas_headprune.space.build import build_space  # noqa: F401


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'nas_headprune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
