"""What every subcommand shares: consoles, the error boundary, option types.

Heavy libraries (torch, transformers) are imported inside commands, never here, so that
``colbertkit --help`` stays instant.
"""

from __future__ import annotations

import enum
import functools
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from colbertkit import defaults, errors
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


def _debug_callback(value: bool) -> bool:
    if value:
        set_debug(True)
    return value


def debug_option() -> Any:
    """``--debug`` after the command name too (``colbertkit --debug score`` works as well)."""
    return typer.Option(
        False,
        "--debug",
        callback=_debug_callback,
        is_eager=True,
        help=f"Show full tracebacks (or set {errors.DEBUG_ENV}=1).",
    )


# The options of every command that loads a model, written once.


def encode_batch_size_option() -> Any:
    return typer.Option(
        defaults.ENCODE_BATCH_SIZE,
        "--encode-batch-size",
        min=1,
        help="Texts per encoder forward (memory vs speed; scores do not change).",
    )


def device_option() -> Any:
    return typer.Option(
        "auto",
        "--device",
        envvar="COLBERTKIT_DEVICE",
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.",
    )


def dtype_option() -> Any:
    return typer.Option(
        ComputeDType.fp32,
        "--dtype",
        help="Encoder precision: fp32 (exact), bf16, fp16 (GPU), or auto: bf16 where the "
        "hardware has it (CUDA, AMX / AVX512-BF16 CPUs), fp16 on Volta / Turing GPUs, else fp32.",
    )


def max_len_option(kind: str) -> Any:
    default = defaults.QUERY_MAX_LEN if kind == "query" else defaults.PASSAGE_MAX_LEN
    return typer.Option(
        None,
        f"--{kind}-max-len",
        min=2,
        help=f"Default: the checkpoint's metadata, else {default}.",
    )


def trust_remote_code_option() -> Any:
    return typer.Option(
        False,
        "--trust-remote-code",
        help="Allow the checkpoint's own Python code (off by default).",
    )


def quiet_option() -> Any:
    return typer.Option(False, "--quiet", "-q", help="Only errors on stderr.")


# Core errors name the core's parameters in backticks (`fresh_head=True`, `dtype`); the CLI
# says its flags. One table for every command; a backticked name not listed stays as it is.
PARAMETER_FLAGS = {
    "base_model": "--base-model",
    "baseline": "--baseline",
    "baseline_scores": "--baseline-scores",
    "batch_size": "--batch-size",
    "bootstrap_samples": "--bootstrap-samples",
    "checkpoint": "CKPT",
    "colbert_dim": "--colbert-dim",
    "data": "DATA",
    "device": "--device",
    "dtype": "--dtype",
    "encode_batch_size": "--encode-batch-size",
    "eval_path": "--eval",
    "force": "--force",
    "format": "--format",
    "layout": "--layout",
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
    "qrels": "--qrels",
    "query_max_len": "--query-max-len",
    "recall_at": "--recall-at",
    "resume": "--resume",
    "resume_from": "--resume",
    "resume_from='latest'": "--resume RUN",
    "sample_limit": "--examples",
    "scores": "--scores",
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


def stderr_console() -> Console:
    # Built on demand so that tests capturing sys.stderr see the output.
    # No emoji codes: ":end:" in a message must stay text.
    return Console(file=sys.stderr, highlight=False, soft_wrap=True, emoji=False)


_debug_flag = False


def set_debug(enabled: bool) -> None:
    """``--debug`` of the command being run (the app's callback sets it on every call)."""
    global _debug_flag
    _debug_flag = enabled


def debug_enabled() -> bool:
    """``--debug`` on this command line, or COLBERTKIT_DEBUG set in the environment."""
    return _debug_flag or errors.debug_enabled()


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
