"""Training data: the row schema, the streaming jsonl reader and negative sampling.

One JSON object a line::

    {"query": str, "pos": [str, ...], "neg": [str, ...]}

Rows may carry teacher scores for distillation, aligned with the lists: ``pos_scores`` with
``pos``, ``neg_scores`` with ``neg`` (finite numbers on the teacher's scale). RAG-Retrieval's
distillation form ``{"query", "pos": [...], "pos_scores": [...]}`` has no ``neg``: every passage
is graded (a *graded row*; :func:`colbertkit.collate.build_examples` says how it becomes an
example).

:class:`TrainingRow` is the one definition of a valid row. The reader (:func:`read_training_rows`,
used by ``train``) and the data doctor (:func:`colbertkit.validation.validate_dataset`, behind
``colbertkit validate-data``) both go through :func:`check_row`, so they reject exactly the same
rows. :func:`check_row` first tries a fast path that only looks at Python types; any row the fast
path does not accept is judged by the pydantic schema itself (tests prove the two agree).

Line-level rules shared by both: blank lines, a UTF-8 byte order mark and CRLF line ends are
tolerated (the validator warns about them); invalid UTF-8, invalid JSON and lines longer than
``max_line_bytes`` are errors.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from colbertkit.errors import ColbertkitError, InputError, UsageError

REQUIRED_KEYS = ("query", "pos", "neg")
BOM = b"\xef\xbb\xbf"
# A reference row (query, 2 positives, 15 negatives of ~500 CJK characters) is ~25 KB.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
_READ_CHUNK_BYTES = 1 << 18  # 256 KiB: as fast as larger reads, less peak memory


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


def _check_text(text: str) -> str:
    # Python's own notion of whitespace (str.isspace), so the fast path can use the same test.
    if not text or text.isspace():
        raise PydanticCustomError("blank_text", "empty or whitespace-only text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "invalid_text", "text holds a lone surrogate escape (\\ud800-\\udfff), not Unicode"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_check_text)]
# A teacher score: any finite number (an int is read as a float; a boolean is not a number).
Score = Annotated[float, Field(allow_inf_nan=False)]
SCORE_KEYS = ("pos_scores", "neg_scores")


class TrainingRow(BaseModel):
    """One training row: a query, its positives, its hard negatives and optional teacher scores.

    Strict types: a string where a list is expected is an error (never split into characters),
    numbers are not texts. Extra keys are allowed and kept in ``model_extra`` (the validator
    reports them). ``pos_scores`` / ``neg_scores``, when present, hold one finite number per
    passage of ``pos`` / ``neg``.

    Validation context (:class:`RowRules` as a dict):

    * ``require_negatives`` (default True): ``neg`` must be present and non-empty - except for a
      *graded row* (no ``neg`` key, ``pos_scores`` present, at least two passages) when
      ``allow_graded`` is also true. False makes ``neg`` optional and allows it to be empty.
    * ``allow_graded`` (default True): accept graded rows (the distillation form).
    * ``require_scores`` (default False): every passage needs a teacher score.
    """

    model_config = ConfigDict(strict=True, extra="allow")

    query: Text
    pos: list[Text] = Field(min_length=1)
    neg: list[Text]
    pos_scores: list[Score] | None = None
    neg_scores: list[Score] | None = None

    @model_validator(mode="before")
    @classmethod
    def _negatives_optional(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and "neg" not in data:
            rules = _rules(info)
            if not rules.require_negatives or (rules.allow_graded and "pos_scores" in data):
                return {**data, "neg": []}
        return data

    @model_validator(mode="after")
    def _negatives_and_scores(self, info: ValidationInfo) -> TrainingRow:
        rules = _rules(info)
        for texts, scores, name in (
            (self.pos, self.pos_scores, "pos"),
            (self.neg, self.neg_scores, "neg"),
        ):
            if scores is not None and len(scores) != len(texts):
                raise PydanticCustomError(
                    "scores_mismatch",
                    "{name}_scores holds {scores} values but {name} has {texts} passages; give "
                    "one score per passage, in the same order",
                    {"name": name, "scores": len(scores), "texts": len(texts)},
                )
        if rules.require_scores and (
            self.pos_scores is None or (self.neg and self.neg_scores is None)
        ):
            missing = "pos_scores" if self.pos_scores is None else "neg_scores"
            raise PydanticCustomError(
                "missing_scores", "{missing} is missing but the loss distils teacher scores",
                {"missing": missing},
            )  # fmt: skip
        if rules.require_negatives and not self.neg:
            if self.is_graded and rules.allow_graded:
                if len(self.pos) < 2:
                    raise PydanticCustomError(
                        "empty_neg", "a graded row (no neg) needs at least two passages in pos"
                    )
            else:
                raise PydanticCustomError(
                    "empty_neg", "neg is empty but hard negatives are configured (neg_nums > 0)"
                )
        return self

    @property
    def is_graded(self) -> bool:
        """The distillation form: no negatives, every passage of ``pos`` graded by a teacher."""
        return not self.neg and self.pos_scores is not None


@dataclass(frozen=True)
class RowRules:
    """What a valid row must hold for one use; passed as the schema's validation context."""

    require_negatives: bool = True
    allow_graded: bool = True
    require_scores: bool = False

    @classmethod
    def for_training(cls, loss: str, neg_nums: int) -> RowRules:
        """The rules of a training run with this ``loss`` and ``neg_nums``.

        Teacher scores are required when the loss distils them; graded rows (no ``neg``) are
        accepted only then (a contrastive loss would treat every other graded passage,
        relevant or not, as a negative).
        """
        distils = loss != "contrastive"
        return cls(require_negatives=neg_nums > 0, allow_graded=distils, require_scores=distils)

    def context(self) -> dict[str, bool]:
        return {
            "require_negatives": self.require_negatives,
            "allow_graded": self.allow_graded,
            "require_scores": self.require_scores,
        }


