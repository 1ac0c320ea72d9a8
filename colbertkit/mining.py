"""Hard-negative mining: ``{"query", "pos"}`` rows and a corpus in, training rows out.

:func:`mine_negatives` is the whole job (``colbertkit mine`` only parses and prints):

1. **Check** every query row (the training schema, ``neg`` optional) and load the models, before
   the corpus is read: a bad line or checkpoint stops the job in seconds, not after indexing.
2. **Index** the corpus with BM25 (:mod:`colbertkit.bm25`: bm25s with per-language analysis).
   Passages are kept as UTF-8 bytes (one buffer, no Python object per passage) with a 64-bit
   fingerprint of each one's normalised text.
3. **Rank** each query's passages with BM25; with ``model``, the best ``rerank_top`` of them are
   scored with that ColBERT checkpoint and ranked by its MaxSim score instead.
4. **Filter** the passages at ranks ``rank_range`` (``(10, 100)``: skip the best 10, keep ranks
   11 to 100; ranks count every retrieved passage, positives included). A candidate is dropped,
   and counted under the first rule it meets, when it is

   * ``positive``: its normalised text (NFKC, casefolded, whitespace collapsed) equals a
     positive's: the positive's own corpus entry and every exact copy of it;
   * ``near_duplicate``: one normalised text contains the other and the shorter is at least
     :data:`NEAR_DUPLICATE_MIN_SHARE` of the longer (a positive with a title prepended, a
     trailing period, a truncated copy);
   * ``duplicate``: its text equals a candidate already kept for this query;
   * ``false_negative`` (with ``model`` only): its score is above ``max_relative`` times the
     query's lowest positive score (NV-Retriever's TopK-PercPos, 0.95 by default).

   ``max_relative`` needs a model: BM25 scores add up term weights, so a ratio of them measures
   word overlap with the positive, not relevance, and a positive that is not in the corpus has
   no BM25 score at all.
5. **Sample** ``neg_nums`` of the surviving candidates with a generator seeded by ``seed`` and
   the row's position, so a row's negatives do not depend on any other row; they are written in
   rank order. Rows left with fewer are written with what survived; rows left with none are not
   written (training needs negatives). Both are counted.
6. **Teacher scores** (``teacher``): a ColBERT checkpoint (MaxSim) or a Hugging Face
   sequence-classification model (a cross-encoder: its logit, or the log-odds of label 1 for a
   two-label model) scores every (query, passage) of the output: ``pos_scores`` / ``neg_scores``
   aligned with ``pos`` / ``neg``, rounded to 6 decimals.
7. **Write** the rows as they are mined to a temporary sibling of ``out``, renamed into place
   when the job succeeds. Output rows are ``query``, ``pos``, ``neg`` (and the teacher scores),
   then the input row's other keys; an input ``neg``, ``pos_scores`` or ``neg_scores`` is
   replaced.

Same inputs and settings give byte-identical output (rankings break ties by corpus position).

The corpus is a jsonl file (``text``; ``title``, ``id`` or ``_id`` optional: BEIR's
``corpus.jsonl`` works as is), a TSV file (``id<TAB>text``) or plain text (one passage a line).
Titles are indexed with their passage (BM25 finds more with them) but never written: a negative
is the ``text`` alone, as positives usually are. Passages with an empty text are skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

from colbertkit.bm25 import (
    LANGUAGE_CHOICES,
    Analyzer,
    BM25Index,
    collapse_whitespace,
    detect_language,
    normalize,
)
from colbertkit.errors import CheckpointError, InputError, UsageError

NEAR_DUPLICATE_MIN_SHARE = 0.5
DEFAULT_MAX_RELATIVE = 0.95  # NV-Retriever's TopK-PercPos margin
CORPUS_FORMATS = ("auto", "jsonl", "tsv", "text")
FILTERS = ("positive", "near_duplicate", "duplicate", "false_negative")
LANGUAGE_SAMPLE = 1000  # passages read before the analyser is chosen (``language="auto"``)
TEACHER_MAX_LEN = 512  # tokens of a (query, passage) pair for a cross-encoder teacher
SCORE_DECIMALS = 6
_BLOCK = 32  # queries ranked, scored and written together


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class MiningReport:
    """What :func:`mine_negatives` did. Times in seconds.

    ``to_dict()`` is the JSON of ``colbertkit mine --format json`` (``format_version`` 1).
    """

    out: str
    queries: int  # rows read
    rows_written: int
    rows_without_negatives: int  # not written: every candidate was filtered out
    rows_with_fewer: int  # written with fewer than neg_nums negatives
    negatives_written: int
    negatives_per_row: dict[str, float]  # min, mean, max over written rows
    rows_with_replaced_negatives: int  # input rows that had a neg list
    candidates: int  # passages in the rank window, over all queries
    removed: dict[str, int]  # FILTERS -> candidates removed
    short_rankings: int  # queries with fewer retrieved passages than the window's end
    positives: int
    positives_in_corpus: int  # positives whose normalised text is a corpus passage
    corpus_passages: int
    corpus_skipped_empty: int
    language: str
    vocabulary: int  # distinct BM25 terms
    index_bytes: int  # the BM25 index's arrays
    index_seconds: float
    mine_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passages_per_second(self) -> float:
        return self.corpus_passages / self.index_seconds if self.index_seconds else 0.0

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.mine_seconds if self.mine_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "colbertkit.mine",
            "format_version": 1,
            **asdict(self),
            "passages_per_second": round(self.passages_per_second, 1),
            "queries_per_second": round(self.queries_per_second, 1),
        }


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusEntry:
    line: int  # 1-based line of the corpus file (position + 1 for an in-memory corpus)
    text: str
    title: str = ""


def read_corpus(
    corpus: str | os.PathLike[str] | Iterable[str | Mapping[str, Any]],
    corpus_format: str = "auto",
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[CorpusEntry]:
    """Stream the passages of a corpus file (or of an iterable of texts / ``{"text"}`` dicts).

    Blank lines are skipped; a UTF-8 BOM and CRLF line ends are accepted. A line that cannot be
    read raises :class:`~colbertkit.errors.InputError` naming the file and line.
    """
    if corpus_format not in CORPUS_FORMATS:
        raise UsageError(f"corpus_format {corpus_format!r}: use one of {', '.join(CORPUS_FORMATS)}")
    if not isinstance(corpus, (str, os.PathLike)):
        yield from _corpus_from_objects(corpus)
        return
    from colbertkit.data import iter_raw_lines, open_data_file

    path = Path(corpus)
    with open_data_file(path) as file:
        kind = corpus_format if corpus_format != "auto" else _sniff_corpus_format(path, file)
        for line_number, raw in iter_raw_lines(file, on_bytes=on_bytes):
            if raw is None:
                raise InputError(path, line_number, "line longer than 16 MiB", "split the passage")
            entry = _parse_corpus_line(path, line_number, raw, kind)
            if entry is not None:
                yield entry


def _sniff_corpus_format(path: Path, file: Any) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".tsv":
        return "tsv"
    if suffix == ".txt":
        return "text"
    head = file.read(4096)
    file.seek(0)
    return "jsonl" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "text"


def _parse_corpus_line(path: Path, line_number: int, raw: bytes, kind: str) -> CorpusEntry | None:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(
            path, line_number, f"byte {error.start + 1} is not valid UTF-8", "save it as UTF-8"
        ) from None
    if kind == "text":
        return CorpusEntry(line_number, line)
    if kind == "tsv":
        _, tab, text = line.partition("\t")
        if not tab:
            raise InputError(
                path, line_number, "no tab", "write id<TAB>text, or pass --corpus-format text"
            )
        return CorpusEntry(line_number, text)
    try:
        record = json.loads(line)
    except ValueError as error:
        raise InputError(
            path, line_number, f"not valid JSON: {getattr(error, 'msg', error)}"
        ) from None
    fix = 'write {"id": ..., "title": ..., "text": "..."} a line'
    if not isinstance(record, dict):
        raise InputError(path, line_number, "not a JSON object", fix)
    text, title = record.get("text"), record.get("title") or ""
    if not isinstance(text, str):
        problem = "no text field" if text is None else "text is not a string"
        raise InputError(path, line_number, problem, fix)
    if not isinstance(title, str):
        raise InputError(path, line_number, "title is not a string", fix)
    return CorpusEntry(line_number, text, title)


def _corpus_from_objects(items: Iterable[str | Mapping[str, Any]]) -> Iterator[CorpusEntry]:
    for position, item in enumerate(items):
        if isinstance(item, str):
            yield CorpusEntry(position + 1, item)
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            yield CorpusEntry(position + 1, item["text"], str(item.get("title") or ""))
        else:
            raise UsageError(f"corpus[{position}]: expected a string or a dict with a text field")


@dataclass
class _QueryRow:
    index: int  # 0-based position among the rows
    query: str
    pos: list[str]
    had_negatives: bool
    extra: dict[str, Any]


def _query_rows(
    queries: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
) -> Iterator[_QueryRow]:
    """Rows of ``queries`` checked by the training schema (``neg`` optional)."""
    from colbertkit.data import TrainingRow, read_training_rows

    if isinstance(queries, (str, os.PathLike)):
        numbered: Iterable[tuple[Any, Any]] = read_training_rows(queries, require_negatives=False)
    else:
        numbered = enumerate(queries)
    for index, (where, row) in enumerate(numbered):
        if not isinstance(row, TrainingRow):
            try:
                row = TrainingRow.model_validate(row, context={"require_negatives": False})
            except Exception as error:
                raise UsageError(
                    f"queries[{where}]: not a valid row ({_first_line(error)})"
                ) from None
        extra = {
            key: value
            for key, value in (row.model_extra or {}).items()
            if key not in ("neg", "pos_scores", "neg_scores")
        }
        yield _QueryRow(index, row.query, list(row.pos), bool(row.neg), extra)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return " ".join(lines[:3]) if lines else type(error).__name__


# --------------------------------------------------------------------------------------------
# The corpus in memory
# --------------------------------------------------------------------------------------------


def fingerprint(collapsed: str) -> int:
    """64-bit fingerprint of a normalised text (two texts collide with odds ~2^-64)."""
    return int.from_bytes(
        hashlib.blake2b(collapsed.encode("utf-8"), digest_size=8).digest(), "little"
    )


class _Passages:
    """The corpus texts as UTF-8 in one buffer, plus each one's normalised-text fingerprint."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._offsets = array("q", [0])
        self._fingerprints = array("Q")

    def add(self, text: str, collapsed: str) -> None:
        self._data += text.encode("utf-8")
        self._offsets.append(len(self._data))
        self._fingerprints.append(fingerprint(collapsed))

    def __len__(self) -> int:
        return len(self._fingerprints)

    def text(self, position: int) -> str:
        return self._data[self._offsets[position] : self._offsets[position + 1]].decode("utf-8")

    def fingerprint(self, position: int) -> int:
        return self._fingerprints[position]

    def sorted_fingerprints(self) -> Any:
        import numpy as np

        return np.sort(np.frombuffer(self._fingerprints, dtype=np.uint64))


