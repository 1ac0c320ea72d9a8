"""Training data: the row schema, the streaming jsonl reader and negative sampling.

One JSON object a line::

    {"query": str, "pos": [str, ...], "neg": [str, ...]}

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


class TrainingRow(BaseModel):
    """One training row: a query, its positives and its hard negatives.

    Strict types: a string where a list is expected is an error (never split into characters),
    numbers are not texts. Extra keys are allowed and kept in ``model_extra`` (the validator
    reports them). Validation context ``{"require_negatives": False}`` makes ``neg`` optional
    and allows it to be empty.
    """

    model_config = ConfigDict(strict=True, extra="allow")

    query: Text
    pos: list[Text] = Field(min_length=1)
    neg: list[Text]

    @model_validator(mode="before")
    @classmethod
    def _negatives_optional(cls, data: Any, info: ValidationInfo) -> Any:
        if not _require_negatives(info) and isinstance(data, dict) and "neg" not in data:
            return {**data, "neg": []}
        return data

    @model_validator(mode="after")
    def _negatives_present(self, info: ValidationInfo) -> TrainingRow:
        if _require_negatives(info) and not self.neg:
            raise PydanticCustomError(
                "empty_neg", "neg is empty but hard negatives are configured (neg_nums > 0)"
            )
        return self


def _require_negatives(info: ValidationInfo) -> bool:
    context = info.context or {}
    return bool(context.get("require_negatives", True))


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


def fast_row_is_valid(obj: Any, require_negatives: bool = True) -> bool:
    """True when ``obj`` is certainly a valid row, looking at exact Python types only.

    It mirrors :class:`TrainingRow` for objects that come out of ``json.loads`` of text without
    surrogate escapes. False means "ask the schema", not "invalid".
    """
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
    if "neg" not in obj:
        return not require_negatives
    negatives = obj["neg"]
    if type(negatives) is not list or (require_negatives and not negatives):
        return False
    for text in negatives:  # noqa: SIM110 - a plain loop is the fastest form here
        if type(text) is not str or not text or text.isspace():
            return False
    return True


def schema_problems(obj: Any, require_negatives: bool = True) -> list[RowProblem]:
    """The schema's verdict on ``obj`` as problems grouped by kind (empty: the row is valid)."""
    try:
        TrainingRow.model_validate(obj, context={"require_negatives": require_negatives})
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
    if kind == "model_type":
        if isinstance(value, list):
            return "not_object", (
                "the line is a JSON array, not an object: write JSON Lines, one object a line "
                "(e.g. jq -c '.[]' on a JSON array file)"
            )
        return "not_object", f"the line is {_type_name(value)}, not a JSON object"
    if kind == "missing":
        return "missing_field", f"{where} is missing"
    if kind == "list_type":
        if isinstance(value, str):
            return "wrong_type", (f'{where} is a string, not a list of strings (wrap it: ["..."])')
        return "wrong_type", f"{where} must be a list of strings, not {_type_name(value)}"
    if kind == "string_type":
        return "wrong_type", f"{where} must be a string, not {_type_name(value)}"
    if kind == "blank_text":
        return "empty_text", f"{where} is empty or whitespace-only"
    if kind == "invalid_text":
        return "invalid_utf8", f"{where} holds a lone surrogate escape, not valid Unicode"
    if kind == "too_short" and loc == ("pos",):
        return "empty_pos", "pos is an empty list (a row needs at least one positive)"
    if kind == "empty_neg":
        return "empty_neg", "neg is empty but hard negatives are configured (neg_nums > 0)"
    return "wrong_type", f"{where}: {detail['msg']}"  # pragma: no cover - unforeseen schema error


def check_row(
    obj: Any, require_negatives: bool = True, maybe_surrogates: bool = True
) -> list[RowProblem]:
    """Problems of a parsed JSON value as a training row (an empty list: valid).

    ``maybe_surrogates=False`` promises the value came from text without ``\\ud800``-style
    escapes, which lets the fast path skip the Unicode check.
    """
    if not maybe_surrogates and fast_row_is_valid(obj, require_negatives):
        return []
    return schema_problems(obj, require_negatives)


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
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[tuple[int, TrainingRow]]:
    """Stream ``(line_number, row)`` from a jsonl training file.

    Blank lines, a BOM and CRLF line ends are skipped quietly. The first invalid line raises
    :class:`~colbertkit.errors.InputError` naming the file, the line, the problem and the command
    that lists every problem. A missing file raises :class:`~colbertkit.errors.UsageError`.
    """
    fix = f"run `colbertkit validate-data {path}` for the full report"
    with open_data_file(path) as file:
        for line_number, raw in iter_raw_lines(file, max_line_bytes):
            parsed = parse_line(raw, max_line_bytes)
            if parsed.blank:
                continue
            problems = (
                [parsed.problem]
                if parsed.problem
                else check_row(parsed.value, require_negatives, parsed.maybe_surrogates)
            )
            if problems:
                raise InputError(path, line_number, problems[0].message, fix)
            value = parsed.value
            if len(value) == 3 and "neg" in value:
                # Already proven valid: build the model without validating it a second time.
                row = TrainingRow.model_construct(
                    query=value["query"], pos=value["pos"], neg=value["neg"]
                )
            else:  # extra keys (kept in model_extra) or an optional neg left out: rare
                row = TrainingRow.model_validate(
                    value, context={"require_negatives": require_negatives}
                )
            yield line_number, row


# --------------------------------------------------------------------------------------------
# Negative sampling (DESIGN.md)
# --------------------------------------------------------------------------------------------


def repeats_needed(available: int, neg_nums: int) -> int:
    """How many times the reference rule repeats a list of ``available`` negatives."""
    return 1 if available >= neg_nums else math.ceil(neg_nums / available)


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
    pool = list(negatives) * repeats_needed(len(negatives), neg_nums)
    return generator.sample(pool, neg_nums)


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
