"""One exception family; the CLI turns each into one red line on stderr and an exit code.

Messages are written for the person at the terminal: what is wrong, where (file and line),
and what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class ColbertkitError(Exception):
    """A known failure: the message is shown as is, without a traceback."""

    exit_code = 1


class UsageError(ColbertkitError):
    """The command cannot run as asked (missing file, contradictory options)."""

    exit_code = 2


class InputError(ColbertkitError):
    """A line of an input file is malformed."""

    def __init__(self, path: str | Path, line: int | None, problem: str, fix: str = "") -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)
        self.path = str(path)
        self.line = line


class CheckpointError(ColbertkitError):
    """A checkpoint cannot be found, read or trusted."""