def _rules(info: ValidationInfo) -> RowRules:
    context = info.context or {}
    return RowRules(
        require_negatives=bool(context.get("require_negatives", True)),
        allow_graded=bool(context.get("allow_graded", True)),
        require_scores=bool(context.get("require_scores", False)),
    )


# --------------------------------------------------------------------------------------------
# Judging one row
# --------------------------------------------------------------------------------------------

# Error kinds a row can have (stable names, used in reports and JSON).
ERROR_KINDS: dict[str, str] = {
    "line_too_long": "a line longer than the size limit",
    "invalid_utf8": "bytes that are not UTF-8, or a \\ud800-\\udfff escape that is not Unicode",
    "invalid_json": "not a JSON value",
    "not_object": "JSON, but not an object",
    "missing_field": "query, pos or neg is missing",
    "wrong_type": "a field has the wrong type (a string where a list is expected, a number...)",
    "empty_text": "an empty or whitespace-only text",
    "empty_pos": "pos is an empty list",
    "empty_neg": "neg is empty while hard negatives are configured",
    "invalid_score": "a teacher score that is not a finite number",
    "scores_mismatch": "pos_scores / neg_scores not one number per passage of pos / neg",
    "missing_scores": "no teacher scores while the loss distils them",
    "no_rows": "the file has no rows at all",
}


@dataclass(frozen=True)
class RowProblem:
    """One error kind found on one line; ``message`` names the fields involved."""

    kind: str
    message: str


def _type_name(value: Any) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, bool):
        return names[bool]
    if isinstance(value, (int, float)):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "row"


def as_rules(rules: RowRules | bool) -> RowRules:
    """``RowRules`` as given, or from a bool meaning ``require_negatives``."""
    return rules if isinstance(rules, RowRules) else RowRules(require_negatives=bool(rules))


_LARGEST_EXACT_INT = 1 << 53


def _fast_scores_are_valid(scores: Any, count: int) -> bool:
    if scores is None:
        return True
    if type(scores) is not list or len(scores) != count:
        return False
    for score in scores:
        kind = type(score)
        if kind is float:
            if not math.isfinite(score):
                return False
        elif kind is not int or not -_LARGEST_EXACT_INT <= score <= _LARGEST_EXACT_INT:
            return False  # booleans, texts, ... and ints too large for a float: ask the schema
    return True


def fast_row_is_valid(obj: Any, rules: RowRules | bool = True) -> bool:
    """True when ``obj`` is certainly a valid row, looking at exact Python types only.

    It mirrors :class:`TrainingRow` for objects that come out of ``json.loads`` of text without
    surrogate escapes. False means "ask the schema", not "invalid".
    """
    rules = as_rules(rules)
    if type(obj) is not dict:
        return False
    query = obj.get("query")
    if type(query) is not str or not query or query.isspace():
        return False
    positives = obj.get("pos")
    if type(positives) is not list or not positives:
        return False
    for text in positives:
        if type(text) is not str or not text or text.isspace():
            return False
    positive_scores = obj.get("pos_scores")
    if not _fast_scores_are_valid(positive_scores, len(positives)):
        return False
    negatives = obj.get("neg", [])
    if type(negatives) is not list:
        return False
    negative_scores = obj.get("neg_scores")
    if not _fast_scores_are_valid(negative_scores, len(negatives)):
        return False
    if rules.require_scores and (
        positive_scores is None or (negatives and negative_scores is None)
    ):
        return False
    graded = rules.allow_graded and positive_scores is not None and len(positives) >= 2
    if rules.require_negatives and not negatives and not graded:
        return False  # only a graded row may have no negatives
    for text in negatives:  # noqa: SIM110 - a plain loop is the fastest form here
        if type(text) is not str or not text or text.isspace():
            return False
    return True


