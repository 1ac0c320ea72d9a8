"""The data doctor behind ``colbertkit validate-data``: every problem of a training file, at once.

:func:`validate_dataset` streams a jsonl file (and optionally an eval file) once and returns a
:class:`ValidationReport`. Memory does not grow with the file: the report keeps counters, a few
sample problems per kind, bounded length histograms and fingerprint tables with a size cap.

Rows are judged by :func:`colbertkit.data.check_row`, the same function the training reader
uses, so ``train`` refuses exactly the rows reported here as errors.

Approximations, stated in the report:

* Duplicate rows, repeated queries and eval/train overlap are found by comparing 64-bit
  fingerprints (Python's string hash), so two different texts could collide; for a million
  rows the chance is about 1 in 37 million. The tables remember at most ``max_tracked_rows``
  distinct rows and as many distinct queries (16 bytes a slot, at most two slots an entry: up
  to ~64 bytes per tracked row, ~64 MB at the default million); past that limit new ones are
  not remembered and ``duplicate_detection.complete`` is false.
* Length statistics are exact up to 16,384 (characters or tokens); longer values are
  binned with a relative error below 0.1%.

JSON shape of :meth:`ValidationReport.to_dict` (``format_version`` 1; new keys may be added,
existing ones keep their meaning)::

    {
      "format": "colbertkit.validate-data", "format_version": 1,
      "ok": bool,                   # no errors in any file
      "error_count": int,           # sum of "count" over all files and error kinds
      "warning_count": int,
      "settings": {"neg_nums", "require_negatives", "loss", "batch_size", "tokenizer",
                   "query_max_len", "passage_max_len", "max_line_bytes", "sample_limit",
                   "max_tracked_rows", "token_rows"},
      "files": [                    # the training file first, then the eval file if any
        {
          "role": "train" | "eval", "path": str, "size_bytes": int,
          "lines": int,             # physical lines, blank ones included
          "rows": int,              # valid rows (those training would use)
          "rows_with_errors": int,
          "errors":   {KIND: ISSUE, ...},      # only kinds that occurred, in a fixed order
          "warnings": {KIND: ISSUE, ...},
          "statistics": {
            "rows": int, "examples": int,      # one per positive (one per graded row)
            "batch_size": int | null, "steps_per_epoch": int | null,
            "positives_per_row": SUMMARY, "negatives_per_row": SUMMARY,
            "characters": {"query": SUMMARY, "positive": SUMMARY, "negative": SUMMARY},
            "negative_sampling": null | {"neg_nums", "rows_resampled", "examples_resampled",
                                         "expected_repeated_negatives_per_epoch"},
            "teacher_scores": null | {"rows": int, "graded_rows": int,
                                      "positive": RANGE, "negative": RANGE,
                                      "rows_with_a_negative_above_a_positive": int},
            "most_repeated_queries": [{"line": int, "rows": int}, ...],   # up to 5
            "extra_keys": {NAME: rows, ...},
            "tokens": null | {"tokenizer", "rows_tokenized", "query_max_len",
                              "passage_max_len", "query": SUMMARY, "passage": SUMMARY,
                              "queries_truncated": {"count", "share"},
                              "passages_truncated": {"count", "share"}}
          },
          "duplicate_detection": {"method": "64-bit fingerprints", "tracked_rows": int,
                                  "tracked_queries": int, "limit": int, "complete": bool}
        }
      ],
      "notes": [str, ...]
    }
    ISSUE   = {"count": int, "description": str,
               "samples": [{"line": int | null, "message": str}, ...],  # first sample_limit
               "more": int}                                             # count - len(samples)
    SUMMARY = {"count": int, "min", "mean", "median", "p95", "max"}   # null when count is 0
    RANGE   = {"count": int, "min", "mean", "max"}                    # null when count is 0

``count`` is the number of lines (rows) with that kind of problem; one message per line names
every field involved.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from colbertkit import defaults
from colbertkit.data import (
    DEFAULT_MAX_LINE_BYTES,
    ERROR_KINDS,
    REQUIRED_KEYS,
    SCORE_KEYS,
    RowRules,
    check_row,
    expected_duplicates,
    iter_raw_lines,
    open_data_file,
    parse_line,
    steps_per_epoch,
)
from colbertkit.errors import (
    CheckpointError,
    ColbertkitError,
    UsageError,
    first_line,
    validate_options,
)

FORMAT_VERSION = 1
DEFAULT_SAMPLE_LIMIT = 5
DEFAULT_MAX_TRACKED_ROWS = 1_000_000
TOKENIZER_BATCH_TEXTS = 2048
MOST_REPEATED_SHOWN = 5
EXTRA_KEY_NAMES_KEPT = 50

# Past this many negatives in a row, sampling copies and evaluation ranks a huge list each time.
MANY_NEGATIVES = 1000

WARNING_KINDS: dict[str, str] = {
    "few_negatives": "fewer negatives than neg_nums: drawn with repetition (duplicates)",
    "many_negatives": f"more than {MANY_NEGATIVES:,} negatives in one row (slow to sample "
    "and to evaluate)",
    "false_negative": "the same text in pos and neg of one row",
    "score_scale": "teacher scores beyond [-1, 1] (logits?): divided by the default "
    "teacher_temperature (= temperature, 0.02) their softmax is one-hot; logits want "
    "teacher_temperature about 1",
    "few_candidates": "a graded row with fewer other passages than neg_nums: drawn with "
    "repetition, and the repeats weigh in the teacher's distribution",
    "duplicate_text": "the same text twice in one pos or neg list",
    "duplicate_row": "a row identical to an earlier one (extra keys ignored)",
    "repeated_query": "a query already seen on an earlier row",
    "extra_keys": "keys other than query, pos, neg and their scores (ignored by training)",
    "bom": "a UTF-8 byte order mark at the start of the line",
    "crlf": "a Windows (CRLF) line end",
    "blank_line": "an empty or whitespace-only line",
    "query_in_train": "an eval query that is also a training query",
    "positive_in_train": "an eval positive that also occurs in the training file",
}


# --------------------------------------------------------------------------------------------
# Bounded building blocks
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


class FingerprintTable:
    """Open-addressing hash table of 64-bit fingerprints -> (first line, count), in flat arrays.

    16 bytes a slot; grows by doubling while it holds fewer than ``max_entries`` keys. Once full
    it still answers for what it holds but adds nothing new (``complete`` becomes False).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, max_entries)
        self.size = 0
        self.complete = True
        self._allocate(1024)

    def _allocate(self, slots: int) -> None:
        self._mask = slots - 1
        self._keys = array("Q", [0]) * slots
        self._lines = array("I", [0]) * slots
        self._counts = array("I", [0]) * slots

    def _slot(self, key: int) -> int:
        keys, mask = self._keys, self._mask
        index = key & mask
        while True:
            found = keys[index]
            if found == key or found == 0:
                return index
            index = (index + 1) & mask

    def add(self, fingerprint: int, line: int, count: int = 1) -> tuple[int, int] | None:
        """Count one more sighting; (first line, sightings so far), None if full and new."""
        key = (fingerprint & _MASK64) or 1  # 0 marks an empty slot
        index = self._slot(key)
        if self._keys[index] == key:
            seen = self._counts[index]
            if count and seen < 0xFFFFFFFF:
                seen += count
                self._counts[index] = seen
            return self._lines[index], seen
        if self.size >= self.max_entries:
            self.complete = False
            return None
        self._keys[index] = key
        self._lines[index] = min(line, 0xFFFFFFFF)
        self._counts[index] = count
        self.size += 1
        if self.size * 2 > len(self._keys):  # keep the load at most 1/2: short probes
            self._grow()
        return line, count

    def find(self, fingerprint: int) -> tuple[int, int] | None:
        """(first line, count) of a fingerprint, or None."""
        key = (fingerprint & _MASK64) or 1
        index = self._slot(key)
        if self._keys[index] != key:
            return None
        return self._lines[index], self._counts[index]

    def bump(self, fingerprint: int) -> tuple[int, int] | None:
        """Like :meth:`find`, then count one more sighting (never inserts)."""
        key = (fingerprint & _MASK64) or 1
        index = self._slot(key)
        if self._keys[index] != key:
            return None
        seen = self._counts[index]
        if seen < 0xFFFFFFFF:
            self._counts[index] = seen + 1
        return self._lines[index], seen

    def _grow(self) -> None:
        keys, lines, counts = self._keys, self._lines, self._counts
        self._allocate(len(keys) * 2)
        for index, key in enumerate(keys):
            if key:
                slot = self._slot(key)
                self._keys[slot] = key
                self._lines[slot] = lines[index]
                self._counts[slot] = counts[index]

    def largest(self, how_many: int, at_least: int = 2) -> list[tuple[int, int]]:
        """The (count, first line) pairs with the highest counts, at least ``at_least``."""
        best = heapq.nlargest(
            how_many,
            (
                (count, -line)
                for count, line in zip(self._counts, self._lines, strict=True)
                if count >= at_least
            ),
        )
        return [(count, -negative_line) for count, negative_line in best]