def _build_index(
    entries: Iterator[CorpusEntry],
    language: str,
    log: Callable[[str], None],
) -> tuple[BM25Index, _Passages, int]:
    """Read and index the corpus: (index, passages, empty passages skipped)."""
    head = list(islice(entries, LANGUAGE_SAMPLE))
    if language == "auto":
        language = detect_language(entry.title + " " + entry.text for entry in head)
        log(f"language: {language} (detected from the first {len(head)} passages)")
    index = BM25Index(Analyzer(language))
    passages = _Passages()
    skipped = 0
    for entry in chain(head, entries):
        if not entry.text.strip():
            skipped += 1
            continue
        normalized = normalize(entry.text)
        passages.add(entry.text, collapse_whitespace(normalized))
        index.add(normalize(entry.title) + "\n" + normalized if entry.title else normalized)
    if len(passages) == 0:
        raise UsageError("the corpus has no passages with text")
    log(f"read {len(passages):,} passages; building the BM25 index")
    index.build()
    return index, passages, skipped


# --------------------------------------------------------------------------------------------
# Scoring models
# --------------------------------------------------------------------------------------------


class _CrossEncoder:
    """A Hugging Face sequence-classification model as a (query, passage) scorer."""

    def __init__(
        self,
        path: Path,
        device: Any,
        dtype: Any,
        batch_size: int,
        max_len: int,
        trust_remote_code: bool,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=trust_remote_code
            )
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=trust_remote_code
            )
        except Exception as error:
            raise CheckpointError(
                f"{path}: cannot load the cross-encoder ({_first_line(error)})"
            ) from error
        labels = int(self.model.config.num_labels)
        if labels not in (1, 2):
            raise CheckpointError(
                f"{path}: a teacher cross-encoder needs 1 or 2 labels, this one has {labels}"
            )
        self.model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_len = min(max_len, int(getattr(self.tokenizer, "model_max_length", max_len)))

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        encoded = self.tokenizer(
            [query for query, _ in pairs],
            [passage for _, passage in pairs],
            truncation="longest_first",
            max_length=self.max_len,
        )
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        # Longest first, each batch padded to its own longest pair: little compute on padding.
        order = sorted(range(len(pairs)), key=lambda i: -len(encoded["input_ids"][i]))
        scores = [0.0] * len(pairs)
        pad_id = self.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = len(encoded["input_ids"][batch[0]])
                tensors = {}
                for key in keys:
                    pad = pad_id if key == "input_ids" else 0
                    rows = [encoded[key][i] + [pad] * (width - len(encoded[key][i])) for i in batch]
                    tensors[key] = torch.tensor(rows, device=self.device)
                logits = self.model(**tensors).logits.float()  # (B, labels)
                # Two labels: the log-odds of label 1, on the same logit scale as one label.
                values = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
                for i, value in zip(batch, values.tolist(), strict=True):
                    scores[i] = value
        return scores


