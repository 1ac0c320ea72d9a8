"""``colbertkit validate-data FILE``: every problem of a training file, before any GPU time.

The work is :func:`colbertkit.validation.validate_dataset`; this module parses options and
renders the report: rich on a terminal, plain text when piped, JSON with ``--format json``.
Exit codes: 0 no errors (warnings allowed unless ``--strict``), 1 errors found (or warnings under
``--strict``), 2 the command could not run.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Any

import typer

from colbertkit import defaults
from colbertkit.cli._common import (
    ReportFormat,
    debug_option,
    handle_errors,
    quiet_option,
    report_format_option,
)
from colbertkit.errors import ColbertkitError
from colbertkit.progress import progress_bar

# Files smaller than this validate in about a second: no progress bar.
PROGRESS_MIN_BYTES = 64 * 1024 * 1024


class LossName(str, enum.Enum):
    contrastive = "contrastive"
    kl = "kl"
    contrastive_kl = "contrastive+kl"


@handle_errors
def validate_command(
    file: Path = typer.Argument(..., help="Training data: one JSON object a line.", dir_okay=False),
    eval_file: Path | None = typer.Option(
        None,
        "--eval",
        help="Eval data: checked too, and its queries and positives looked up in FILE.",
        dir_okay=False,
    ),
    neg_nums: int | None = typer.Option(
        None,
        "--neg-nums",
        min=0,
        help="Hard negatives per example in training: warn about rows with fewer. 0: none.",
    ),
    loss: LossName | None = typer.Option(
        None,
        "--loss",
        help="The training loss: kl and contrastive+kl need teacher scores (pos_scores, "
        "neg_scores) on every row; contrastive refuses graded rows (no neg). Default: either.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Tokenizer (local directory, packaged model or hub id): adds token lengths.",
    ),
    query_max_len: int = typer.Option(
        defaults.QUERY_MAX_LEN,
        "--query-max-len",
        min=2,
        help="With --model: query tokens kept (CLS, SEP included).",
    ),
    passage_max_len: int = typer.Option(
        defaults.PASSAGE_MAX_LEN,
        "--passage-max-len",
        min=2,
        help="With --model: passage tokens kept.",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="Queries (examples) per step on one process, as the profile's batch_size: gives "
        "steps per epoch.",
    ),
    report_format: ReportFormat = report_format_option(),
    strict: bool = typer.Option(False, "--strict", help="Warnings fail too (exit 1)."),
    examples: int = typer.Option(
        5, "--examples", min=0, help="Problems shown per kind; the rest are counted."
    ),
    token_rows: int | None = typer.Option(
        None, "--token-rows", min=1, help="With --model: tokenize only the first N rows."
    ),
    max_line_bytes: int = typer.Option(
        16 * 1024 * 1024, "--max-line-bytes", min=1, help="Longer lines are errors."
    ),
    max_tracked_rows: int = typer.Option(
        1_000_000,
        "--max-tracked-rows",
        min=1,
        help="Distinct rows and queries remembered for duplicate detection (~64 bytes each).",
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Progress bar on stderr (large files, terminal)."
    ),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Check training data: schema, content, duplicates, eval leaks, statistics.

    Examples:

      colbertkit validate-data train.jsonl

      colbertkit validate-data train.jsonl --eval eval.jsonl --neg-nums 15

      colbertkit validate-data train.jsonl --format json > report.json
    """
    from colbertkit.validation import validate_dataset

    total_bytes = sum(path.stat().st_size for path in (file, eval_file) if path and path.is_file())
    show = progress and total_bytes >= PROGRESS_MIN_BYTES
    with progress_bar("validating", total_bytes, enabled=show, bytes_unit=True) as advance:
        report = validate_dataset(
            file,
            neg_nums=neg_nums,
            loss=loss.value if loss is not None else None,
            eval_path=eval_file,
            tokenizer=model,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            batch_size=batch_size,
            sample_limit=examples,
            token_rows=token_rows,
            max_line_bytes=max_line_bytes,
            max_tracked_rows=max_tracked_rows,
            progress=advance,
        )
    data = report.to_dict()
    if report_format == ReportFormat.json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    elif quiet:
        pass  # the exit code and, on failure, the one-line error say it all
    elif sys.stdout.isatty():
        _render_rich(data, strict)
    else:
        sys.stdout.write(render_plain(data, strict))
        sys.stdout.flush()
    if not report.ok:
        raise ColbertkitError(report.summary_line())
    if strict and report.warning_count:
        raise ColbertkitError(f"{report.summary_line()}; --strict treats warnings as errors")


