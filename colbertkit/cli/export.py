"""``colbertkit export CKPT OUT``: any checkpoint to safetensors, verified by scoring."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import typer

from colbertkit.cli._common import (
    DType,
    ReportFormat,
    debug_option,
    handle_errors,
    quiet_option,
    report_format_option,
    stderr_console,
)
from colbertkit.errors import UsageError
from colbertkit.progress import ProgressBar


class Layout(str, enum.Enum):
    colbertkit = "colbertkit"
    reference = "reference"


@handle_errors
def export_command(
    checkpoint: str = typer.Argument(
        ...,
        help="Source: a colbertkit model or training checkpoint (checkpoints/step-N, sharded "
        "FSDP included), a reference / BGE-M3 directory, a packaged model or a hub id.",
    ),
    out: Path = typer.Argument(..., help="Directory to create (must not exist unless --force)."),
    layout: Layout = typer.Option(
        Layout.colbertkit,
        "--layout",
        help="colbertkit: safetensors + colbertkit.json. reference: encoder safetensors + "
        "colbert_linear.pt (plain tensors), for the reference and BGE-M3-style loaders.",
    ),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="Precision of the stored weights."),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT if it exists (only on success)."
    ),
    verify_pairs: Path | None = typer.Option(
        None,
        "--verify",
        help="Verify on these query<TAB>passage pairs instead of the built-in samples.",
        dir_okay=False,
    ),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip loading and scoring the export."
    ),
    tolerance: float | None = typer.Option(
        None,
        "--tolerance",
        min=0.0,
        help="Largest allowed score difference (default 1e-5 fp32, 2e-3 fp16, 1e-2 bf16).",
    ),
    base_model: str | None = typer.Option(
        None,
        "--base-model",
        help="For a training checkpoint: the model the run started from (config, tokenizer), "
        "when the one its trainer_state.json names is not here.",
    ),
    query_max_len: int | None = typer.Option(
        None, "--query-max-len", min=2, help="Record in the metadata (default: the source's)."
    ),
    passage_max_len: int | None = typer.Option(
        None, "--passage-max-len", min=2, help="Record in the metadata (default: the source's)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the checkpoint's own Python code when verifying."
    ),
    report_format: ReportFormat = report_format_option("what was written and verified"),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Export a checkpoint to safetensors (weights only), then check it scores like the source.

    Examples:

      colbertkit export runs/demo exported/

      colbertkit export runs/demo/checkpoints/step-00000010 exported-bf16/ --dtype bf16

      colbertkit export runs/demo exported-reference/ --layout reference
    """
    from rich.markup import escape

    from colbertkit.export import export_model

    if no_verify and verify_pairs is not None:
        raise UsageError("--verify and --no-verify contradict each other; keep one")
    console = stderr_console()

    def log(line: str) -> None:
        if not quiet:
            console.print(f"[dim]{escape(line)}[/]", highlight=False, markup=True)

    with ProgressBar("writing", None, enabled=not quiet, bytes_unit=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.update(completed=done, total=total)

        report = export_model(
            checkpoint,
            out,
            layout=layout.value,
            dtype=dtype.value,
            force=force,
            verify=not no_verify,
            verify_pairs=verify_pairs,
            tolerance=tolerance,
            base_model=base_model,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            trust_remote_code=trust_remote_code,
            progress=progress,
            log=log,
        )
    if report_format == ReportFormat.json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    if quiet:
        return
    typer.echo(
        f"wrote {report.out} ({report.layout} layout, {report.dtype}): {report.tensors} tensors, "
        f"{_size(report.source_bytes)} read -> {_size(report.written_bytes)} written "
        f"in {report.write_seconds:.1f}s"
    )
    if report.verified:
        upcast = "" if report.dtype == "fp32" else f"; {report.dtype} weights upcast to fp32"
        typer.echo(
            f"verified on {report.pairs_checked} pairs: largest score difference "
            f"{report.max_difference:.2e} (tolerance {report.tolerance:.0e}; scored on CPU in "
            f"fp32{upcast}) in {report.verify_seconds:.1f}s"
        )
    else:
        typer.echo("not verified (--no-verify)")


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"  # pragma: no cover