class _ColbertScorer:
    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return list(self.scorer.score(pairs))


def _is_cross_encoder(spec: str | os.PathLike[str]) -> bool:
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


@dataclass
class _ModelOptions:
    device: str
    dtype: str
    batch_size: int
    query_max_len: int | None
    passage_max_len: int | None
    fresh_head: bool
    seed: int
    trust_remote_code: bool


def _load_scorer(spec: str, role: str, options: _ModelOptions, log: Callable[[str], None]) -> Any:
    """A ColBERT checkpoint (``model`` / ``teacher``) or a cross-encoder (``teacher`` only)."""
    from colbertkit.scorer import load_scorer, pick_device, pick_dtype

    if role == "teacher" and _is_cross_encoder(spec):
        log(f"teacher: cross-encoder at {spec}")
        target = pick_device(options.device)
        return _CrossEncoder(
            Path(spec).expanduser(),
            target,
            pick_dtype(options.dtype, target),
            options.batch_size,
            TEACHER_MAX_LEN,
            options.trust_remote_code,
        )
    try:
        ready = load_scorer(
            spec,
            batch_size=options.batch_size,
            query_max_len=options.query_max_len,
            passage_max_len=options.passage_max_len,
            device=options.device,
            dtype=options.dtype,
            fresh_head=options.fresh_head and role == "model",
            seed=options.seed,
            trust_remote_code=options.trust_remote_code,
        )
    except CheckpointError as error:
        if role == "teacher" and "`fresh_head=True`" in str(error):
            raise CheckpointError(
                f"teacher {spec}: neither a ColBERT checkpoint with a head nor a "
                "sequence-classification model (a cross-encoder); a teacher needs trained scores"
            ) from error
        raise
    for note in ready.loaded.notes:
        log(f"{role}: {note}")
    return _ColbertScorer(ready.scorer)