def schema_problems(obj: Any, rules: RowRules | bool = True) -> list[RowProblem]:
    """The schema's verdict on ``obj`` as problems grouped by kind (empty: the row is valid)."""
    try:
        TrainingRow.model_validate(obj, context=as_rules(rules).context())
    except ValidationError as error:
        return _problems_from(error, obj)
    return []


def _problems_from(error: ValidationError, obj: Any) -> list[RowProblem]:
    grouped: dict[str, list[str]] = {}
    for detail in error.errors(include_url=False):
        kind, message = _describe(detail, obj)
        grouped.setdefault(kind, []).append(message)
    problems = []
    for kind, messages in grouped.items():
        shown = "; ".join(messages[:3])
        if len(messages) > 3:
            shown += f"; and {len(messages) - 3} more"
        problems.append(RowProblem(kind, shown))
    return problems


def _describe(detail: Any, obj: Any) -> tuple[str, str]:
    kind = detail["type"]
    loc = tuple(detail["loc"])
    where = _location(loc)
    value = detail.get("input")
    if loc and loc[0] in SCORE_KEYS and kind != "list_type":
        if kind == "finite_number" or (isinstance(value, int) and not isinstance(value, bool)):
            shown = repr(value) if len(repr(value)) <= 20 else f"{repr(value)[:17]}..."
            return "invalid_score", f"{where} is {shown}, not a finite number"
        return "invalid_score", f"{where} must be a number, not {_type_name(value)}"
    if kind in ("scores_mismatch", "missing_scores"):
        return kind, detail["msg"]
    if kind == "model_type":
        if isinstance(value, list):
            return "not_object", (
                "the line is a JSON array, not an object: write JSON Lines, one object a line "
                "(e.g. jq -c '.[]' on a JSON array file)"
            )
        return "not_object", f"the line is {_type_name(value)}, not a JSON object"
    if kind == "missing":
        if loc == ("neg",) and isinstance(obj, dict) and "pos_scores" in obj:
            return "missing_field", (
                "neg is missing (a graded row without neg trains only with loss kl or "
                "contrastive+kl)"
            )
        return "missing_field", f"{where} is missing"
    if kind == "list_type":
        items = "numbers" if loc[0] in SCORE_KEYS else "strings"
        if isinstance(value, str):
            return "wrong_type", (f'{where} is a string, not a list of {items} (wrap it: ["..."])')
        return "wrong_type", f"{where} must be a list of {items}, not {_type_name(value)}"
    if kind == "string_type":
        return "wrong_type", f"{where} must be a string, not {_type_name(value)}"
    if kind == "blank_text":
        return "empty_text", f"{where} is empty or whitespace-only"
    if kind == "invalid_text":
        return "invalid_utf8", f"{where} holds a lone surrogate escape, not valid Unicode"
    if kind == "too_short" and loc == ("pos",):
        return "empty_pos", "pos is an empty list (a row needs at least one positive)"
    if kind == "empty_neg":
        return "empty_neg", detail["msg"]
    return "wrong_type", f"{where}: {detail['msg']}"  # pragma: no cover - unforeseen schema error


def check_row(
    obj: Any, rules: RowRules | bool = True, maybe_surrogates: bool = True
) -> list[RowProblem]:
    """Problems of a parsed JSON value as a training row (an empty list: valid).

    ``rules``: a :class:`RowRules`, or a bool meaning ``require_negatives``.
    ``maybe_surrogates=False`` promises the value came from text without ``\\ud800``-style
    escapes, which lets the fast path skip the Unicode check.
    """
    if not maybe_surrogates and fast_row_is_valid(obj, rules):
        return []
    return schema_problems(obj, rules)


# --------------------------------------------------------------------------------------------
# Reading lines
# --------------------------------------------------------------------------------------------

LINE_TOO_LONG = None  # what iter_raw_lines yields in place of an over-long line


