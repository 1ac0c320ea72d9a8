"""``colbertkit evaluate``: NDCG@10, MRR@10, Recall@k and MAP, optionally against a baseline.

The work is :func:`colbertkit.evaluation.evaluate` (which also checks how the arguments fit
together); this module parses the flags and renders the report: rich on a terminal, plain text
when piped, JSON with ``--format json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from colbertkit import defaults
from colbertkit.cli._common import (
    ComputeDType,
    ReportFormat,
    debug_option,
    device_option,
    dtype_option,
    encode_batch_size_option,
    handle_errors,
    max_len_option,
    quiet_option,
    report_format_option,
    stderr_console,
    trust_remote_code_option,
)
from colbertkit.errors import UsageError
from colbertkit.progress import progress_bar


@handle_errors
def evaluate_command(
    checkpoint: str | None = typer.Argument(
        None,
        help="The checkpoint to evaluate: a run directory, best/, checkpoints/step-N, a model "
        "directory, a packaged model or a hub id (as for score); leave out with --scores.",
        metavar="CKPT",
        show_default=False,
    ),
    data: str | None = typer.Argument(
        None,
        help="Eval rows in the training format (jsonl: each row's pos + neg are ranked), or a "
        "pairs TSV qid<TAB>query<TAB>pid<TAB>passage judged by --qrels ('-': stdin).",
        metavar="DATA",
        show_default=False,
    ),
    qrels: Path | None = typer.Option(
        None,
        "--qrels",
        help="TREC / BEIR judgements: qid<TAB>pid<TAB>grade or 'qid 0 pid grade'.",
        dir_okay=False,
    ),
    scores: Path | None = typer.Option(
        None,
        "--scores",
        help="Evaluate scores made elsewhere instead of a model (needs --qrels): qid<TAB>pid<TAB>"
        "score, `colbertkit score` output for 4-column pairs, or a TREC run.",
        dir_okay=False,
    ),
    baseline: str | None = typer.Option(
        None, "--baseline", help="A second checkpoint, scored on the same DATA and compared."
    ),
    baseline_scores: Path | None = typer.Option(
        None,
        "--baseline-scores",
        help="A scores file to compare with (needs --qrels).",
        dir_okay=False,
    ),
    recall_at: list[int] = typer.Option(
        [5, 10], "--recall-at", min=1, help="k of Recall@k; repeat for several (default 5, 10)."
    ),
    report_format: ReportFormat = report_format_option("the metrics"),
    per_query: Path | None = typer.Option(
        None,
        "--per-query",
        help="Write each query's metrics to this TSV (atomically).",
        dir_okay=False,
    ),
    bootstrap_samples: int = typer.Option(
        1000, "--bootstrap-samples", min=1, help="Resamples of the paired bootstrap."
    ),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="Seed of the bootstrap."),
    encode_batch_size: int = encode_batch_size_option(),
    query_max_len: int | None = max_len_option("query"),
    passage_max_len: int | None = max_len_option("passage"),
    device: str = device_option(),
    dtype: ComputeDType = dtype_option(),
    pad_floor: bool = typer.Option(
        False,
        "--pad-floor",
        help="Reproduce the reference: zero padding vectors join the max (scores floored at 0).",
    ),
    colbert_dim: int | None = typer.Option(
        None,
        "--colbert-dim",
        min=1,
        help="Check CKPT's head size; with --fresh-head, size it "
        f"(default {defaults.FRESH_COLBERT_DIM}).",
    ),
    fresh_head: bool = typer.Option(
        False, "--fresh-head", help="Attach a new, seeded head to CKPT (an encoder without one)."
    ),
    baseline_fresh_head: bool = typer.Option(
        False, "--baseline-fresh-head", help="The same for --baseline."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the fresh heads."),
    trust_remote_code: bool = trust_remote_code_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Rank eval rows or a judged run: NDCG@10, MRR@10, Recall@k, MAP; paired vs a baseline.

    Examples:

      colbertkit evaluate runs/demo example_data/eval.jsonl

      colbertkit evaluate runs/demo pairs.tsv --qrels qrels.tsv --baseline-scores bm25.trec

      colbertkit evaluate --scores bm25.trec --qrels qrels.tsv --format json
    """
    from colbertkit.evaluation import ModelOptions, evaluate

    # How the arguments fit together is checked by evaluate(), whose messages name its
    # parameters; the error boundary writes them as this command's flags.
    if per_query is not None and not per_query.parent.is_dir():
        raise UsageError(f"--per-query {per_query}: directory {per_query.parent} does not exist")
    shared = {
        "encode_batch_size": encode_batch_size,
        "query_max_len": query_max_len,
        "passage_max_len": passage_max_len,
        "device": device,
        "dtype": dtype.value,
        "pad_floor": pad_floor,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
    }
    options = ModelOptions(**shared, fresh_head=fresh_head, colbert_dim=colbert_dim)
    baseline_options = ModelOptions(
        **shared,
        fresh_head=baseline_fresh_head,
        colbert_dim=colbert_dim if baseline_fresh_head else None,
    )
    console = stderr_console()

    def log(line: str) -> None:
        if not quiet:
            console.print(line, style="dim", markup=False, highlight=False)

    def bar(description: str, total: int):
        return progress_bar(description, total, enabled=progress and not quiet)

    report = evaluate(
        checkpoint,
        data,
        qrels=qrels,
        scores=scores,
        baseline=baseline,
        baseline_scores=baseline_scores,
        options=options,
        baseline_options=baseline_options,
        recall_at=recall_at,
        bootstrap_samples=bootstrap_samples,
        bootstrap_seed=bootstrap_seed,
        progress=bar,
        log=log,
    )
    if per_query is not None:
        report.write_per_query(per_query)
        log(f"per-query metrics written to {per_query}")
    content = report.to_dict()
    if report_format == ReportFormat.json:
        sys.stdout.write(json.dumps(content, indent=2) + "\n")
    elif sys.stdout.isatty():
        _render_rich(content)
    else:
        sys.stdout.write(render_plain(content))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Rendering (from the JSON-shaped dict, so every format shows the same facts)