# --------------------------------------------------------------------------------------------
# Mining
# --------------------------------------------------------------------------------------------


def parse_rank_range(value: str | Sequence[int]) -> tuple[int, int]:
    """``"10:100"`` or ``(10, 100)``: skip the best 10, keep ranks 11 to 100."""
    if isinstance(value, str):
        start, colon, end = value.partition(":")
        try:
            if not colon:
                raise ValueError
            parsed = (int(start), int(end))
        except ValueError:
            raise UsageError(
                f"--range {value}: write START:END, e.g. 10:100 (skip the best 10, keep ranks "
                "11 to 100)"
            ) from None
    else:
        parsed = tuple(int(v) for v in value)
        if len(parsed) != 2:
            raise UsageError(f"rank_range {value!r}: give (start, end), e.g. (10, 100)")
    start, end = parsed
    if start < 0 or end <= start:
        raise UsageError(
            f"--range {start}:{end} is no window: it needs 0 <= START < END (skip the best START, "
            "keep ranks START+1 to END)"
        )
    return start, end


@dataclass
class _Counters:
    rows_written: int = 0
    rows_without_negatives: int = 0
    rows_with_fewer: int = 0
    negatives: list[int] = field(default_factory=list)
    replaced: int = 0
    candidates: int = 0
    short_rankings: int = 0
    positives: int = 0
    positives_in_corpus: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))