# --------------------------------------------------------------------------------------------
# Rendering (from the JSON-shaped dict, so every format shows the same facts)
# --------------------------------------------------------------------------------------------


def _summary_text(summary: dict[str, Any]) -> str:
    if not summary["count"]:
        return "-"
    return (
        f"min {summary['min']}, median {summary['median']}, mean {summary['mean']}, "
        f"p95 {summary['p95']}, max {summary['max']}"
    )


def _statistics_lines(statistics: dict[str, Any]) -> list[tuple[str, str]]:
    lines = [("rows", f"{statistics['rows']:,}")]
    examples = f"{statistics['examples']:,} (one per positive; one per graded row)"
    lines.append(("examples", examples))
    if statistics["steps_per_epoch"] is not None:
        lines.append(
            (
                "steps per epoch",
                f"{statistics['steps_per_epoch']:,} at batch size {statistics['batch_size']}",
            )
        )
    lines.append(("positives / row", _summary_text(statistics["positives_per_row"])))
    lines.append(("negatives / row", _summary_text(statistics["negatives_per_row"])))
    characters = statistics["characters"]
    lines.append(("query chars", _summary_text(characters["query"])))
    lines.append(("positive chars", _summary_text(characters["positive"])))
    lines.append(("negative chars", _summary_text(characters["negative"])))
    sampling = statistics["negative_sampling"]
    if sampling and sampling["rows_resampled"]:
        lines.append(
            (
                "neg resampling",
                f"{sampling['rows_resampled']:,} rows ({sampling['examples_resampled']:,} "
                f"examples) have < {sampling['neg_nums']} negatives: about "
                f"{sampling['expected_repeated_negatives_per_epoch']:,} repeated negatives an "
                "epoch",
            )
        )
    teacher = statistics.get("teacher_scores")
    if teacher:
        lines.append(("teacher scores", _teacher_text(teacher)))
    repeated = statistics["most_repeated_queries"]
    if repeated:
        shown = ", ".join(f"line {item['line']} on {item['rows']} rows" for item in repeated)
        lines.append(("repeated queries", shown))
    if statistics["extra_keys"]:
        shown = ", ".join(f"{key} ({count})" for key, count in statistics["extra_keys"].items())
        lines.append(("extra keys", shown))
    tokens = statistics["tokens"]
    if tokens:
        lines.append(
            (
                "query tokens",
                f"{_summary_text(tokens['query'])}; "
                f"{_percent(tokens['queries_truncated'])} over {tokens['query_max_len']}",
            )
        )
        lines.append(
            (
                "passage tokens",
                f"{_summary_text(tokens['passage'])}; "
                f"{_percent(tokens['passages_truncated'])} over {tokens['passage_max_len']}",
            )
        )
    return lines


def _range_text(summary: dict[str, Any]) -> str:
    if not summary["count"]:
        return "none"
    return f"{summary['min']:.4g} .. {summary['max']:.4g} (mean {summary['mean']:.4g})"


