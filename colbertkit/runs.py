"""Reading relevance judgements (qrels) and scores made elsewhere (run files).

**Qrels**, one judgement a line, tab- or space-separated:

* ``qid<TAB>pid<TAB>grade`` (BEIR's ``qrels/*.tsv``; a first line whose grade is not a number,
  like BEIR's ``query-id corpus-id score`` header, is skipped), or
* ``qid 0 pid grade`` (TREC; the second column, the iteration, is ignored).

Grades are integers: 0 (or below) is judged not relevant, 1, 2, ... relevant with that gain.

**Scores**, one (query, passage) score a line; the format is detected from the first line:

* ``qid<TAB>pid<TAB>score`` (3 columns; a header line whose score is not a number is skipped),
* what ``colbertkit score`` writes for 4-column pairs: ``qid query pid passage score``
  (5 tab-separated columns) or, with ``--rank``, ``qid query pid passage rank score`` (6),
* a TREC run, ``qid Q0 pid rank score tag`` (6 columns; the second one is ``Q0`` or ``0``;
  ranks are ignored, scores decide the order),
* JSON lines with ``qid``, ``pid`` and ``score`` keys (``colbertkit score --format jsonl``).

Empty lines, a UTF-8 BOM and CRLF line ends are accepted. Each problem is an
:class:`~colbertkit.errors.InputError` naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from colbertkit.errors import InputError, UsageError

QRELS_FIX = "write qid<TAB>pid<TAB>grade or 'qid 0 pid grade' lines with integer grades"
SCORES_FIX = (
    "write qid<TAB>pid<TAB>score, the TSV of `colbertkit score` on 4-column pairs, "
    "or a TREC run 'qid Q0 pid rank score tag'"
)


@dataclass
class Qrels:
    """``judgements[qid][pid] = grade``, queries in file order."""

    path: str
    judgements: dict[str, dict[str, int]]

    def relevant_count(self, qid: str) -> int:
        return sum(1 for grade in self.judgements.get(qid, {}).values() if grade > 0)


@dataclass
class Run:
    """``scores[qid][pid] = score``, queries in first-seen order, with where each query starts."""

    path: str
    scores: dict[str, dict[str, float]]
    first_line: dict[str, int] = field(default_factory=dict)  # for messages about a query
    format: str = ""  # the detected layout, in words


def _lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-empty line; UTF-8 with an optional BOM."""
    name = str(path)
    if not Path(path).is_file():
        raise UsageError(f"{name}: no such file")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(
                    name, number, f"invalid UTF-8 at byte {error.start}", "save the file as UTF-8"
                ) from None


def _split(text: str) -> list[str]:
    # Texts (queries, passages) hold spaces, so a line with tabs splits on tabs only.
    return text.split("\t") if "\t" in text else text.split()


