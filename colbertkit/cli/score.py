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

from colbertkit.cli._common import ComputeDType, handle_errors, progress_bar, stderr_console
from colbertkit.errors import UsageError


class OutputFormat(str, enum.Enum):
    auto = "auto"
    table = "table"
    tsv = "tsv"
    jsonl = "jsonl"
    trec = "trec"


@handle_errors
def score_command(
    checkpoint: str = typer.Argument(
        ..., help="Checkpoint directory (colbertkit or reference layout), packaged model or hub id."
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
        help="auto: a table on a terminal, TSV otherwise. trec needs ids and ranks.",
    ),
    rank: bool = typer.Option(
        False, "--rank", help="Sort each query's passages by score (needs ids)."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", min=1, help="With --rank: keep the best K per query."
    ),
    batch_size: int = typer.Option(
        32, "--batch-size", "-b", min=1, help="Texts per encoder batch."
    ),
    query_max_len: int | None = typer.Option(
        None, "--query-max-len", min=2, help="Default: the checkpoint's metadata, else 128."
    ),
    passage_max_len: int | None = typer.Option(
        None, "--passage-max-len", min=2, help="Default: the checkpoint's metadata, else 512."
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps."
    ),
    dtype: ComputeDType = typer.Option(
        ComputeDType.fp32,
        "--dtype",
        help="Encoder precision: fp32 (exact), bf16, fp16 (GPU), or auto: bf16 where the "
        "hardware has it (CUDA, AMX / AVX512-BF16 CPUs), fp16 on older GPUs, else fp32.",
    ),
    pad_floor: bool = typer.Option(
        False,
        "--pad-floor",
        help="Reproduce the reference: zero padding vectors join the max (scores floored at 0).",
    ),
    colbert_dim: int | None = typer.Option(
        None,
        "--colbert-dim",
        min=1,
        help="Check the head's size; with --fresh-head, size it (default 128).",
    ),
    fresh_head: bool = typer.Option(
        False, "--fresh-head", help="Attach a new, seeded head (for an encoder without one)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of --fresh-head."),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Allow the checkpoint's own Python code (off by default).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    window: int = typer.Option(
        4096,
        "--window",
        min=1,
        help="Pairs whose distinct texts are encoded together (the unit split across processes).",
    ),
    num_processes: int = typer.Option(
        1, "--num-processes", min=1, help="Processes per machine (GPUs, or CPU processes)."
    ),
    num_machines: int = typer.Option(1, "--num-machines", min=1, help="Machines scoring."),
    machine_rank: int = typer.Option(0, "--machine-rank", min=0, help="This machine (0 writes)."),
    main_process_ip: str | None = typer.Option(
        None, "--main-process-ip", help="Address of machine 0 (with --num-machines > 1)."
    ),
    main_process_port: int | None = typer.Option(
        None, "--main-process-port", help="Default: a free port; 29500 across machines."
    ),
) -> None:
    """Print the MaxSim score of each query/passage pair, in input order (or ranked)."""
    from colbertkit.distributed_scoring import LaunchSettings
    from colbertkit.errors import validate_options
    from colbertkit.pairs import open_pairs
    from colbertkit.precision import resolve_dtype
    from colbertkit.scorer import open_scoring, pick_device

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
    try:
        if rank and not source.has_ids:
            raise UsageError(
                f"{source.name}: ranking needs ids; write qid<TAB>query<TAB>pid<TAB>passage lines"
            )
        console = stderr_console()
        log = None if quiet else (lambda line: console.print(f"[dim]{line}[/]", highlight=False))
        with (
            open_scoring(
                checkpoint,
                source,
                launch=launch,
                batch_size=batch_size,
                query_max_len=query_max_len,
                passage_max_len=passage_max_len,
                device=device,
                dtype=dtype.value,
                pad_floor=pad_floor,
                quiet=quiet,
                log=log,
                colbert_dim=colbert_dim,
                fresh_head=fresh_head,
                seed=seed,
                trust_remote_code=trust_remote_code,
            ) as scores,
            _open_output(output) if scores is not None else _nothing() as out,
        ):
            if scores is None:
                if log is not None:
                    log(f"machine {machine_rank}: its share is scored; machine 0 writes the output")
                return
            with progress_bar("scoring", source.count, enabled=progress and not quiet) as advance:
                scored = zip(source.pairs(), scores(advance), strict=True)
                if fmt == OutputFormat.table:
                    results = list(scored)  # a table is for a terminal: small inputs
                elif rank:
                    # Ranking needs every score first; keep ids and scores, not texts.
                    qids_and_scores = [(pair.qid, score) for pair, score in scored]
                else:
                    for pair, score in scored:  # streamed: memory stays bounded
                        out.write(_format_line(pair, score, fmt))
                    return
            if fmt == OutputFormat.table:
                _print_table(results, rank, top_k, out)
            else:
                _write_ranked(source, qids_and_scores, top_k, fmt, out)
    finally:
        source.close()


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


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


def _resolve_format(requested: OutputFormat, output: Path | None) -> OutputFormat:
    if requested != OutputFormat.auto:
        return requested
    if output is None and sys.stdout.isatty():
        return OutputFormat.table
    return OutputFormat.tsv


def _format_line(pair, score: float, fmt: OutputFormat, rank: int | None = None) -> str:
    if fmt == OutputFormat.jsonl:
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


def _write_ranked(source, qids_and_scores, top_k, fmt, out: IO[str]) -> None:
    """Write the kept pairs best first; their texts are read again from the checked input."""
    from colbertkit.scorer import rank_by_query

    scores = [score for _, score in qids_and_scores]
    order = rank_by_query([qid for qid, _ in qids_and_scores], scores, top_k)
    kept = {index for index, _ in order}
    pairs = {index: pair for index, pair in enumerate(source.pairs()) if index in kept}
    for index, position in order:
        out.write(_format_line(pairs[index], scores[index], fmt, position))


def _print_table(rows, rank: bool, top_k: int | None, out: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from colbertkit.scorer import rank_by_query

    pairs = [pair for pair, _ in rows]
    scores = [score for _, score in rows]
    has_ids = pairs[0].qid is not None
    if rank:
        order = rank_by_query([p.qid for p in pairs], scores, top_k)
    else:
        order = [(i, None) for i in range(len(pairs))]
    table = Table(show_lines=False)
    if has_ids:
        table.add_column("qid")
    table.add_column("query", overflow="fold", max_width=40)
    if has_ids:
        table.add_column("pid")
    table.add_column("passage", overflow="ellipsis", no_wrap=True, max_width=60)
    if rank:
        table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    for index, position in order:
        pair = pairs[index]
        cells = (
            [pair.qid, pair.query, pair.pid, pair.passage]
            if has_ids
            else [pair.query, pair.passage]
        )
        if rank:
            cells.append(str(position))
        cells.append(f"{scores[index]:.4f}")
        table.add_row(*cells)
    Console(file=out).print(table)
