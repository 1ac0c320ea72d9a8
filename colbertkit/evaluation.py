"""Evaluate a ranker: NDCG@10, MRR@10, Recall@k and MAP, optionally against a baseline.

One entry point, :func:`evaluate`, for the two worlds users come from:

* **Reranking rows** (the training format, the rows the trainer's evaluator reads): each row's
  ``pos + neg`` are ranked by the checkpoint; ``pos`` are relevant (grade 1), ``neg`` are not.
  Rows are named by their line number. A row without negatives has nothing to rank its
  positives against (it would score 1 whatever the model does): it is skipped and counted.
* **Retrieval runs**: a pairs TSV with ids (``qid query pid passage``) scored by the checkpoint,
  or a scores file made elsewhere (:mod:`colbertkit.runs`), judged by TREC / BEIR qrels.

The metrics are :mod:`colbertkit.metrics`, the trainer's. With qrels, which queries count:

* a query of the qrels with at least one relevant passage counts. If the run does not hold it,
  it counts 0 on every metric (trec_eval's ``-c``), and the report says how many did;
* a query of the run whose qrels judge no passage relevant is left out of the means (it could
  only score 0) and listed; a query of the run that the qrels do not know at all is an error,
  since it almost always means the two files do not belong together.

A baseline (a second checkpoint or scores file) is evaluated on the same queries and compared
per metric: mean of the per-query differences, a seeded percentile bootstrap interval, and the
queries won / lost / tied (:func:`colbertkit.metrics.paired_bootstrap`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from colbertkit import defaults
from colbertkit.checkpoint.files import atomic_write_text
from colbertkit.errors import InputError, UsageError, validate_options
from colbertkit.metrics import (
    PairedDifference,
    metric_names,
    paired_bootstrap,
    ranking_metrics,
)
from colbertkit.precision import ComputeDTypeName
from colbertkit.runs import Qrels, Run

# Query status in a report.
RANKED = "ranked"  # in the run, with a relevant passage: counted
MISSING = "missing"  # in the qrels with a relevant passage, not in the run: counted as 0
NO_RELEVANT = "no_relevant"  # in the run, no passage judged relevant: left out

ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[int], None] | None]]


class ModelOptions(BaseModel):
    """How a checkpoint is loaded and run for scoring; the options of ``colbertkit score``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encode_batch_size: int = Field(defaults.ENCODE_BATCH_SIZE, ge=1, description="Texts a forward.")
    query_max_len: int | None = Field(None, ge=2, description="Default: the checkpoint's.")
    passage_max_len: int | None = Field(None, ge=2, description="Default: the checkpoint's.")
    device: str = "auto"
    dtype: ComputeDTypeName = "fp32"
    pad_floor: bool = False
    colbert_dim: int | None = Field(None, ge=1)
    fresh_head: bool = False
    seed: int = 0
    trust_remote_code: bool = False


@dataclass(frozen=True)
class QueryResult:
    """One query of one system."""

    qid: str
    status: str  # RANKED, MISSING or NO_RELEVANT
    candidates: int  # passages the system ranked for it
    relevant: int  # passages judged relevant
    metrics: dict[str, float]  # empty when the query is left out (NO_RELEVANT)


@dataclass
class SystemResult:
    """Per-query metrics and their means for one system (a checkpoint or a scores file)."""

    name: str
    kind: Literal["checkpoint", "scores"]
    queries: list[QueryResult]
    means: dict[str, float]
    pairs_scored: int = 0
    load_seconds: float | None = None
    scoring_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    loading: list[str] = field(default_factory=list)  # what loading the checkpoint reported

    def counted(self) -> list[QueryResult]:
        """The queries in the means, in order."""
        return [q for q in self.queries if q.status != NO_RELEVANT]

    def with_status(self, status: str) -> list[str]:
        return [q.qid for q in self.queries if q.status == status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "means": self.means,
            "queries": len(self.counted()),
            "missing": self.with_status(MISSING),
            "no_relevant": self.with_status(NO_RELEVANT),
            "pairs_scored": self.pairs_scored,
            "load_seconds": self.load_seconds,
            "scoring_seconds": self.scoring_seconds,
            "notes": self.notes,
            "loading": self.loading,
        }


