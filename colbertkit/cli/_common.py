"""What every subcommand shares: consoles, the error boundary, option types.

Heavy libraries (torch, transformers) are imported inside commands, never here, so that
``colbertkit --help`` stays instant.
"""

from __future__ import annotations

import enum
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from colbertkit.errors import ColbertkitError
from colbertkit.precision import COMPUTE_DTYPE_NAMES, DTYPE_NAMES

F = TypeVar("F", bound=Callable[..., Any])

# Weight precision, as the commands spell it (a storage format: export).
DType = enum.Enum("DType", {name: name for name in DTYPE_NAMES}, type=str)
# Precision of a computation: the above or auto (bf16 where the hardware has it).
ComputeDType = enum.Enum("ComputeDType", {name: name for name in COMPUTE_DTYPE_NAMES}, type=str)


class ReportFormat(str, enum.Enum):
    """How a command that reports prints its report."""

    text = "text"
    json = "json"


def report_format_option(what: str = "the report") -> Any:
    return typer.Option(
        ReportFormat.text,
        "--format",
        "-f",
        help=f"Print {what} as text (rich on a terminal, plain when piped) or json.",
    )


def quiet_option() -> Any:
    return typer.Option(False, "--quiet", "-q", help="Only errors on stderr.")


# Core errors name the core's parameters in backticks (`fresh_head=True`, `dtype`); the CLI
# says its flags. One table for every command; a backticked name not listed stays as it is.
PARAMETER_FLAGS = {
    "base_model": "--base-model",
    "batch_size": "--batch-size",
    "colbert_dim": "--colbert-dim",
    "device": "--device",
    "dtype": "--dtype",
    "encode_batch_size": "--encode-batch-size",
    "eval_path": "--eval",
    "force": "--force",
    "format": "--format",
    "fresh_head": "--fresh-head",
    "machine_rank": "--machine-rank",
    "main_process_ip": "--main-process-ip",
    "main_process_port": "--main-process-port",
    "max_line_bytes": "--max-line-bytes",
    "max_tracked_rows": "--max-tracked-rows",
    "neg_nums": "--neg-nums",
    "num_machines": "--num-machines",
    "num_processes": "--num-processes",
    "output_dir": "--output-dir",
    "overwrite": "--overwrite",
    "pad_floor": "--pad-floor",
    "passage_max_len": "--passage-max-len",
    "profile": "--profile",
    "query_max_len": "--query-max-len",
    "resume": "--resume",
    "resume_from": "--resume",
    "resume_from='latest'": "--resume RUN",
    "sample_limit": "--examples",
    "seed": "--seed",
    "token_rows": "--token-rows",
    "tolerance": "--tolerance",
    "top_k": "--top-k",
    "trust_remote_code": "--trust-remote-code",
    "verify": "--verify",
    "verify=False": "--no-verify",
    "verify_pairs": "--verify",
    "window": "--window",
}
_PARAMETER = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")


def as_flags(message: str) -> str:
    """A core error message with its backticked parameters written as CLI flags."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        whole = f"{name}={value}" if value is not None else name
        if whole in PARAMETER_FLAGS:
            return PARAMETER_FLAGS[whole]
        if name not in PARAMETER_FLAGS:
            return match.group(0)
        option = PARAMETER_FLAGS[name]
        if value in (None, "True"):
            return option
        if value == "False":
            return "--no-" + option.removeprefix("--")
        return f"{option} {value.strip(chr(39))}"

    return _PARAMETER.sub(flag, message)


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
            message = escape(as_flags(str(error)))
            stderr_console().print(f"[bold red]Error:[/] {message}", markup=True, highlight=False)
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
