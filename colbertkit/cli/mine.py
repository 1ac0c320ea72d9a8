"""``colbertkit mine QUERIES CORPUS OUT``: hard negatives from BM25 (and a model), as training rows.

The work is :func:`colbertkit.mining.mine_negatives`; this module parses options and renders
the summary (stderr) or the report as JSON (stdout, ``--format json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

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
from colbertkit.progress import ProgressBar

LANGUAGE_HELP = (
    "auto (CJK if 30%+ of the corpus's first passages are CJK, else en), en, de, fr, es, pt, "
    "it, nl, ru, sv, no, da, tr (stop words + Snowball stemming), zh / ja / ko / cjk, none."
)


@handle_errors
def mine_command(
    queries: Path = typer.Argument(
        ...,
        help='Query rows, one JSON object a line: {"query": ..., "pos": [...]} (a neg list is '
        "replaced; other keys are kept).",
        dir_okay=False,
    ),
    corpus: Path = typer.Argument(
        ...,
        help="Passages: jsonl (text; title, id or _id optional), TSV (id<TAB>text) or plain "
        "text (one passage a line).",
        dir_okay=False,
    ),
    out: Path = typer.Argument(..., help="Training jsonl to write (atomically).", dir_okay=False),
    neg_nums: int = typer.Option(15, "--neg-nums", "-n", min=1, help="Negatives per row."),
    rank_range: str = typer.Option(
        "10:100",
        "--range",
        help="Rank window START:END, e.g. 10:100 = skip the best 10, keep ranks 11 to 100.",
    ),
    language: str = typer.Option("auto", "--language", help=LANGUAGE_HELP),
    corpus_format: str = typer.Option(
        "auto", "--corpus-format", help="auto (by suffix, then content), jsonl, tsv or text."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="ColBERT checkpoint that reranks the best --rerank-top BM25 passages.",
    ),
    rerank_top: int = typer.Option(
        100, "--rerank-top", min=1, help="With --model: BM25 passages reranked per query."
    ),
    max_relative: float | None = typer.Option(
        None,
        "--max-relative",
        help="With --model: drop candidates scoring above this x the lowest positive score "
        "(likely false negatives; default 0.95; inf: keep them).",
    ),
    teacher: str | None = typer.Option(
        None,
        "--teacher",
        help="ColBERT checkpoint or cross-encoder (sequence-classification) directory: writes "
        "pos_scores / neg_scores for distillation.",
    ),
    fresh_head: bool = typer.Option(
        False, "--fresh-head", help="--model has no head: attach a new, seeded one."
    ),
    encode_batch_size: int = encode_batch_size_option(),
    device: str = device_option(),
    dtype: ComputeDType = dtype_option(),
    query_max_len: int | None = max_len_option("query"),
    passage_max_len: int | None = max_len_option("passage"),
    trust_remote_code: bool = trust_remote_code_option(),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling (and of --fresh-head)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (on success)."),
    report_format: ReportFormat = report_format_option("the summary (text on stderr)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Mine hard negatives for each query from a corpus: BM25, optionally reranked by a model.

    Examples:

      colbertkit mine queries.jsonl corpus.jsonl mined.jsonl

      colbertkit mine queries.jsonl corpus.jsonl mined.jsonl --model runs/demo --rerank-top 50

      colbertkit mine queries.jsonl corpus.jsonl distill.jsonl --teacher cross-encoder/
    """
    from rich.markup import escape

    from colbertkit.mining import mine_negatives

    console = stderr_console()

    def log(line: str) -> None:
        if not quiet:
            console.print(f"[dim]{escape(line)}[/]", highlight=False, markup=True)

    with _StageBars(enabled=progress and not quiet) as advance:
        report = mine_negatives(
            queries,
            corpus,
            out,
            neg_nums=neg_nums,
            rank_range=rank_range,
            language=language,
            corpus_format=corpus_format,
            model=model,
            rerank_top=rerank_top,
            max_relative=max_relative,
            teacher=teacher,
            fresh_head=fresh_head,
            batch_size=encode_batch_size,
            device=device,
            dtype=dtype.value,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            trust_remote_code=trust_remote_code,
            seed=seed,
            force=force,
            progress=advance,
            log=log,
        )
    if report_format == ReportFormat.json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        for line in summary_lines(report):
            console.print(escape(line), highlight=False)


def summary_lines(report) -> list[str]:
    """The text summary of a :class:`~colbertkit.mining.MiningReport`."""
    settings = report.settings
    start, end = settings["range"]
    per_row = report.negatives_per_row
    lines = [
        f"wrote {report.rows_written:,} rows to {report.out} "
        f"({report.negatives_written:,} negatives; per row min {per_row['min']}, "
        f"mean {per_row['mean']}, max {per_row['max']})",
        f"queries: {report.queries:,}; {report.rows_with_fewer:,} rows with fewer than "
        f"{settings['neg_nums']} negatives, {report.rows_without_negatives:,} without any "
        "(not written)",
    ]
    if report.rows_with_replaced_negatives:
        lines.append(
            f"replaced the given negatives of {report.rows_with_replaced_negatives:,} rows"
        )
    removed = report.removed
    ranked_by = "model" if settings["model"] else "BM25"
    filters = (
        f"{removed['positive']:,} positives, {removed['near_duplicate']:,} near-duplicates "
        f"of a positive, {removed['duplicate']:,} repeated texts"
    )
    if settings["max_relative"] is not None:
        filters += (
            f", {removed['false_negative']:,} likely false negatives (score > "
            f"{settings['max_relative']} x positive)"
        )
    lines += [
        f"candidates at {ranked_by} ranks {start + 1}-{end}: {report.candidates:,}; "
        f"removed {filters}",
        f"corpus: {report.corpus_passages:,} passages ({report.language}, "
        f"{report.vocabulary:,} terms, index {report.index_bytes / 1e6:.1f} MB); "
        f"{report.positives_in_corpus:,} of {report.positives:,} positives found in it",
        f"indexed in {report.index_seconds:.1f} s "
        f"({_rate(report.passages_per_second)} passages/s), mined in {report.mine_seconds:.1f} s "
        f"({_rate(report.queries_per_second)} queries/s)",
    ]
    if report.short_rankings:
        lines.append(
            f"{report.short_rankings:,} queries matched fewer than {end} passages (BM25 "
            "retrieves only passages sharing a word with the query)"
        )
    if report.corpus_skipped_empty:
        lines.append(f"skipped {report.corpus_skipped_empty:,} corpus passages with no text")
    return lines


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.2f}"


class _StageBars:
    """One progress bar per stage of the work (indexing, then mining); terminals only."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: ProgressBar | None = None

    def __enter__(self):
        return self.advance

    def advance(self, stage: str, done: int, total: int | None) -> None:
        if stage != self.stage:
            self.__exit__()
            label = "indexing the corpus" if stage == "index" else "mining"
            self.stage, self.bar = stage, ProgressBar(label, total, enabled=self.enabled)
        self.bar.advance(done)

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.close()