class _Miner:
    """Ranks, filters and samples one block of query rows at a time."""

    def __init__(
        self,
        index: BM25Index,
        passages: _Passages,
        *,
        neg_nums: int,
        window: tuple[int, int],
        model: Any,
        rerank_top: int,
        max_relative: float | None,
        teacher: Any,
        seed: int,
    ) -> None:
        self.index = index
        self.passages = passages
        self.neg_nums = neg_nums
        self.window = window
        self.model = model
        self.depth = rerank_top if model is not None else window[1]
        self.max_relative = max_relative
        self.teacher = teacher
        self.seed = seed
        self.corpus_fingerprints = passages.sorted_fingerprints()
        self.counters = _Counters()

    def _in_corpus(self, value: int) -> bool:
        import numpy as np

        found = np.searchsorted(self.corpus_fingerprints, np.uint64(value))
        return bool(
            found < len(self.corpus_fingerprints) and self.corpus_fingerprints[found] == value
        )

    def mine(self, rows: list[_QueryRow]) -> list[dict[str, Any]]:
        rankings = [self.index.search(row.query, self.depth)[0].tolist() for row in rows]
        scores: list[dict[int, float]] = [{} for _ in rows]
        positive_scores: list[list[float]] = [[] for _ in rows]
        if self.model is not None:
            pairs = [
                (row.query, text)
                for row, ranking in zip(rows, rankings, strict=True)
                for text in chain(row.pos, map(self.passages.text, ranking))
            ]
            values = iter(self.model.score(pairs))
            for i, (row, ranking) in enumerate(zip(rows, rankings, strict=True)):
                positive_scores[i] = [next(values) for _ in row.pos]
                scores[i] = {position: next(values) for position in ranking}
                # Stable: equal model scores keep their BM25 order.
                rankings[i] = sorted(ranking, key=lambda p, s=scores[i]: -s[p])
        out = []
        for row, ranking, score, positive_score in zip(
            rows, rankings, scores, positive_scores, strict=True
        ):
            negatives = self._negatives(row, ranking, score, positive_score)
            if not negatives:
                self.counters.rows_without_negatives += 1
                continue
            out.append((row, negatives))
        return self._rows(out)

    def _negatives(
        self,
        row: _QueryRow,
        ranking: list[int],
        score: dict[int, float],
        positive_score: list[float],
    ) -> list[str]:
        counters = self.counters
        start, end = self.window
        if len(ranking) < end:
            counters.short_rankings += 1
        positives = [collapse_whitespace(normalize(text)) for text in row.pos]
        prints = [fingerprint(text) for text in positives]
        positive_prints = set(prints)
        counters.positives += len(prints)
        counters.positives_in_corpus += sum(map(self._in_corpus, prints))
        threshold = None
        if self.max_relative is not None and positive_score:
            threshold = self.max_relative * min(positive_score)
        kept: list[int] = []
        kept_prints: set[int] = set()
        for position in ranking[start:end]:
            counters.candidates += 1
            candidate_print = self.passages.fingerprint(position)
            if candidate_print in positive_prints:
                counters.removed["positive"] += 1
            elif _near_duplicate(
                collapse_whitespace(normalize(self.passages.text(position))), positives
            ):
                counters.removed["near_duplicate"] += 1
            elif candidate_print in kept_prints:
                counters.removed["duplicate"] += 1
            elif threshold is not None and score[position] > threshold:
                counters.removed["false_negative"] += 1
            else:
                kept.append(position)
                kept_prints.add(candidate_print)
        if len(kept) > self.neg_nums:
            generator = random.Random(f"{self.seed}:{row.index}")
            chosen = set(generator.sample(range(len(kept)), self.neg_nums))
            kept = [position for i, position in enumerate(kept) if i in chosen]  # rank order
        return [self.passages.text(position) for position in kept]

    def _rows(self, mined: list[tuple[_QueryRow, list[str]]]) -> list[dict[str, Any]]:
        teacher_scores: Iterator[float] | None = None
        if self.teacher is not None:
            pairs = [
                (row.query, text) for row, negatives in mined for text in chain(row.pos, negatives)
            ]
            teacher_scores = iter(self.teacher.score(pairs))
        out = []
        for row, negatives in mined:
            counters = self.counters
            counters.rows_written += 1
            counters.negatives.append(len(negatives))
            counters.rows_with_fewer += len(negatives) < self.neg_nums
            counters.replaced += row.had_negatives
            record: dict[str, Any] = {"query": row.query, "pos": row.pos, "neg": negatives}
            if teacher_scores is not None:
                record["pos_scores"] = [_rounded(next(teacher_scores)) for _ in row.pos]
                record["neg_scores"] = [_rounded(next(teacher_scores)) for _ in negatives]
            for key, value in row.extra.items():
                record.setdefault(key, value)
            out.append(record)
        return out


