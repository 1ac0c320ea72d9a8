"""``colbertkit score CKPT PAIRS``: MaxSim scores for query/passage pairs."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import typer
from rich.markup import escape

from colbertkit import defaults
from colbertkit.cli._common import (
    ComputeDType,
    debug_option,
    device_option,
    dtype_option,
    encode_batch_size_option,
    handle_errors,
    max_len_option,
    quiet_option,
    stderr_console,
    trust_remote_code_option,
)
from colbertkit.errors import UsageError
from colbertkit.progress import progress_bar


class OutputFormat(str, enum.Enum):
    auto = "auto"
    table = "table"
    tsv = "tsv"
    json = "json"
    jsonl = "jsonl"  # the same as json: one object a line
    trec = "trec"


# Below this width a table cannot show the texts: TSV instead.
MIN_TABLE_WIDTH = 60


@handle_errors
def score_command(
    checkpoint: str = typer.Argument(
        ...,
        help="A run directory, best/, checkpoints/step-N, a colbertkit or reference / BGE-M3 "
        "model directory, a packaged model or a hub id.",
    ),
    pairs: str = typer.Argument(
        ..., help="TSV of query<TAB>passage or qid<TAB>query<TAB>pid<TAB>passage; '-' for stdin."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here (atomically) instead of stdout.", dir_okay=False
    ),
    output_format: OutputFormat = typer.Option(
        OutputFormat.auto,
        "--format",
        "-f",
        help="auto: a table on a terminal, TSV otherwise; json: one object a line (jsonl is "
        "the same); trec: a ranked run file (needs ids).",
    ),
    rank: bool = typer.Option(
        False, "--rank", help="Sort each query's passages by score (needs ids)."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", min=1, metavar="K", help="With --rank: keep the best K per query."
    ),
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
        help="Check the head's size; with --fresh-head, size it "
        f"(default {defaults.FRESH_COLBERT_DIM}).",
    ),
    fresh_head: bool = typer.Option(
        False, "--fresh-head", help="Attach a new, seeded head (for an encoder without one)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of --fresh-head."),
    trust_remote_code: bool = trust_remote_code_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    window: int = typer.Option(
        defaults.SCORE_WINDOW,
        "--window",
        min=1,
        metavar="N",
        help="Pairs whose distinct texts are encoded together (the unit split across processes).",
    ),
    num_processes: int = typer.Option(
        1, "--num-processes", min=1, metavar="N", help="Processes per machine (GPUs, or CPU ones)."
    ),
    num_machines: int = typer.Option(
        1, "--num-machines", min=1, metavar="N", help="Machines scoring."
    ),
    machine_rank: int = typer.Option(
        0, "--machine-rank", min=0, metavar="N", help="This machine (0 writes)."
    ),
    main_process_ip: str | None = typer.Option(
        None, "--main-process-ip", metavar="ADDRESS", help="Machine 0 (with --num-machines > 1)."
    ),
    main_process_port: int | None = typer.Option(
        None,
        "--main-process-port",
        metavar="PORT",
        help="Default: a free port; 29500 across machines.",
    ),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Print the MaxSim score of each query/passage pair, in input order (or ranked).

    Examples:

      colbertkit score runs/demo example_data/queries.tsv --rank

      colbertkit score runs/demo pairs.tsv --output scores.tsv

      colbertkit score runs/demo run.tsv --format trec --top-k 10 > run.trec

      colbertkit score runs/demo pairs.tsv --dtype auto --num-processes 2 -o scores.tsv
    """
    from colbertkit.distributed_scoring import LaunchSettings
    from colbertkit.errors import validate_options
    from colbertkit.pairs import open_pairs
    from colbertkit.precision import resolve_dtype
    from colbertkit.scorer import open_scoring, pick_device, rank_scored_pairs

    fmt = _resolve_format(output_format, output)
    rank = rank or fmt == OutputFormat.trec  # a run file is ranked by definition
    if top_k is not None and not rank:
        raise UsageError("--top-k needs --rank")
    if output is not None and not output.parent.is_dir():
        raise UsageError(f"--output {output}: directory {output.parent} does not exist")
    launch = validate_options(
        LaunchSettings,
        num_processes=num_processes,
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=main_process_ip,
        main_process_port=main_process_port,
        device=device,
    )
    resolve_dtype(dtype.value, pick_device(device))  # fp16 on a CPU stops here, not in workers
    source = open_pairs(pairs)  # checks every line before any model is loaded
    console = stderr_console()

    def note(line: str) -> None:
        if not quiet:
            console.print(f"[dim]{escape(line)}[/]", highlight=False)

    try:
        if rank and not source.has_ids:
            raise UsageError(
                f"{source.name}: ranking needs ids; write qid<TAB>query<TAB>pid<TAB>passage lines"
            )
        with (
            open_scoring(
                checkpoint,
                source,
                launch=launch,
                batch_size=encode_batch_size,
                query_max_len=query_max_len,
                passage_max_len=passage_max_len,
                device=device,
                dtype=dtype.value,
                pad_floor=pad_floor,
                window=window,
                quiet=quiet,
                log=None if quiet else note,
                colbert_dim=colbert_dim,
                fresh_head=fresh_head,
                seed=seed,
                trust_remote_code=trust_remote_code,
            ) as scores,
            _open_output(output) if scores is not None else _nothing() as out,
        ):
            if scores is None:
                note(f"machine {machine_rank}: its share is scored; machine 0 writes the output")
                return
            bar = progress_bar("scoring", source.count, enabled=progress and not quiet)
            with bar as advance:
                scored = zip(source.pairs(), scores(advance), strict=True)
                if rank:
                    rows = rank_scored_pairs(source, scored, top_k, note=note)
                else:
                    rows = ((pair, None, score) for pair, score in scored)
                if fmt == OutputFormat.table:
                    rows = list(rows)  # a table is for a terminal: small inputs
                else:
                    for pair, position, score in rows:  # streamed: memory stays bounded
                        out.write(_format_line(pair, score, fmt, position))
            if fmt == OutputFormat.table:
                _print_table(rows, has_ids=source.has_ids, ranked=rank, out=out)
    finally:
        source.close()


