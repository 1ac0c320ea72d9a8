"""The one progress bar of colbertkit: rich, on stderr, and only when stderr is a terminal.

Used by the CLI commands (scoring, validation, export) and by the training loop, whose workers
run without the CLI. Pipes and logs stay clean: off a terminal the bar does nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class ProgressBar:
    """A transient bar with a counter (items or bytes), time left and optional live stats.

    ``advance(n)`` and ``update(completed=..., total=..., stats=...)`` are safe to call when
    the bar is off (not a terminal, or ``enabled=False``).
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        enabled: bool = True,
        bytes_unit: bool = False,
        completed: int = 0,
        stats: bool = False,
        transient: bool = True,
    ) -> None:
        from rich.console import Console

        console = Console(file=sys.stderr)
        self.enabled = enabled and console.is_terminal
        self._bar: Any = None
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        counters = (
            (DownloadColumn(), TransferSpeedColumn()) if bytes_unit else (MofNCompleteColumn(),)
        )
        columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), *counters]
        columns.append(TimeRemainingColumn())
        if stats:
            columns.append(TextColumn("{task.fields[stats]}"))
        self._bar = Progress(*columns, console=console, transient=transient)
        self._task = self._bar.add_task(description, total=total, completed=completed, stats="")
        self._bar.start()

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def update(
        self, *, completed: int | None = None, total: int | None = None, stats: str | None = None
    ) -> None:
        if self._bar is None:
            return
        fields: dict[str, Any] = {} if stats is None else {"stats": stats}
        self._bar.update(self._task, completed=completed, total=total, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextmanager
def progress_bar(
    description: str, total: int, *, enabled: bool = True, bytes_unit: bool = False
) -> Iterator[Callable[[int], None] | None]:
    """A :class:`ProgressBar` as a context; yields its ``advance(n)``, or None when it is off."""
    with ProgressBar(description, total, enabled=enabled, bytes_unit=bytes_unit) as bar:
        yield bar.advance if bar.enabled else None