def iter_raw_lines(
    file: Any, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_bytes: Any = None
) -> Iterator[tuple[int, bytes | None]]:
    """(line_number, bytes without the newline) for a binary file, 1-based.

    A line longer than ``max_line_bytes`` yields ``LINE_TOO_LONG`` (None) and is skipped without
    ever being held in memory whole. ``on_bytes(n)`` is called after each chunk is read.
    """
    line_number = 0
    pending = b""
    skipping = False  # inside an over-long line: drop bytes until the next newline
    while True:
        chunk = file.read(_READ_CHUNK_BYTES)
        if not chunk:
            break
        if on_bytes is not None:
            on_bytes(len(chunk))
        if skipping:
            cut = chunk.find(b"\n")
            if cut < 0:
                continue
            skipping = False
            line_number += 1
            yield line_number, LINE_TOO_LONG
            chunk = chunk[cut + 1 :]
        data = pending + chunk if pending else chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            line_number += 1
            yield line_number, (line if len(line) <= max_line_bytes else LINE_TOO_LONG)
        if len(pending) > max_line_bytes:
            pending = b""
            skipping = True
    if skipping:
        yield line_number + 1, LINE_TOO_LONG
    elif pending:
        yield line_number + 1, pending


@dataclass
class ParsedLine:
    """What the line layer found: the JSON value (if any) and line-level notes."""

    value: Any = None
    problem: RowProblem | None = None  # line_too_long / invalid_utf8 / invalid_json
    blank: bool = False
    bom: bool = False
    crlf: bool = False
    maybe_surrogates: bool = False