def _integer(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def read_qrels(path: str | os.PathLike[str]) -> Qrels:
    """Read a qrels file; see the module doc for the formats."""
    name = str(path)
    judgements: dict[str, dict[str, int]] = {}
    seen_on: dict[tuple[str, str], int] = {}
    columns: int | None = None
    for number, text in _lines(path):
        fields = _split(text)
        if len(fields) not in (3, 4):
            raise InputError(
                name, number, f"expected 3 or 4 columns, found {len(fields)}", QRELS_FIX
            )
        if columns is not None and len(fields) != columns:
            raise InputError(
                name,
                number,
                f"{len(fields)} columns, but the file started with {columns}",
                "use one format for the whole file",
            )
        qid, pid, grade_text = (
            (fields[0], fields[1], fields[2])
            if len(fields) == 3
            else (fields[0], fields[2], fields[3])
        )
        grade = _integer(grade_text)
        if grade is None:
            if columns is None and _number(grade_text) is None:
                columns = len(fields)
                continue  # a header line, e.g. BEIR's "query-id corpus-id score"
            raise InputError(name, number, f"grade {grade_text!r} is not an integer", QRELS_FIX)
        columns = len(fields)
        if not qid or not pid:
            raise InputError(name, number, "empty qid or pid", QRELS_FIX)
        previous = judgements.setdefault(qid, {}).get(pid)
        if previous is not None and previous != grade:
            raise InputError(
                name,
                number,
                f"{qid}/{pid} is graded {grade} here but {previous} on line {seen_on[qid, pid]}",
                "keep one grade per query and passage",
            )
        judgements[qid][pid] = grade
        seen_on.setdefault((qid, pid), number)
    if not judgements:
        raise InputError(name, None, "no judgements", QRELS_FIX)
    return Qrels(name, judgements)


# layout name -> (number of fields, index of qid, pid, score)
_TABLE_LAYOUTS = {
    "qid pid score": (3, 0, 1, 2),
    "colbertkit score TSV": (5, 0, 2, 4),
    "colbertkit score --rank TSV": (6, 0, 2, 5),
    "TREC run": (6, 0, 2, 4),
}


def _detect_layout(fields: list[str]) -> str | None:
    if len(fields) == 3:
        return "qid pid score"
    if len(fields) == 5:
        return "colbertkit score TSV"
    if len(fields) == 6:
        # A TREC run's second column is the literal Q0 (some tools write 0).
        return "TREC run" if fields[1] in ("Q0", "q0", "0") else "colbertkit score --rank TSV"
    return None


def read_run(path: str | os.PathLike[str]) -> Run:
    """Read a scores file; see the module doc for the formats it detects."""
    name = str(path)
    run = Run(name, {})
    seen_on: dict[tuple[str, str], int] = {}
    layout: str | None = None
    for number, text in _lines(path):
        if layout is None and text.lstrip().startswith("{"):
            layout = "JSON lines"
        if layout == "JSON lines":
            qid, pid, score = _json_record(name, number, text)
        else:
            fields = _split(text)
            if layout is None:
                layout = _detect_layout(fields)
                if layout is None:
                    raise InputError(
                        name, number, f"{len(fields)} columns, a layout I do not know", SCORES_FIX
                    )
                width, *_ = _TABLE_LAYOUTS[layout]
                if layout == "qid pid score" and _number(fields[2]) is None:
                    continue  # a header line, e.g. "qid pid score"
            width, qid_at, pid_at, score_at = _TABLE_LAYOUTS[layout]
            if len(fields) != width:
                raise InputError(
                    name,
                    number,
                    f"{len(fields)} columns, but the file started as a {layout} ({width})",
                    "use one format for the whole file",
                )
            qid, pid = fields[qid_at], fields[pid_at]
            score = _number(fields[score_at])
            if score is None:
                raise InputError(
                    name,
                    number,
                    f"score {fields[score_at]!r} is not a finite number ({layout} layout)",
                    SCORES_FIX,
                )
        if not qid.strip() or not pid.strip():
            raise InputError(name, number, "empty qid or pid", SCORES_FIX)
        key = (qid, pid)
        if key in seen_on:
            raise InputError(
                name,
                number,
                f"{qid}/{pid} is scored twice (first on line {seen_on[key]})",
                "keep one line per query and passage",
            )
        seen_on[key] = number
        run.scores.setdefault(qid, {})[pid] = score
        run.first_line.setdefault(qid, number)
    if not run.scores:
        raise InputError(name, None, "no scores", SCORES_FIX)
    run.format = layout or ""
    return run


def _json_record(name: str, number: int, text: str) -> tuple[str, str, float]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(name, number, f"invalid JSON ({error.msg})", SCORES_FIX) from None
    if not isinstance(record, dict) or not {"qid", "pid", "score"} <= record.keys():
        raise InputError(
            name,
            number,
            "a JSON line needs qid, pid and score keys",
            "score 4-column pairs with `colbertkit score --format jsonl`",
        )
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise InputError(name, number, f"score {score!r} is not a finite number", SCORES_FIX)
    return str(record["qid"]), str(record["pid"]), float(score)
