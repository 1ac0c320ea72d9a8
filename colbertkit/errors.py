"""One exception family; the CLI turns each into one red line on stderr and an exit code.

Messages are written for the person at the terminal: what is wrong, where (file and line),
and what to do about it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DEBUG_ENV = "COLBERTKIT_DEBUG"
QUIET_ENV = "COLBERTKIT_QUIET"  # set by `colbertkit train -q` for its workers: errors only


def debug_enabled() -> bool:
    """Tracebacks wanted: COLBERTKIT_DEBUG set (the CLI's ``--debug`` sets it too, so the
    workers that ``colbertkit train`` starts see it)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


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


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def unknown_key_hint(
    key: str, known: Iterable[str], familiar: Mapping[str, str] | None = None
) -> str | None:
    """The valid name nearest to ``key`` (``learning_rate`` -> ``lr`` through ``familiar``)."""
    familiar = familiar or {}
    if key in familiar:
        return familiar[key]
    candidates = sorted(set(known) | set(familiar))
    nearest = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return familiar.get(nearest[0], nearest[0]) if nearest else None


def describe_validation_error(error: Any, *, quote_names: bool = False) -> str:
    """``setting: message; setting: message`` for each problem a pydantic ValidationError holds.

    pydantic's ``Value error,`` prefix is dropped. ``quote_names`` writes each name as
    ```name``` (a function's parameter, which the CLI turns into its flag).
    """
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if where and quote_names:
            where = f"`{where}`"
            given = item.get("input")
            if isinstance(given, (str, int, float)) and not isinstance(given, bool):
                where += f" {given}"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def validate_options(model: type, **values: Any) -> Any:
    """``model(**values)`` (a pydantic model of a function's options), or a UsageError that names
    each wrong parameter and what it should be."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as error:
        raise UsageError(describe_validation_error(error, quote_names=True)) from None