@dataclass
class EvaluationReport:
    """What :func:`evaluate` found; ``to_dict()`` is the JSON the CLI prints."""

    metrics: list[str]  # metric names, in print order
    system: SystemResult
    baseline: SystemResult | None = None
    comparison: dict[str, PairedDifference] | None = None
    data: str | None = None
    qrels: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "qrels": self.qrels,
            "metrics": self.metrics,
            "queries": len(self.system.counted()),
            "system": self.system.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "comparison": (
                {name: diff.to_dict() for name, diff in self.comparison.items()}
                if self.comparison
                else None
            ),
            "notes": self.notes,
        }

    def write_per_query(self, path: str | os.PathLike[str]) -> None:
        """A TSV with one line per query: status, counts and each metric (atomically)."""
        names = self.metrics
        header = ["qid", "status", "candidates", "relevant", *names]
        baseline = {q.qid: q for q in self.baseline.queries} if self.baseline else None
        if baseline is not None:
            header += [f"baseline_{name}" for name in names]
        lines = ["\t".join(header)]
        for query in self.system.queries:
            cells = [query.qid, query.status, str(query.candidates), str(query.relevant)]
            cells += [_cell(query.metrics.get(name)) for name in names]
            if baseline is not None:
                other = baseline.get(query.qid)
                cells += [_cell(other.metrics.get(name) if other else None) for name in names]
            lines.append("\t".join(cells))
        if baseline is not None:  # queries only the baseline's run holds (all left out)
            own = {q.qid for q in self.system.queries}
            for query in self.baseline.queries:
                if query.qid not in own:
                    cells = [query.qid, query.status, "0", str(query.relevant)]
                    cells += [""] * len(names)
                    cells += [_cell(query.metrics.get(name)) for name in names]
                    lines.append("\t".join(cells))
        atomic_write_text(Path(path), "\n".join(lines) + "\n")


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


# --------------------------------------------------------------------------------------------
# Metrics of a run against judgements (pure: no files, no model)
# --------------------------------------------------------------------------------------------


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    recall_at: Sequence[int] = (5, 10),
    name: str = "run",
    kind: Literal["checkpoint", "scores"] = "scores",
) -> SystemResult:
    """Per-query metrics and means of ``run[qid][pid] = score`` judged by ``qrels[qid][pid]``.

    Passages the qrels do not judge are not relevant. See the module doc for which queries
    count; here a query of the run that the qrels do not know is left out like one without a
    relevant passage.
    """
    names = metric_names(recall_at)
    queries: list[QueryResult] = []
    tied_queries = 0
    for qid, judged in qrels.items():
        relevant = sum(1 for grade in judged.values() if grade > 0)
        if not relevant:
            continue
        ranked = run.get(qid)
        if ranked is None:
            queries.append(QueryResult(qid, MISSING, 0, relevant, dict.fromkeys(names, 0.0)))
            continue
        scores = list(ranked.values())
        grades = [judged.get(pid, 0) for pid in ranked]
        metrics = ranking_metrics(scores, grades, recall_at, all_grades=list(judged.values()))
        queries.append(QueryResult(qid, RANKED, len(scores), relevant, metrics))
        tied_queries += _has_deciding_tie(scores, grades)
    for qid, ranked in run.items():
        judged = qrels.get(qid, {})
        if not any(grade > 0 for grade in judged.values()):
            queries.append(QueryResult(qid, NO_RELEVANT, len(ranked), 0, {}))
    counted = [q for q in queries if q.status != NO_RELEVANT]
    means = {
        metric: (sum(q.metrics[metric] for q in counted) / len(counted) if counted else 0.0)
        for metric in names
    }
    result = SystemResult(name=name, kind=kind, queries=queries, means=means)
    missing = result.with_status(MISSING)
    left_out = result.with_status(NO_RELEVANT)
    if missing:
        result.notes.append(
            f"{_count(len(missing), 'query', 'queries')} with a relevant passage not in the run: "
            f"counted as 0 (e.g. {missing[0]})"
        )
    if left_out:
        result.notes.append(
            f"{_count(len(left_out), 'query', 'queries')} of the run without a relevant passage "
            f"in the judgements: left out of the means (e.g. {left_out[0]})"
        )
    if tied_queries:
        result.notes.append(
            f"{_count(tied_queries, 'query', 'queries')} with equal scores on passages of "
            "different relevance: ranked pessimistically (less relevant first)"
        )
    return result


