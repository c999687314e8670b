"""Progress bars: rich bars on stderr, so that stdout carries only a command's result (JSON)."""

from __future__ import annotations

from typing import Any


def stderr_progress(
    *columns: Any, enabled: bool = True, transient: bool = False, terminal_only: bool = False
) -> Any:
    """A ``rich.progress.Progress`` drawn on stderr (rich's default columns when none are given);
    disabled unless ``enabled``, and with ``terminal_only`` also when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    shown = enabled and (console.is_terminal or not terminal_only)
    return Progress(*columns, console=console, transient=transient, disable=not shown)