_EXACT_BELOW = 1 << 14


def _bin(value: int) -> int:
    # Keep 11 significant bits above 16384: relative error < 1/1024, bounded number of bins.
    if value < _EXACT_BELOW:
        return value
    shift = value.bit_length() - 11
    return (value >> shift) << shift


class Distribution:
    """Histogram of non-negative integers with min/mean/median/p95/max, bounded in memory."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0
        self.sum = 0
        self.min: int | None = None
        self.max: int | None = None

    def add_many(self, values: list[int]) -> None:
        if not values:
            return
        self.counts.update(values)
        self.total += len(values)
        self.sum += sum(values)
        low, high = min(values), max(values)
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)
        if len(self.counts) > 4 * _EXACT_BELOW:
            self._compact()

    def _compact(self) -> None:
        binned: Counter[int] = Counter()
        for value, count in self.counts.items():
            binned[_bin(value)] += count
        self.counts = binned

    def quantile(self, fraction: float) -> int | None:
        if not self.total:
            return None
        rank = max(1, math.ceil(fraction * self.total))
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= rank:
                return value
        return self.max  # pragma: no cover - rank <= total

    def count_above(self, limit: int) -> int:
        return sum(count for value, count in self.counts.items() if value > limit)

    def summary(self) -> dict[str, Any]:
        if not self.total:
            return {"count": 0, "min": None, "mean": None, "median": None, "p95": None, "max": None}
        return {
            "count": self.total,
            "min": self.min,
            "mean": round(self.sum / self.total, 2),
            "median": self.quantile(0.5),
            "p95": self.quantile(0.95),
            "max": self.max,
        }


class ScoreRange:
    """Count, min, mean and max of teacher scores (floats), in constant memory."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add_many(self, values: list[float]) -> None:
        if values:
            self.count += len(values)
            self.total += math.fsum(values)
            self.min = min(self.min, min(values))
            self.max = max(self.max, max(values))

    def summary(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0, "min": None, "mean": None, "max": None}
        return {
            "count": self.count,
            "min": self.min,
            "mean": self.total / self.count,
            "max": self.max,
        }