def parse_line(line: bytes | None, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> ParsedLine:
    """Decode one raw line (from :func:`iter_raw_lines`) into a JSON value or a problem."""
    if line is LINE_TOO_LONG:
        return ParsedLine(
            problem=RowProblem(
                "line_too_long",
                f"line longer than {max_line_bytes:,} bytes (the size limit; raise "
                "`max_line_bytes` if the row is meant to be that long)",
            )
        )
    parsed = ParsedLine()
    if line.endswith(b"\r"):
        parsed.crlf = True
        line = line[:-1]
    if line.startswith(BOM):
        parsed.bom = True
        line = line[3:]
    if not line or line.isspace():
        parsed.blank = True
        return parsed
    if b"\x00" in line:
        parsed.problem = RowProblem(
            "invalid_utf8",
            "the line holds NUL bytes: a binary file or UTF-16 text, not UTF-8 JSON Lines",
        )
        return parsed
    try:
        # Strict UTF-8 first: json.loads(bytes) would guess UTF-16/32 from the first bytes and
        # let encoded surrogates (ED A0 80) through.
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        parsed.problem = RowProblem(
            "invalid_utf8", f"byte {error.start + 1} of the line is not valid UTF-8"
        )
        return parsed
    try:
        parsed.value = json.loads(text)
    except ValueError as error:
        reason = getattr(error, "msg", str(error))
        column = getattr(error, "colno", None)
        at = f" at column {column}" if column is not None else ""
        hint = ""
        if line.strip() in (b"[", b"{"):
            hint = " (this looks like a pretty-printed JSON document: write one object per line)"
        parsed.problem = RowProblem("invalid_json", f"not valid JSON: {reason}{at}{hint}")
    else:
        # A lone-surrogate escape is the only way a valid UTF-8 line yields non-Unicode text.
        parsed.maybe_surrogates = b"\\ud" in line or b"\\uD" in line
    return parsed


def open_data_file(path: str | Path) -> Any:
    """A data file opened for binary reading; UsageError when it is missing or a directory."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; expected a .jsonl file")
    try:
        return path.open("rb")
    except OSError as error:
        raise UsageError(f"{path}: cannot open ({error.strerror or error})") from None


def read_training_rows(
    path: str | Path,
    *,
    require_negatives: bool = True,
    rules: RowRules | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[tuple[int, TrainingRow]]:
    """Stream ``(line_number, row)`` from a jsonl training file.

    ``rules`` (default: ``RowRules(require_negatives=require_negatives)``) says what a row must
    hold, e.g. :meth:`RowRules.for_training`. Blank lines, a BOM and CRLF line ends are skipped
    quietly. The first invalid line raises :class:`~colbertkit.errors.InputError` naming the
    file, the line, the problem and the fix. A missing file raises
    :class:`~colbertkit.errors.UsageError`.
    """
    rules = rules or RowRules(require_negatives=require_negatives)
    fix = f"run `colbertkit validate-data {path}` for the full report"
    with open_data_file(path) as file:
        for line_number, raw in iter_raw_lines(file, max_line_bytes):
            parsed = parse_line(raw, max_line_bytes)
            if parsed.blank:
                continue
            problems = (
                [parsed.problem]
                if parsed.problem
                else check_row(parsed.value, rules, parsed.maybe_surrogates)
            )
            if problems:
                problem = problems[0]
                raise InputError(path, line_number, problem.message, _FIXES.get(problem.kind, fix))
            value = parsed.value
            if value.keys() <= _ROW_FIELDS:
                # Already proven valid: build the model without validating it a second time.
                row = TrainingRow.model_construct(
                    query=value["query"],
                    pos=value["pos"],
                    neg=value.get("neg", []),
                    pos_scores=value.get("pos_scores"),
                    neg_scores=value.get("neg_scores"),
                )
            else:  # extra keys (kept in model_extra): rare
                row = TrainingRow.model_validate(value, context=rules.context())
            yield line_number, row


_ROW_FIELDS = frozenset(TrainingRow.model_fields)
_FIXES = {
    "missing_scores": "give every row pos_scores (and neg_scores) from a teacher, or train with "
    "loss: contrastive",
}


# --------------------------------------------------------------------------------------------
# Negative sampling (DESIGN.md)
# --------------------------------------------------------------------------------------------


def repeats_needed(available: int, neg_nums: int) -> int:
    """How many times the reference rule repeats a list of ``available`` negatives."""
    return 1 if available >= neg_nums else math.ceil(neg_nums / available)


def sample_negative_indices(available: int, neg_nums: int, generator: random.Random) -> list[int]:
    """Positions of the ``neg_nums`` negatives drawn from a list of ``available`` (the reference
    rule, see :func:`sample_negatives`). Indices, so teacher scores follow their passages."""
    pool = list(range(available)) * repeats_needed(available, neg_nums)
    return generator.sample(pool, neg_nums)


def sample_negatives(
    negatives: Sequence[str], neg_nums: int, generator: random.Random
) -> list[str]:
    """Draw ``neg_nums`` hard negatives for one training example (the reference rule).

    With at least ``neg_nums`` negatives, draw that many without replacement. With fewer, repeat
    the list ``ceil(neg_nums / len(negatives))`` times and draw ``neg_nums`` from that, so some
    negatives appear twice. ``generator`` makes the draw reproducible.
    """
    if neg_nums < 0:
        raise ValueError(f"neg_nums must be >= 0, got {neg_nums}")
    if neg_nums == 0:
        return []
    if not negatives:
        raise ColbertkitError(
            f"a row has no hard negatives but neg_nums is {neg_nums}; add negatives to every "
            "row or set neg_nums to 0 (see `colbertkit validate-data FILE`)"
        )
    return [negatives[i] for i in sample_negative_indices(len(negatives), neg_nums, generator)]


def expected_duplicates(available: int, neg_nums: int) -> float:
    """Expected repeated negatives in one draw of :func:`sample_negatives`.

    The pool holds each of ``available`` texts ``c`` times; ``neg_nums`` are drawn without
    replacement. A text is missed with probability ``C(N - c, k) / C(N, k)``, so the expected
    number of distinct texts drawn is ``available * (1 - that)`` and the rest are repeats.
    """
    if available <= 0 or available >= neg_nums:
        return 0.0
    copies = repeats_needed(available, neg_nums)
    pool = copies * available
    missed = math.comb(pool - copies, neg_nums) / math.comb(pool, neg_nums)
    return neg_nums - available * (1.0 - missed)


# --------------------------------------------------------------------------------------------
# Batches of an epoch
# --------------------------------------------------------------------------------------------


def process_batches(
    num_examples: int, batch_size: int, num_processes: int, process_index: int
) -> list[range]:
    """Index ranges of this process's batches in one epoch.

    Global batch g holds examples ``[g * B * W, (g + 1) * B * W)``; process r takes the r-th
    slice of B. The last, incomplete global batch is split evenly (every process must see the
    same number of examples, for gathering and for the collectives of a step); the at most
    ``W - 1`` examples left over are skipped this epoch (the next epoch reshuffles).
    """
    global_batch = batch_size * num_processes
    batches = []
    for start in range(0, num_examples - global_batch + 1, global_batch):
        begin = start + process_index * batch_size
        batches.append(range(begin, begin + batch_size))
    remainder = num_examples % global_batch
    share = remainder // num_processes
    if share:
        start = num_examples - remainder + process_index * share
        batches.append(range(start, start + share))
    return batches


def steps_per_epoch(
    num_examples: int, batch_size: int, num_processes: int = 1, accumulation: int = 1
) -> int:
    """Optimizer steps in one epoch: the engine's plan and ``validate-data`` both use this."""
    batches = len(process_batches(num_examples, batch_size, num_processes, 0))
    return math.ceil(batches / accumulation)
