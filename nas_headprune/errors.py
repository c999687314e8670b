"""The project's exception hierarchy.

Every error a user can cause derives from :class:`NasHeadpruneError`. The CLI maps
:class:`UsageError` (and its subclasses) to exit code 2 and any other project error to exit code 1,
printing only the message.
"""

from __future__ import annotations


class NasHeadpruneError(Exception):
    """Base class of every error raised on purpose by nas-headprune."""


class UsageError(NasHeadpruneError, ValueError):
    """A bad value given by the user: config field, CLI argument, architecture. Exit code 2."""


class ConfigError(UsageError):
    """A config file or override that does not validate."""


class ArchitectureError(UsageError):
    """An architecture or channel selection that does not fit its search space."""


class UnsupportedLayerError(UsageError):
    """A layer that no space adapter can prune safely."""


class UnknownNameError(UsageError):
    """A strategy, space, model or preset name that is not registered."""


class DataNotFoundError(UsageError):
    """A dataset that cannot be found in any of the places searched."""


class CheckpointError(NasHeadpruneError):
    """A saved model or checkpoint that is corrupt, foreign or does not match its architecture."""


class StrategyError(NasHeadpruneError):
    """A strategy plugin that returned an invalid result (unbalanced, over budget, wrong layers)."""


class RunFolderError(UsageError):
    """A run folder that cannot be used: another process holds it, or it holds stages made with
    another config (exit code 2; ``--restart`` redoes the stages that differ)."""


class NonFiniteLossError(NasHeadpruneError):
    """Training produced a NaN or infinite loss; the run stops instead of saving a broken model."""


class LaunchError(NasHeadpruneError):
    """The scheduler refused a submission (exit code 1)."""


class DuplicatePluginError(UsageError):
    """Two installed distributions publish the same plugin name."""


class BudgetError(UsageError):
    """The budget cannot be met within the space's minimum widths."""


class StoreError(NasHeadpruneError):
    """A results store that is corrupt, foreign or from an incompatible version."""


class MissingDependencyError(UsageError):
    """An optional extra that a requested feature needs is not installed."""