def _count(number: int, one: str, many: str) -> str:
    return f"{number:,} {one if number == 1 else many}"


def _has_deciding_tie(scores: Sequence[float], grades: Sequence[int]) -> bool:
    grades_of_score: dict[float, int] = {}
    for score, grade in zip(scores, grades, strict=True):
        if grades_of_score.setdefault(score, grade) != grade:
            return True
    return False


def compare(
    system: SystemResult,
    baseline: SystemResult,
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, PairedDifference]:
    """Paired difference per metric over the queries both count (the same judgements)."""
    other = {q.qid: q for q in baseline.counted()}
    counted = system.counted()
    if len(counted) != len(other) or any(q.qid not in other for q in counted):
        raise ValueError("the system and the baseline were not judged on the same queries")
    return {
        name: paired_bootstrap(
            [q.metrics[name] for q in counted],
            [other[q.qid].metrics[name] for q in counted],
            samples=samples,
            seed=seed,
            confidence=confidence,
        )
        for name in system.means
    }


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


@dataclass
class _Candidates:
    """Judged (query, passage) texts to score, streamed again for each checkpoint."""

    judgements: dict[str, dict[str, int]]
    keys: list[tuple[str, str]]  # (qid, pid) of each pair, in file order
    texts: Callable[[], Iterator[tuple[str, str]]]  # (query, passage) of each pair, same order
    notes: list[str] = field(default_factory=list)
    close: Callable[[], None] = lambda: None