# --------------------------------------------------------------------------------------------


def _system_line(role: str, system: dict[str, Any]) -> str:
    if system["kind"] == "checkpoint":
        how = f"{system['pairs_scored']:,} pairs scored in {system['scoring_seconds']:.1f} s"
    else:
        how = f"{system['pairs_scored']:,} scores read"
    return f"{role}: {system['name']} ({how})"


def _queries_line(content: dict[str, Any]) -> str:
    if content["qrels"] is not None:
        source = f"judged by {content['qrels']}"
    else:
        source = f"eval rows of {content['data']}"
    line = f"queries: {content['queries']:,} counted ({source})"
    for role in ("system", "baseline"):
        system = content[role]
        if system is not None and system["missing"]:
            line += f"; {len(system['missing']):,} not in the {role}'s run count 0"
    left_out = len(content["system"]["no_relevant"])
    if left_out:
        line += f"; {left_out:,} without a relevant passage left out"
    return line


def _notes(content: dict[str, Any]) -> list[str]:
    notes = list(content["notes"])
    for role in ("system", "baseline"):
        system = content[role]
        if system is not None:
            prefix = f"{role}: " if content["baseline"] is not None else ""
            notes.extend(prefix + note for note in system["notes"])
    return notes


def _interval(diff: dict[str, Any]) -> str:
    return f"[{diff['low']:+.4f}, {diff['high']:+.4f}]" + ("*" if diff["excludes_zero"] else "")


def _rows(content: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the metrics table."""
    means = content["system"]["means"]
    comparison = content["comparison"]
    if comparison is None:
        return ["metric", "value"], [[name, f"{means[name]:.4f}"] for name in content["metrics"]]
    header = ["metric", "system", "baseline", "difference", "95% interval", "won", "lost", "tied"]
    rows = []
    for name in content["metrics"]:
        diff = comparison[name]
        rows.append(
            [
                name,
                f"{diff['system']:.4f}",
                f"{diff['baseline']:.4f}",
                f"{diff['difference']:+.4f}",
                _interval(diff),
                str(diff["won"]),
                str(diff["lost"]),
                str(diff["tied"]),
            ]
        )
    return header, rows


def _legend(content: dict[str, Any]) -> str | None:
    if content["comparison"] is None:
        return None
    any_diff = next(iter(content["comparison"].values()))
    return (
        f"difference = system - baseline, averaged over the same queries; * the "
        f"{any_diff['confidence']:.0%} interval (paired bootstrap, {any_diff['samples']:,} "
        f"resamples, seed {any_diff['seed']}) excludes 0"
    )


def render_plain(content: dict[str, Any]) -> str:
    """The report as plain text (what a pipe or a log file gets)."""
    out = [_system_line("system", content["system"])]
    if content["baseline"] is not None:
        out.append(_system_line("baseline", content["baseline"]))
    out.append(_queries_line(content))
    header, rows = _rows(content)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        out.append("  ".join(cells).rstrip())
    legend = _legend(content)
    if legend:
        out.append(legend)
    out.extend(f"note: {note}" for note in _notes(content))
    return "\n".join(out) + "\n"


def _render_rich(content: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    console.print(escape(_system_line("system", content["system"])))
    if content["baseline"] is not None:
        console.print(escape(_system_line("baseline", content["baseline"])))
    console.print(escape(_queries_line(content)))
    header, rows = _rows(content)
    table = Table(
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        styled = list(row)
        if content["comparison"] is not None:
            diff = content["comparison"][row[0]]
            style = (
                ("green" if diff["difference"] > 0 else "red") if diff["excludes_zero"] else "dim"
            )
            styled[3] = f"[{style}]{row[3]}[/]"
            styled[4] = f"[{style}]{escape(row[4])}[/]"
        table.add_row(*styled)
    console.print(table)
    legend = _legend(content)
    if legend:
        console.print(f"[dim]{escape(legend)}[/]")
    for note in _notes(content):
        console.print(f"[dim]note: {escape(note)}[/]")