class IssueLog:
    """Counts of each problem kind with the first ``sample_limit`` (line, message) samples."""

    def __init__(self, kinds: dict[str, str], sample_limit: int) -> None:
        self.kinds = kinds
        self.sample_limit = sample_limit
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list[tuple[int | None, str]]] = {}

    def add(self, kind: str, line: int | None, message: str) -> None:
        count = self.counts.get(kind, 0)
        self.counts[kind] = count + 1
        if count < self.sample_limit:
            self.samples.setdefault(kind, []).append((line, message))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        result = {}
        for kind, description in self.kinds.items():
            count = self.counts.get(kind, 0)
            if not count:
                continue
            # Ascending lines; eval leaks are found in training-file order, hence the sort.
            samples = sorted(self.samples.get(kind, []), key=lambda s: (s[0] or 0, s[1]))
            result[kind] = {
                "count": count,
                "description": description,
                "samples": [{"line": line, "message": message} for line, message in samples],
                "more": count - len(samples),
            }
        return result


# --------------------------------------------------------------------------------------------
# Token lengths
# --------------------------------------------------------------------------------------------


class TokenCounter:
    """Token lengths (special tokens included, as the encoders see them), batched.

    Uses the Rust tokenizer directly when there is one: one ``encode_batch`` call per batch,
    parallel over cores, and no Python lists of ids.
    """

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.name = name
        self._slow = tokenizer
        self._fast = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            # A copy: switching truncation and padding off must not change the caller's tokenizer.
            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()

    def lengths(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self._fast is not None:
            # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not need.
            encode = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)
            return [len(encoding) for encoding in encode(texts)]
        ids = self._slow(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [len(sequence) for sequence in ids]


def load_tokenizer(spec: Any) -> tuple[Any, str]:
    """(tokenizer, display name) for a tokenizer object, a local directory or a hub id."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec, type(spec).__name__
    from colbertkit.checkpoint import resolve_checkpoint

    try:
        path = resolve_checkpoint(spec)
    except CheckpointError as error:  # a tokenizer that is not there: a bad setting
        raise UsageError(f"tokenizer {error}") from None
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types; all mean "no usable tokenizer"
        first = first_line(error)
        raise UsageError(f"{spec}: cannot load a tokenizer ({first})") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    return tokenizer, str(spec)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclass
class FileReport:
    """Everything found in one file; see the module docstring for the JSON shape."""

    role: str
    path: str
    size_bytes: int
    errors: IssueLog
    warnings: IssueLog
    lines: int = 0
    rows: int = 0
    rows_with_errors: int = 0
    statistics: dict[str, Any] = field(default_factory=dict)
    duplicate_detection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "path": self.path,
            "size_bytes": self.size_bytes,
            "lines": self.lines,
            "rows": self.rows,
            "rows_with_errors": self.rows_with_errors,
            "errors": self.errors.to_dict(),
            "warnings": self.warnings.to_dict(),
            "statistics": self.statistics,
            "duplicate_detection": self.duplicate_detection,
        }


@dataclass
class ValidationReport:
    """The result of :func:`validate_dataset`: per-file issues and statistics."""

    files: list[FileReport]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(report.errors.total for report in self.files)

    @property
    def warning_count(self) -> int:
        return sum(report.warnings.total for report in self.files)

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return self.error_count == 0

    def file(self, role: str) -> FileReport | None:
        return next((report for report in self.files if report.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "colbertkit.validate-data",
            "format_version": FORMAT_VERSION,
            "ok": self.ok,
            "error_count": self.error_count,
            "warning_count": self.warning_count,
            "settings": self.settings,
            "files": [report.to_dict() for report in self.files],
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def summary_line(self) -> str:
        """One line: what was found, e.g. for an error message."""
        parts = []
        for report in self.files:
            kinds = ", ".join(
                f"{count} {kind}" for kind, count in _ordered(report.errors.counts, ERROR_KINDS)
            )
            detail = f" ({kinds})" if kinds else ""
            parts.append(
                f"{report.path}: {report.errors.total} errors{detail}, "
                f"{report.warnings.total} warnings in {report.lines} lines"
            )
        return "; ".join(parts)

    def raise_for_errors(self, strict: bool = False) -> None:
        """Raise :class:`ColbertkitError` if there are errors (or, with ``strict``, warnings)."""
        command = " ".join(
            report.path if report.role == "train" else f"--eval {report.path}"
            for report in self.files
        )
        fix = f"run `colbertkit validate-data {command}` for the full report"
        if not self.ok:
            raise ColbertkitError(f"{self.summary_line()}; {fix}")
        if strict and self.warning_count:
            raise ColbertkitError(f"{self.summary_line()} (--strict treats warnings as errors)")


def _ordered(counts: dict[str, int], kinds: dict[str, str]) -> list[tuple[str, int]]:
    return [(kind, counts[kind]) for kind in kinds if counts.get(kind)]


# --------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    neg_nums: int | None
    rules: RowRules
    max_line_bytes: int
    sample_limit: int
    max_tracked_rows: int
    token_rows: int | None
    query_max_len: int
    passage_max_len: int
    batch_size: int | None


class _EvalIndex:
    """Fingerprints of the eval file's queries and positives, to find them in the training file."""

    def __init__(self, max_entries: int) -> None:
        self.queries = FingerprintTable(max_entries)
        self.positives = FingerprintTable(max_entries)

    def add_row(self, line: int, query: str, positives: list[str]) -> None:
        self.queries.add(hash(query), line, count=0)
        for text in positives:
            self.positives.add(hash(text), line, count=0)


class _FileScan:
    """One pass over one file; ``run`` fills a :class:`FileReport`."""

    def __init__(
        self,
        role: str,
        path: Path,
        settings: _Settings,
        token_counter: TokenCounter | None,
        *,
        eval_index: _EvalIndex | None = None,
        eval_report: FileReport | None = None,
        build_eval_index: _EvalIndex | None = None,
    ) -> None:
        self.settings = settings
        self.report = FileReport(
            role=role,
            path=str(path),
            size_bytes=path.stat().st_size,
            errors=IssueLog(ERROR_KINDS, settings.sample_limit),
            warnings=IssueLog(WARNING_KINDS, settings.sample_limit),
        )
        self.path = path
        self.rows_seen = FingerprintTable(settings.max_tracked_rows)
        self.queries_seen = FingerprintTable(settings.max_tracked_rows)
        self.positives_per_row = Distribution()
        self.negatives_per_row = Distribution()
        self.query_chars = Distribution()
        self.positive_chars = Distribution()
        self.negative_chars = Distribution()
        self.examples = 0
        self.scored_rows = 0
        self.graded_rows = 0
        self.rows_with_a_negative_above_a_positive = 0
        self.positive_scores = ScoreRange()
        self.negative_scores = ScoreRange()
        self.rows_resampled = 0
        self.examples_resampled = 0
        self.expected_repeats = 0.0
        self.extra_keys: Counter[str] = Counter()
        self.token_counter = token_counter
        self.query_tokens = Distribution()
        self.passage_tokens = Distribution()
        self.rows_tokenized = 0
        self._query_buffer: list[str] = []
        self._passage_buffer: list[str] = []
        self.eval_index = eval_index  # look training texts up in it
        self.eval_report = eval_report  # where leaks are reported
        self.build_eval_index = build_eval_index  # fill it with this file's rows

    def run(self, on_bytes: Callable[[int], None] | None) -> FileReport:
        report = self.report
        errors = report.errors
        warnings = report.warnings
        settings = self.settings
        # Eval rows rank pos + neg: they need no negatives and no teacher scores (the trainer
        # reads them that way).
        rules = settings.rules if report.role == "train" else RowRules(require_negatives=False)
        max_line_bytes = settings.max_line_bytes
        line_number = 0
        with open_data_file(self.path) as file:
            for line_number, raw in iter_raw_lines(file, max_line_bytes, on_bytes):
                parsed = parse_line(raw, max_line_bytes)
                if parsed.crlf:
                    warnings.add("crlf", line_number, "CRLF line end")
                if parsed.bom:
                    warnings.add("bom", line_number, "UTF-8 byte order mark at the line start")
                if parsed.blank:
                    warnings.add("blank_line", line_number, "blank line")
                    continue
                if parsed.problem is not None:
                    problems = [parsed.problem]
                else:
                    problems = check_row(parsed.value, rules, parsed.maybe_surrogates)
                if problems:
                    report.rows_with_errors += 1
                    for problem in problems:
                        errors.add(problem.kind, line_number, problem.message)
                    continue
                report.rows += 1
                self._examine(line_number, parsed.value)
        report.lines = line_number
        self._flush_tokens()
        if report.rows == 0 and report.rows_with_errors == 0:
            errors.add("no_rows", None, "no rows: the file is empty or has only blank lines")
        self._finish()
        return report

    def _examine(self, line: int, row: dict[str, Any]) -> None:
        warnings = self.report.warnings
        settings = self.settings
        query: str = row["query"]
        positives: list[str] = row["pos"]
        negatives: list[str] = row.get("neg") or []
        if len(row) != 3 or "neg" not in row:
            extra = [_short(key) for key in row if key not in REQUIRED_KEYS + SCORE_KEYS]
            if extra:
                shown = ", ".join(extra[:5]) + (
                    f" and {len(extra) - 5} more" if len(extra) > 5 else ""
                )
                warnings.add("extra_keys", line, f"extra keys ignored by training: {shown}")
                for key in extra:
                    if key in self.extra_keys or len(self.extra_keys) < EXTRA_KEY_NAMES_KEPT:
                        self.extra_keys[key] += 1

        positive_count, negative_count = len(positives), len(negatives)
        graded = self._count_teacher_scores(row, line)
        self.examples += 1 if graded else positive_count
        self.positives_per_row.add_many([positive_count])
        self.negatives_per_row.add_many([negative_count])
        self.query_chars.add_many([len(query)])
        self.positive_chars.add_many([len(text) for text in positives])
        self.negative_chars.add_many([len(text) for text in negatives])

        if negative_count > MANY_NEGATIVES:
            warnings.add(
                "many_negatives",
                line,
                f"{negative_count:,} negatives: every epoch copies the list to sample neg_nums "
                "of them, and evaluation ranks them all; keep the hardest few hundred",
            )
        neg_nums = settings.neg_nums
        if neg_nums and 0 < negative_count < neg_nums:
            repeats = expected_duplicates(negative_count, neg_nums)
            self.rows_resampled += 1
            self.examples_resampled += positive_count
            self.expected_repeats += repeats * positive_count
            warnings.add(
                "few_negatives",
                line,
                f"{negative_count} negatives < neg_nums {neg_nums}: drawn with repetition "
                f"(about {repeats:.1f} repeated negatives per example)",
            )

        positive_set = set(positives)
        negative_set = set(negatives)
        duplicated = []
        if len(positive_set) < positive_count:
            duplicated.append(f"pos has {positive_count - len(positive_set)} repeated texts")
        if len(negative_set) < negative_count:
            duplicated.append(f"neg has {negative_count - len(negative_set)} repeated texts")
        if duplicated:
            warnings.add("duplicate_text", line, "; ".join(duplicated))
        if negative_set and not positive_set.isdisjoint(negative_set):
            both = positive_set & negative_set
            indexes = [index for index, text in enumerate(negatives) if text in both]
            warnings.add(
                "false_negative",
                line,
                f"{len(both)} text(s) in both pos and neg (neg{indexes[:5]})",
            )

        seen_row = self.rows_seen.add(hash((query, tuple(positives), tuple(negatives))), line)
        seen_query = self.queries_seen.add(hash(query), line)
        if seen_row is not None and seen_row[1] > 1:
            warnings.add("duplicate_row", line, f"same row as line {seen_row[0]}")
        elif seen_query is not None and seen_query[1] > 1:
            warnings.add(
                "repeated_query",
                line,
                f"query also on line {seen_query[0]} ({seen_query[1]} rows so far)",
            )

        if self.build_eval_index is not None:
            self.build_eval_index.add_row(line, query, positives)
        if self.eval_index is not None:
            self._find_eval_leaks(line, query, positives, negatives)

        counter = self.token_counter
        if counter is not None and (
            settings.token_rows is None or self.rows_tokenized < settings.token_rows
        ):
            self.rows_tokenized += 1
            self._query_buffer.append(query)
            self._passage_buffer.extend(positives)
            self._passage_buffer.extend(negatives)
            if len(self._passage_buffer) >= TOKENIZER_BATCH_TEXTS:
                self._flush_tokens()

    def _count_teacher_scores(self, row: dict[str, Any], line: int) -> bool:
        """Score statistics of a valid row; returns whether it is a graded row (one example)."""
        positive_scores = row.get("pos_scores")
        negative_scores = row.get("neg_scores")
        if positive_scores is None and negative_scores is None:
            return False
        self.scored_rows += 1
        largest = max(abs(score) for score in (*(positive_scores or ()), *(negative_scores or ())))
        if largest > 1:
            self.report.warnings.add(
                "score_scale", line, f"a teacher score of magnitude {largest:g}"
            )
        if positive_scores is not None:
            self.positive_scores.add_many(positive_scores)
        if negative_scores:
            self.negative_scores.add_many(negative_scores)
            if positive_scores is not None and max(negative_scores) > min(positive_scores):
                self.rows_with_a_negative_above_a_positive += 1
        graded = (
            self.settings.rules.allow_graded and not row.get("neg") and positive_scores is not None
        )
        self.graded_rows += graded
        candidates = len(row["pos"]) - 1
        if graded and self.settings.neg_nums and candidates < self.settings.neg_nums:
            self.report.warnings.add(
                "few_candidates",
                line,
                f"{candidates} passages besides the top-scored one for neg_nums "
                f"{self.settings.neg_nums}",
            )
        return graded

    def _find_eval_leaks(
        self, line: int, query: str, positives: list[str], negatives: list[str]
    ) -> None:
        assert self.eval_index is not None and self.eval_report is not None
        eval_warnings = self.eval_report.warnings
        hit = self.eval_index.queries.bump(hash(query))
        if hit is not None and hit[1] == 0:
            eval_warnings.add(
                "query_in_train", hit[0], f"query also on line {line} of {self.report.path}"
            )
        positives_table = self.eval_index.positives
        for role, texts in (("positive", positives), ("negative", negatives)):
            for text in texts:
                hit = positives_table.bump(hash(text))
                if hit is not None and hit[1] == 0:
                    eval_warnings.add(
                        "positive_in_train",
                        hit[0],
                        f"a positive is also a {role} on line {line} of {self.report.path}",
                    )

    def _flush_tokens(self) -> None:
        if self.token_counter is None or not (self._query_buffer or self._passage_buffer):
            return
        self.query_tokens.add_many(self.token_counter.lengths(self._query_buffer))
        self.passage_tokens.add_many(self.token_counter.lengths(self._passage_buffer))
        self._query_buffer = []
        self._passage_buffer = []

    def _finish(self) -> None:
        settings = self.settings
        report = self.report
        batch_size = settings.batch_size
        statistics: dict[str, Any] = {
            "rows": report.rows,
            "examples": self.examples,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch(self.examples, batch_size) if batch_size else None,
            "positives_per_row": self.positives_per_row.summary(),
            "negatives_per_row": self.negatives_per_row.summary(),
            "characters": {
                "query": self.query_chars.summary(),
                "positive": self.positive_chars.summary(),
                "negative": self.negative_chars.summary(),
            },
            "negative_sampling": None,
            "teacher_scores": None,
            "most_repeated_queries": [
                {"line": line, "rows": count}
                for count, line in self.queries_seen.largest(MOST_REPEATED_SHOWN)
            ],
            "extra_keys": dict(self.extra_keys.most_common()),
            "tokens": None,
        }
        if settings.neg_nums:
            statistics["negative_sampling"] = {
                "neg_nums": settings.neg_nums,
                "rows_resampled": self.rows_resampled,
                "examples_resampled": self.examples_resampled,
                "expected_repeated_negatives_per_epoch": round(self.expected_repeats, 1),
            }
        if self.scored_rows:
            statistics["teacher_scores"] = {
                "rows": self.scored_rows,
                "graded_rows": self.graded_rows,
                "positive": self.positive_scores.summary(),
                "negative": self.negative_scores.summary(),
                "rows_with_a_negative_above_a_positive": (
                    self.rows_with_a_negative_above_a_positive
                ),
            }
        if self.token_counter is not None:
            queries_truncated = self.query_tokens.count_above(settings.query_max_len)
            passages_truncated = self.passage_tokens.count_above(settings.passage_max_len)
            statistics["tokens"] = {
                "tokenizer": self.token_counter.name,
                "rows_tokenized": self.rows_tokenized,
                "query_max_len": settings.query_max_len,
                "passage_max_len": settings.passage_max_len,
                "query": self.query_tokens.summary(),
                "passage": self.passage_tokens.summary(),
                "queries_truncated": _share(queries_truncated, self.query_tokens.total),
                "passages_truncated": _share(passages_truncated, self.passage_tokens.total),
            }
        report.statistics = statistics
        report.duplicate_detection = {
            "method": "64-bit fingerprints",
            "tracked_rows": self.rows_seen.size,
            "tracked_queries": self.queries_seen.size,
            "limit": settings.max_tracked_rows,
            "complete": self.rows_seen.complete and self.queries_seen.complete,
        }


def _short(text: str, limit: int = 40) -> str:
    # Keys are user data of any length; reports keep them short so memory stays bounded.
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _share(count: int, total: int) -> dict[str, Any]:
    return {"count": count, "share": round(count / total, 4) if total else 0.0}


class _ValidateOptions(BaseModel):
    """The checked options of :func:`validate_dataset`."""

    neg_nums: int | None = Field(default=None, ge=0)
    loss: Literal["contrastive", "kl", "contrastive+kl"] | None = None
    batch_size: int | None = Field(default=None, ge=1)
    query_max_len: int = Field(ge=2)
    passage_max_len: int = Field(ge=2)
    max_line_bytes: int = Field(ge=1)
    sample_limit: int = Field(ge=0)
    max_tracked_rows: int = Field(ge=1)
    token_rows: int | None = Field(default=None, ge=1)


def validate_dataset(
    path: str | os.PathLike[str],
    *,
    neg_nums: int | None = None,
    eval_path: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    query_max_len: int = defaults.QUERY_MAX_LEN,
    passage_max_len: int = defaults.PASSAGE_MAX_LEN,
    batch_size: int | None = None,
    require_negatives: bool | None = None,
    loss: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    sample_limit: int = DEFAULT_SAMPLE_LIMIT,
    max_tracked_rows: int = DEFAULT_MAX_TRACKED_ROWS,
    token_rows: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ValidationReport:
    """Check a training file (and an eval file) completely, in one streaming pass each.

    Args:
        path: the training jsonl file.
        neg_nums: hard negatives per example in training; rows with fewer get a warning
            (resampled with repetition). 0 means no hard negatives.
        eval_path: an eval jsonl file: checked the same way, and its queries and positives are
            looked up in the training file (leaks are warnings on the eval file's lines).
        tokenizer: a tokenizer object, a local directory or a hub id: adds token lengths and the
            share of texts longer than ``query_max_len`` / ``passage_max_len`` (in tokens,
            CLS and SEP included) that training would truncate.
        batch_size: examples per optimizer step on one process, for ``steps_per_epoch``.
        require_negatives: whether a row needs a non-empty ``neg``; default: unless
            ``neg_nums == 0``.
        loss: the training loss the file is for. ``kl`` and ``contrastive+kl`` require teacher
            scores on every row; ``contrastive`` refuses graded rows (no ``neg``: the
            distillation form); None accepts both forms and requires no scores.
        max_line_bytes: longer lines are errors (and never held in memory whole).
        sample_limit: sample problems kept per kind (the rest are only counted).
        max_tracked_rows: distinct rows and queries remembered for duplicate detection.
        token_rows: tokenize only the first N valid rows of each file (None: all).
        progress: called with the number of bytes read after each chunk.

    Raises:
        UsageError: a file is missing or a setting is invalid (the command cannot run).
    """
    validate_options(
        _ValidateOptions,
        neg_nums=neg_nums,
        loss=loss,
        batch_size=batch_size,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        max_line_bytes=max_line_bytes,
        sample_limit=sample_limit,
        max_tracked_rows=max_tracked_rows,
        token_rows=token_rows,
    )
    if require_negatives is None:
        require_negatives = neg_nums != 0
    paths = [Path(path)] + ([Path(eval_path)] if eval_path is not None else [])
    for candidate in paths:
        open_data_file(candidate).close()  # a missing file fails before any work

    token_counter = None
    tokenizer_name = None
    if tokenizer is not None:
        loaded, tokenizer_name = load_tokenizer(tokenizer)
        token_counter = TokenCounter(loaded, tokenizer_name)

    rules = (
        RowRules(require_negatives=require_negatives)
        if loss is None
        else RowRules.for_training(loss, 1 if require_negatives else 0)
    )
    settings = _Settings(
        neg_nums=neg_nums,
        rules=rules,
        max_line_bytes=max_line_bytes,
        sample_limit=sample_limit,
        max_tracked_rows=max_tracked_rows,
        token_rows=token_rows,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        batch_size=batch_size,
    )
    files: list[FileReport] = []
    eval_index = None
    eval_report = None
    if eval_path is not None:
        # The eval file first: its queries and positives are then looked up while training
        # rows stream past, so the (usually much larger) training file is never indexed.
        eval_index = _EvalIndex(max_tracked_rows)
        eval_scan = _FileScan(
            "eval", Path(eval_path), settings, token_counter, build_eval_index=eval_index
        )
        eval_report = eval_scan.run(progress)
    train_scan = _FileScan(
        "train", Path(path), settings, token_counter, eval_index=eval_index, eval_report=eval_report
    )
    files.append(train_scan.run(progress))
    if eval_report is not None:
        files.append(eval_report)

    notes = []
    if neg_nums == 0:
        notes.append(
            "neg_nums 0: training then has no hard negatives and needs "
            "other_positives_as_negatives: true (the batch's other positives) and batch_size >= 2"
        )
    for report in files:
        if not report.duplicate_detection["complete"]:
            notes.append(
                f"{report.path}: more than {max_tracked_rows:,} distinct rows or queries; "
                "duplicates of rows past that point were not looked for (raise max_tracked_rows)"
            )
    if eval_index is not None and not (
        eval_index.queries.complete and eval_index.positives.complete
    ):
        notes.append(f"{eval_path}: only the first {max_tracked_rows:,} eval texts were looked up")
    if token_counter is not None and token_rows is not None:
        notes.append(f"token statistics cover the first {token_rows:,} valid rows of each file")

    return ValidationReport(
        files=files,
        settings={
            "neg_nums": neg_nums,
            "require_negatives": require_negatives,
            "loss": loss,
            "batch_size": batch_size,
            "tokenizer": tokenizer_name,
            "query_max_len": query_max_len,
            "passage_max_len": passage_max_len,
            "max_line_bytes": max_line_bytes,
            "sample_limit": sample_limit,
            "max_tracked_rows": max_tracked_rows,
            "token_rows": token_rows,
        },
        notes=notes,
    )


def describe_kinds() -> Iterable[tuple[str, str, str]]:
    """(severity, kind, description) for every problem kind, for documentation."""
    for kind, description in ERROR_KINDS.items():
        yield "error", kind, description
    for kind, description in WARNING_KINDS.items():
        yield "warning", kind, description