def _teacher_text(teacher: dict[str, Any]) -> str:
    text = (
        f"{teacher['rows']:,} rows ({teacher['graded_rows']:,} graded, no neg); "
        f"pos {_range_text(teacher['positive'])}; neg {_range_text(teacher['negative'])}"
    )
    if teacher["rows_with_a_negative_above_a_positive"]:
        text += (
            f"; {teacher['rows_with_a_negative_above_a_positive']:,} rows where a negative "
            "outscores a positive"
        )
    return text


def _percent(truncated: dict[str, Any]) -> str:
    return f"{truncated['count']:,} ({truncated['share'] * 100:.1f}%)"


def _issue_lines(issues: dict[str, Any]) -> list[str]:
    lines = []
    for kind, issue in issues.items():
        lines.append(f"{kind}: {issue['count']:,} - {issue['description']}")
        for sample in issue["samples"]:
            where = f"line {sample['line']}" if sample["line"] is not None else "file"
            lines.append(f"    {where}: {sample['message']}")
        if issue["more"]:
            lines.append(f"    ... and {issue['more']:,} more")
    return lines


def _verdict(data: dict[str, Any], strict: bool) -> str:
    if not data["ok"]:
        return f"FAILED: {data['error_count']:,} errors; training would refuse this data"
    if data["warning_count"]:
        if strict:
            return f"FAILED (--strict): {data['warning_count']:,} warnings"
        return f"OK with {data['warning_count']:,} warnings"
    return "OK: no problems found"


def render_plain(data: dict[str, Any], strict: bool = False) -> str:
    """The report as plain text (what a pipe or a log file gets)."""
    out: list[str] = []
    for file in data["files"]:
        out.append(
            f"{file['path']} ({file['role']}): {file['lines']:,} lines, {file['rows']:,} valid "
            f"rows, {file['rows_with_errors']:,} rows with errors"
        )
        if file["errors"]:
            out.append("  errors:")
            out.extend("    " + line for line in _issue_lines(file["errors"]))
        if file["warnings"]:
            out.append("  warnings:")
            out.extend("    " + line for line in _issue_lines(file["warnings"]))
        out.append("  statistics:")
        out.extend(f"    {name}: {value}" for name, value in _statistics_lines(file["statistics"]))
    out.extend(f"note: {note}" for note in data["notes"])
    out.append(_verdict(data, strict))
    return "\n".join(out) + "\n"


def _render_rich(data: dict[str, Any], strict: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    for file in data["files"]:
        console.rule(f"[bold]{escape(file['path'])}[/] ({file['role']})")
        console.print(
            f"{file['lines']:,} lines, [bold]{file['rows']:,}[/] valid rows, "
            f"[{'red' if file['rows_with_errors'] else 'green'}]"
            f"{file['rows_with_errors']:,} rows with errors[/]"
        )
        if file["errors"] or file["warnings"]:
            table = Table(show_header=True, header_style="bold", expand=False)
            table.add_column("")
            table.add_column("kind")
            table.add_column("rows", justify="right")
            table.add_column("samples", overflow="fold")
            for severity, style, issues in (
                ("error", "red", file["errors"]),
                ("warning", "yellow", file["warnings"]),
            ):
                for kind, issue in issues.items():
                    shown = [
                        (f"line {s['line']}: " if s["line"] is not None else "")
                        + escape(s["message"])
                        for s in issue["samples"]
                    ]
                    if issue["more"]:
                        shown.append(f"[dim]... and {issue['more']:,} more[/]")
                    table.add_row(
                        f"[{style}]{severity}[/]", kind, f"{issue['count']:,}", "\n".join(shown)
                    )
            console.print(table)
        stats = Table(show_header=False, box=None, padding=(0, 2))
        stats.add_column(style="dim")
        stats.add_column()
        for name, value in _statistics_lines(file["statistics"]):
            stats.add_row(name, escape(value))
        console.print(stats)
    for note in data["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
    verdict = _verdict(data, strict)
    style = "green" if verdict.startswith("OK") else "bold red"
    console.print(f"[{style}]{verdict}[/]")