@contextmanager
def _open_output(path: Path | None) -> Iterator[IO[str]]:
    """stdout, or ``path`` written atomically (renamed into place only on success)."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    from colbertkit.checkpoint.files import atomic_file

    with atomic_file(path) as handle:
        yield handle


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _resolve_format(requested: OutputFormat, output: Path | None) -> OutputFormat:
    if requested != OutputFormat.auto:
        return requested
    if output is None and sys.stdout.isatty():
        return OutputFormat.table
    return OutputFormat.tsv


def _format_line(pair, score: float, fmt: OutputFormat, rank: int | None = None) -> str:
    if fmt in (OutputFormat.json, OutputFormat.jsonl):
        record = {"line": pair.line}
        if pair.qid is not None:
            record["qid"] = pair.qid
        record["query"] = pair.query
        if pair.pid is not None:
            record["pid"] = pair.pid
        record["passage"] = pair.passage
        if rank is not None:
            record["rank"] = rank
        record["score"] = score
        return json.dumps(record, ensure_ascii=False) + "\n"
    if fmt == OutputFormat.trec:
        return f"{pair.qid} Q0 {pair.pid} {rank} {score:.6f} colbertkit\n"
    columns = (
        [pair.qid, pair.query, pair.pid, pair.passage]
        if pair.qid is not None
        else [pair.query, pair.passage]
    )
    if rank is not None:
        columns.append(str(rank))
    columns.append(f"{score:.6f}")
    return "\t".join(columns) + "\n"


def _print_table(rows, *, has_ids: bool, ranked: bool, out: IO[str]) -> None:
    """A table that fits the terminal: ids, rank and score keep their width; the texts shrink
    and end in an ellipsis. Too narrow for the texts: TSV instead."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out)
    fixed = []  # (header, cells) of the columns that never shrink
    if has_ids:
        fixed += [("qid", [p.qid for p, _, _ in rows]), ("pid", [p.pid for p, _, _ in rows])]
    if ranked:
        fixed.append(("rank", [str(r) for _, r, _ in rows]))
    fixed.append(("score", [f"{s:.4f}" for _, _, s in rows]))
    widths = {name: max(len(name), *(len(c) for c in cells)) for name, cells in fixed}
    # Each column takes its width + 2 padding + 1 border, plus the table's outer border.
    texts_room = console.width - sum(w + 3 for w in widths.values()) - 2 * 3 - 1
    if console.width < MIN_TABLE_WIDTH or texts_room < 2 * 8:
        for pair, position, score in rows:
            out.write(_format_line(pair, score, OutputFormat.tsv, position))
        return
    table = Table(show_lines=False, expand=False)

    def fixed_column(name: str, **options) -> None:
        table.add_column(name, no_wrap=True, width=widths[name], **options)

    # The texts share what is left: a third for the query, the rest for the passage.
    query_width = min(max(len("query"), *(len(p.query) for p, _, _ in rows)), texts_room // 3)
    passage_width = texts_room - query_width
    text = {"no_wrap": True, "overflow": "ellipsis"}
    if has_ids:
        fixed_column("qid")
    table.add_column("query", max_width=query_width, **text)
    if has_ids:
        fixed_column("pid")
    table.add_column("passage", max_width=passage_width, **text)
    if ranked:
        fixed_column("rank", justify="right")
    fixed_column("score", justify="right")
    for pair, position, score in rows:
        cells = [pair.query, pair.passage]
        if has_ids:
            cells = [pair.qid, pair.query, pair.pid, pair.passage]
        if ranked:
            cells.append(str(position))
        cells.append(f"{score:.4f}")
        table.add_row(*cells)
    console.print(table)
