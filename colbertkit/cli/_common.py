"""What every subcommand shares: consoles, the error boundary, option types.

Heavy libraries (torch, transformers) are imported inside commands, never here, so that
``colbertkit --help`` stays instant.
"""

from __future__ import annotations

import enum
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

from colbertkit.errors import ColbertkitError

F = TypeVar("F", bound=Callable[..., Any])


class DType(str, enum.Enum):
    """Weight precision, as the commands spell it."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


DEBUG_ENV = "COLBERTKIT_DEBUG"


def stderr_console() -> Console:
    # Built on demand so that tests capturing sys.stderr see the output.
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


_debug_flag = False


def set_debug(enabled: bool) -> None:
    """``--debug`` of the command being run (the app's callback sets it on every call)."""
    global _debug_flag
    _debug_flag = enabled


def debug_enabled() -> bool:
    """``--debug`` on this command line, or COLBERTKIT_DEBUG set in the environment."""
    return _debug_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def handle_errors(command: F) -> F:
    """The error boundary: a ColbertkitError becomes one red line on stderr and its exit code.

    With ``--debug`` (or COLBERTKIT_DEBUG=1) the exception propagates with its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ColbertkitError as error:
            if debug_enabled():
                raise
            stderr_console().print(f"[bold red]Error:[/] {error}", markup=True, highlight=False)
            raise typer.Exit(code=error.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            stderr_console().print("[red]Interrupted.[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(
    description: str, total: int, *, enabled: bool = True, bytes_unit: bool = False
) -> Iterator[Callable[[int], None] | None]:
    """A transient rich progress bar on stderr; yields ``advance(n)``, or None when off.

    Shown only when stderr is a terminal, so pipes and logs stay clean.
    """
    console = stderr_console()
    if not (enabled and console.is_terminal):
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counters = (DownloadColumn(), TransferSpeedColumn()) if bytes_unit else (MofNCompleteColumn(),)
    columns = ("[progress.description]{task.description}", BarColumn(), *counters)
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