def evaluate(
    checkpoint: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    *,
    qrels: str | os.PathLike[str] | None = None,
    scores: str | os.PathLike[str] | None = None,
    baseline: str | os.PathLike[str] | None = None,
    baseline_scores: str | os.PathLike[str] | None = None,
    options: ModelOptions | Mapping[str, Any] | None = None,
    baseline_options: ModelOptions | Mapping[str, Any] | None = None,
    recall_at: Sequence[int] = (5, 10),
    bootstrap_samples: int = 1000,
    bootstrap_seed: int = 0,
    confidence: float = 0.95,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Evaluate ``checkpoint`` on ``data`` (or the ``scores`` file), optionally against a baseline.

    Args:
        checkpoint: a checkpoint to score ``data`` with (anything ``colbertkit score`` loads).
        data: eval rows in the training format (jsonl: each row's ``pos + neg`` are ranked), or
            a pairs TSV with ids (``qid<TAB>query<TAB>pid<TAB>passage``) judged by ``qrels``.
        qrels: TREC / BEIR judgements (:func:`colbertkit.runs.read_qrels`), for a pairs TSV or
            scores files.
        scores: a scores file made elsewhere, instead of ``checkpoint`` and ``data``
            (:func:`colbertkit.runs.read_run`); needs ``qrels``.
        baseline / baseline_scores: a second checkpoint (scores ``data``) or scores file,
            compared with the first on the same queries.
        options: how checkpoints are loaded and run (:class:`ModelOptions`).
        baseline_options: the same for ``baseline``; default ``options`` without ``fresh_head``
            and ``colbert_dim`` (those describe the first checkpoint's head).
        recall_at: the k of each Recall@k.
        bootstrap_samples, bootstrap_seed, confidence: the paired bootstrap.
        progress: ``progress(description, total)`` -> a context manager yielding
            ``advance(n)`` or None (the CLI's progress bar).
        log: called with each line worth showing while it runs (layout found, device, ...).

    Raises:
        UsageError: the arguments do not fit together, or a file is missing.
        InputError: a line of an input file is malformed (file, line and fix in the message).
    """
    say = log or (lambda _line: None)
    options = _model_options(options)
    if baseline_options is None:
        baseline_options = options.model_copy(update={"fresh_head": False, "colbert_dim": None})
    baseline_options = _model_options(baseline_options)
    _check_arguments(checkpoint, data, qrels, scores, baseline, baseline_scores)
    if not recall_at or min(recall_at) < 1:
        raise UsageError(f"`recall_at` {list(recall_at)}: give one or more k of at least 1")
    if bootstrap_samples < 1:
        raise UsageError(f"`bootstrap_samples` {bootstrap_samples}: must be at least 1")

    from colbertkit.runs import read_qrels

    # Every input is read and checked before any model loads.
    judged = read_qrels(qrels) if qrels is not None else None
    if judged is not None and not any(map(judged.relevant_count, judged.judgements)):
        raise InputError(
            judged.path,
            None,
            "no passage is judged relevant (every grade is 0 or below); nothing to evaluate",
            "relevant passages have grades of 1 or more",
        )
    candidates = _read_data(data, judged) if data is not None else None
    try:
        run_files = {
            role: _read_scores(path, judged)
            for role, path in (("system", scores), ("baseline", baseline_scores))
            if path is not None
        }
        truth = candidates.judgements if candidates is not None else _require(judged).judgements
        results: dict[str, SystemResult] = {}
        for role, model, model_options in (
            ("system", checkpoint, options),
            ("baseline", baseline, baseline_options),
        ):
            if role in run_files:
                run_file = run_files[role]
                result = evaluate_run(
                    run_file.scores, truth, recall_at=recall_at, name=run_file.path
                )
                result.notes.insert(0, f"read {run_file.path} as a {run_file.format} file")
                result.pairs_scored = sum(len(s) for s in run_file.scores.values())
                results[role] = result
            elif model is not None and candidates is not None:
                results[role] = _evaluate_checkpoint(
                    str(model), model_options, candidates, recall_at, role, progress, say
                )
    finally:
        if candidates is not None:
            candidates.close()

    system = results["system"]
    report = EvaluationReport(
        metrics=metric_names(recall_at),
        system=system,
        baseline=results.get("baseline"),
        data=str(data) if data is not None else None,
        qrels=str(qrels) if qrels is not None else None,
        notes=candidates.notes if candidates is not None else [],
    )
    if report.baseline is not None:
        report.comparison = compare(
            system,
            report.baseline,
            samples=bootstrap_samples,
            seed=bootstrap_seed,
            confidence=confidence,
        )
    return report


def _model_options(value: ModelOptions | Mapping[str, Any] | None) -> ModelOptions:
    if isinstance(value, ModelOptions):
        return value
    return validate_options(ModelOptions, **dict(value or {}))


def _check_arguments(
    checkpoint: Any, data: Any, qrels: Any, scores: Any, baseline: Any, baseline_scores: Any
) -> None:
    if checkpoint is not None and scores is not None:
        raise UsageError(
            "`scores` evaluates scores made elsewhere, without a model: give `checkpoint` and "
            "`data`, or `scores`, not both"
        )
    if checkpoint is None and scores is None:
        raise UsageError(
            "nothing to evaluate: give `checkpoint` and `data` (eval rows, or pairs with "
            "`qrels`), or `scores` with `qrels`"
        )
    if baseline is not None and baseline_scores is not None:
        raise UsageError("give `baseline` or `baseline_scores`, not both")
    if checkpoint is not None and data is None:
        raise UsageError("`checkpoint` needs `data` to score: eval rows (jsonl) or a pairs TSV")
    if baseline is not None and data is None:
        raise UsageError(
            "`baseline` needs `data` to score; to compare a checkpoint with `scores`, evaluate "
            "the checkpoint on the pairs and give the scores file as `baseline_scores`"
        )
    for name, value in (("scores", scores), ("baseline_scores", baseline_scores)):
        if value is not None and qrels is None:
            raise UsageError(f"`{name}` needs `qrels` to judge the scores")


def _require(judged: Qrels | None) -> Qrels:
    if judged is None:  # _check_arguments makes this unreachable
        raise UsageError("`scores` needs `qrels` to judge the scores")
    return judged


def _read_data(data: str | os.PathLike[str], judged: Qrels | None) -> _Candidates:
    if _is_training_rows(data):
        if judged is not None:
            raise UsageError(
                f"{data}: eval rows carry their labels (pos / neg); `qrels` go with a pairs "
                "TSV or scores files"
            )
        return _candidates_from_rows(data)
    if judged is None:
        raise UsageError(
            f"{data}: a pairs TSV needs `qrels` to say which passages are relevant "
            "(eval rows in the training format carry their own labels)"
        )
    return _candidates_from_pairs(data, judged)


def _read_scores(path: str | os.PathLike[str], judged: Qrels | None) -> Run:
    from colbertkit.runs import read_run

    run = read_run(path)
    known = _require(judged).judgements
    unknown = {qid: line for qid, line in run.first_line.items() if qid not in known}
    _raise_unknown(run.path, unknown, _require(judged).path)
    return run


def _is_training_rows(path: str | os.PathLike[str]) -> bool:
    """True for eval rows (``.jsonl`` / ``.json``, or a first non-blank ``{``), else a pairs TSV."""
    if str(path) == "-":
        return False  # standard input: a pairs TSV
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    with open(file, "rb") as handle:
        start = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return start.startswith(b"{") or file.suffix.lower() in (".jsonl", ".json")


def _candidates_from_rows(path: str | os.PathLike[str]) -> _Candidates:
    from colbertkit.data import read_training_rows

    judgements: dict[str, dict[str, int]] = {}
    keys: list[tuple[str, str]] = []
    rows: list[tuple[str, list[str]]] = []
    without_negatives: list[int] = []
    # The trainer's reader and rule: every listed passage is a candidate, pos relevant.
    for line, row in read_training_rows(path, require_negatives=False):
        if not row.neg:
            # Nothing to rank the positives against: such a row would score 1 whatever the
            # model does. The trainer refuses these rows in its eval set; here they are skipped.
            without_negatives.append(line)
            continue
        qid = str(line)
        passages = [*row.pos, *row.neg]
        grades = [1] * len(row.pos) + [0] * len(row.neg)
        judgements[qid] = {str(i): grade for i, grade in enumerate(grades)}
        keys.extend((qid, str(i)) for i in range(len(passages)))
        rows.append((row.query, passages))
    if not rows:
        raise InputError(
            path,
            None,
            "no row has negatives: nothing to rank the positives against",
            'give rows {"query", "pos", "neg"} a non-empty neg list',
        )
    notes = [f"{path}: {_count(len(rows), 'row', 'rows')} ranked, named by line number"]
    if without_negatives:
        notes.append(
            f"{_count(len(without_negatives), 'row', 'rows')} without negatives skipped: "
            f"nothing to rank their positives against (e.g. line {without_negatives[0]})"
        )

    def texts() -> Iterator[tuple[str, str]]:
        for query, passages in rows:
            for passage in passages:
                yield query, passage

    return _Candidates(judgements, keys, texts, notes)


def _candidates_from_pairs(path: str | os.PathLike[str], judged: Qrels) -> _Candidates:
    from colbertkit.pairs import open_pairs

    source = open_pairs(path)
    try:
        if not source.has_ids:
            raise UsageError(
                f"{source.name}:1: 2 columns, no ids; `qrels` need "
                "qid<TAB>query<TAB>pid<TAB>passage lines"
            )
        keys: list[tuple[str, str]] = []
        seen_on: dict[tuple[str, str], int] = {}
        unknown: dict[str, int] = {}
        for pair in source.pairs():
            key = (str(pair.qid), str(pair.pid))
            if key in seen_on:
                raise InputError(
                    source.name,
                    pair.line,
                    f"{pair.qid}/{pair.pid} is listed twice (first on line {seen_on[key]})",
                    "keep one line per query and passage",
                )
            seen_on[key] = pair.line
            if key[0] not in judged.judgements:
                unknown.setdefault(key[0], pair.line)
            keys.append(key)
        _raise_unknown(source.name, unknown, judged.path)
    except BaseException:
        source.close()
        raise

    def texts() -> Iterator[tuple[str, str]]:
        return ((pair.query, pair.passage) for pair in source.pairs())

    return _Candidates(judged.judgements, keys, texts, [], source.close)


def _raise_unknown(name: str, unknown: Mapping[str, int], qrels_path: str) -> None:
    if not unknown:
        return
    qid, line = next(iter(unknown.items()))
    others = f" (and {len(unknown) - 1} other queries)" if len(unknown) > 1 else ""
    raise InputError(
        name,
        line,
        f"query {qid!r}{others} is not in {qrels_path}",
        "judge it with the qrels of the same queries, or drop its lines",
    )


def _evaluate_checkpoint(
    checkpoint: str,
    options: ModelOptions,
    candidates: _Candidates,
    recall_at: Sequence[int],
    role: str,
    progress: ProgressFactory | None,
    say: Callable[[str], None],
) -> SystemResult:
    from colbertkit.scorer import load_scorer

    started = time.perf_counter()
    ready = load_scorer(
        checkpoint,
        batch_size=options.encode_batch_size,
        query_max_len=options.query_max_len,
        passage_max_len=options.passage_max_len,
        device=options.device,
        dtype=options.dtype,
        pad_floor=options.pad_floor,
        colbert_dim=options.colbert_dim,
        fresh_head=options.fresh_head,
        seed=options.seed,
        trust_remote_code=options.trust_remote_code,
    )
    scorer, loaded = ready.scorer, ready.loaded
    load_seconds = time.perf_counter() - started
    notes = [f"{checkpoint}: {note}" for note in loaded.notes]
    for note in notes:
        say(note)
    count = len(candidates.keys)
    floor = ", pad floor" if options.pad_floor else ""
    say(
        f"{role}: scoring {count} pairs on {ready.describe()}, query/passage max len "
        f"{scorer.query_max_len}/{scorer.passage_max_len}{floor}"
    )
    started = time.perf_counter()
    with _progress(progress, "scoring" if role == "system" else "scoring baseline", count) as step:
        scores = list(scorer.score(candidates.texts(), progress=step))
    scoring_seconds = time.perf_counter() - started
    del scorer, loaded, ready  # the baseline's model loads next

    run: dict[str, dict[str, float]] = {}
    for (qid, pid), score in zip(candidates.keys, scores, strict=True):
        run.setdefault(qid, {})[pid] = score
    result = evaluate_run(
        run, candidates.judgements, recall_at=recall_at, name=checkpoint, kind="checkpoint"
    )
    result.pairs_scored = count
    result.load_seconds = load_seconds
    result.scoring_seconds = scoring_seconds
    result.loading = notes
    return result


def _progress(
    factory: ProgressFactory | None, description: str, total: int
) -> AbstractContextManager[Callable[[int], None] | None]:
    if factory is None:
        return contextlib.nullcontext(None)
    return factory(description, total)


__all__ = [
    "EvaluationReport",
    "ModelOptions",
    "QueryResult",
    "SystemResult",
    "compare",
    "evaluate",
    "evaluate_run",
]