def _near_duplicate(candidate: str, positives: list[str]) -> bool:
    for positive in positives:
        shorter, longer = sorted((candidate, positive), key=len)
        if len(shorter) >= NEAR_DUPLICATE_MIN_SHARE * len(longer) and shorter in longer:
            return True
    return False


def _rounded(value: float) -> float:
    if not math.isfinite(value):
        raise CheckpointError(
            f"the teacher produced a score of {value}; check the teacher checkpoint and --dtype"
        )
    return round(value, SCORE_DECIMALS)


def _count_rows(queries: Any) -> tuple[int, Any]:
    """Check every row before any work; return (rows, the rows again as a re-readable source)."""
    if isinstance(queries, (str, os.PathLike)):
        return sum(1 for _ in _query_rows(queries)), queries
    rows = list(queries)
    return sum(1 for _ in _query_rows(rows)), rows


def _check_output(out: Path, force: bool, inputs: Sequence[Any]) -> None:
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give a file name for the output")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: directory {out.parent} does not exist")
    for source in inputs:
        if (
            isinstance(source, (str, os.PathLike))
            and Path(source).exists()
            and out.exists()
            and out.samefile(source)
        ):
            raise UsageError(f"{out} is also an input; write the output to another file")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; choose another file or pass --force")


def mine_negatives(
    queries: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    corpus: str | os.PathLike[str] | Iterable[str | Mapping[str, Any]],
    out: str | os.PathLike[str],
    *,
    neg_nums: int = 15,
    rank_range: str | Sequence[int] = (10, 100),
    language: str = "auto",
    corpus_format: str = "auto",
    model: str | None = None,
    rerank_top: int = 100,
    max_relative: float | None = None,
    teacher: str | None = None,
    fresh_head: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    dtype: str = "fp32",
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> MiningReport:
    """Mine hard negatives for each query row from ``corpus`` and write training rows to ``out``.

    The steps, filters and their order are in the module doc.

    Args:
        queries: a jsonl file of ``{"query", "pos"}`` rows (the training format; a ``neg`` list
            is replaced), or an iterable of such dicts.
        corpus: a jsonl / TSV / plain-text file (``corpus_format``: ``auto`` goes by the suffix,
            then by whether the first line is a JSON object), or an iterable of texts or
            ``{"text", "title"}`` dicts.
        out: the jsonl file to write (atomically); an existing file needs ``force``.
        neg_nums: negatives per row (fewer when fewer candidates survive).
        rank_range: ``(start, end)`` or ``"start:end"``: candidates are ranks start+1..end.
        language: ``auto`` (CJK or English, from the first passages), or one of
            :data:`colbertkit.bm25.LANGUAGES`.
        model: a ColBERT checkpoint that reranks the best ``rerank_top`` BM25 passages.
        max_relative: drop candidates scoring above this times the lowest positive score
            (model scores; default 0.95 with a model; ``math.inf`` turns it off).
        teacher: a ColBERT checkpoint or a sequence-classification directory whose scores are
            written as ``pos_scores`` / ``neg_scores``.
        fresh_head, batch_size, device, dtype, query_max_len, passage_max_len,
            trust_remote_code: how the checkpoints are loaded and run, as in ``colbertkit score``
            (``fresh_head`` applies to ``model`` only; ``seed`` seeds it).
        seed: the seed of the negative sampling.
        progress: ``progress(stage, advance, total)``: ``"index"`` in bytes of the corpus file
            (total None for an in-memory corpus), ``"mine"`` in query rows.
        log: receives one line for each thing worth knowing (checkpoints found, the language).

    Returns:
        A :class:`MiningReport`.
    """
    log = log or (lambda line: None)
    start, end = parse_rank_range(rank_range)
    if neg_nums < 1:
        raise UsageError(f"--neg-nums {neg_nums}: must be at least 1")
    if language not in LANGUAGE_CHOICES:
        raise UsageError(f"--language {language}: use one of {', '.join(LANGUAGE_CHOICES)}")
    if corpus_format not in CORPUS_FORMATS:
        raise UsageError(f"--corpus-format {corpus_format}: use one of {', '.join(CORPUS_FORMATS)}")
    if model is None:
        if max_relative is not None:
            raise UsageError(
                "--max-relative needs --model: it compares model scores (BM25 scores measure "
                "word overlap, not relevance)"
            )
        if fresh_head:
            raise UsageError("--fresh-head applies to --model; there is no --model")
    else:
        if rerank_top < end:
            raise UsageError(
                f"--rerank-top {rerank_top} is smaller than the end of --range {start}:{end}; "
                f"rerank at least {end} passages"
            )
        if max_relative is None:
            max_relative = DEFAULT_MAX_RELATIVE
        if not max_relative > 0:
            raise UsageError(f"--max-relative {max_relative}: must be above 0 (inf turns it off)")
        if math.isinf(max_relative):
            max_relative = None
    out = Path(out).expanduser()
    _check_output(out, force, (queries, corpus))
    if isinstance(corpus, (str, os.PathLike)):
        from colbertkit.data import open_data_file

        open_data_file(corpus).close()  # a missing corpus stops the job before the models load
    from colbertkit.bm25 import require_bm25s

    require_bm25s()

    query_count, queries = _count_rows(queries)
    if query_count == 0:
        raise UsageError(f"{queries}: no query rows")
    options = _ModelOptions(
        device,
        dtype,
        batch_size,
        query_max_len,
        passage_max_len,
        fresh_head,
        seed,
        trust_remote_code,
    )
    model_scorer = _load_scorer(model, "model", options, log) if model is not None else None
    teacher_scorer = _load_scorer(teacher, "teacher", options, log) if teacher else None

    index_started = time.perf_counter()
    total_bytes = None
    if isinstance(corpus, (str, os.PathLike)) and Path(corpus).is_file():
        total_bytes = Path(corpus).stat().st_size
    on_bytes = None
    if progress is not None and total_bytes is not None:
        on_bytes = lambda n: progress("index", n, total_bytes)  # noqa: E731
    index, passages, skipped = _build_index(
        read_corpus(corpus, corpus_format, on_bytes), language, log
    )
    index_seconds = time.perf_counter() - index_started
    log(
        f"indexed {len(passages):,} passages in {index_seconds:.1f} s "
        f"({index.analyzer.code}, {len(index.analyzer.vocabulary):,} terms)"
    )

    miner = _Miner(
        index,
        passages,
        neg_nums=neg_nums,
        window=(start, end),
        model=model_scorer,
        rerank_top=rerank_top,
        max_relative=max_relative,
        teacher=teacher_scorer,
        seed=seed,
    )
    mine_started = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            rows = _query_rows(queries)
            while block := list(islice(rows, _BLOCK)):
                for record in miner.mine(block):
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                if progress is not None:
                    progress("mine", len(block), query_count)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    mine_seconds = time.perf_counter() - mine_started

    counters = miner.counters
    negatives = counters.negatives
    return MiningReport(
        out=str(out),
        queries=query_count,
        rows_written=counters.rows_written,
        rows_without_negatives=counters.rows_without_negatives,
        rows_with_fewer=counters.rows_with_fewer,
        negatives_written=sum(negatives),
        negatives_per_row={
            "min": min(negatives, default=0),
            "mean": round(sum(negatives) / len(negatives), 2) if negatives else 0.0,
            "max": max(negatives, default=0),
        },
        rows_with_replaced_negatives=counters.replaced,
        candidates=counters.candidates,
        removed=counters.removed,
        short_rankings=counters.short_rankings,
        positives=counters.positives,
        positives_in_corpus=counters.positives_in_corpus,
        corpus_passages=len(passages),
        corpus_skipped_empty=skipped,
        language=index.analyzer.code,
        vocabulary=len(index.analyzer.vocabulary),
        index_bytes=index.index_bytes,
        index_seconds=round(index_seconds, 3),
        mine_seconds=round(mine_seconds, 3),
        settings={
            "neg_nums": neg_nums,
            "range": [start, end],
            "model": model,
            "rerank_top": rerank_top if model is not None else None,
            "max_relative": max_relative,
            "teacher": teacher,
            "seed": seed,
        },
    )
