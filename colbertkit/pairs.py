"""Reading ``query<TAB>passage`` (or ``qid<TAB>query<TAB>pid<TAB>passage``) pair files.

The whole input is checked before any scoring starts, so a bad line at the end of a large file
stops the command before it has printed or written a single score. Standard input is spooled
to a temporary file during that check and read again from there.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from colbertkit.errors import InputError, UsageError

FORMAT_FIX = "write query<TAB>passage or qid<TAB>query<TAB>pid<TAB>passage"


@dataclass(frozen=True)
class Pair:
    line: int
    query: str
    passage: str
    qid: str | None = None
    pid: str | None = None
    offset: int = 0  # byte offset of the line in the file: read it again with PairsInput.at


@dataclass(frozen=True)
class PairsInput:
    """A checked pairs file, ready to be streamed (again) by :meth:`pairs`."""

    path: Path
    name: str  # as the user wrote it, for messages ("-" is "<stdin>")
    count: int
    has_ids: bool
    temporary: bool = False
    grouped: bool = True  # every qid's lines are contiguous (always true without ids)

    def pairs(self) -> Iterator[Pair]:
        with open(self.path, "rb") as handle:
            yield from parse_pairs(handle, self.name)

    def at(self, positions: Iterable[tuple[int, int]]) -> Iterator[Pair]:
        """Pairs read again from the file at ``(offset, line)`` positions, in the order given."""
        with open(self.path, "rb") as handle:
            for offset, line in positions:
                handle.seek(offset)
                raw = handle.readline()
                (pair,) = parse_pairs([raw], self.name, first_line=line, offset=offset)
                yield pair

    def close(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


def parse_pairs(
    lines: Iterable[bytes], name: str, *, first_line: int = 1, offset: int = 0
) -> Iterator[Pair]:
    """Parse raw lines; raise :class:`InputError` with the line number on the first bad one.

    Empty lines are skipped; a UTF-8 BOM and CRLF line ends are accepted.
    """
    columns: int | None = None
    for number, raw in enumerate(lines, start=first_line):
        start, offset = offset, offset + len(raw)
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw:
            continue
        if b"\x00" in raw:
            raise InputError(
                name, number, "holds NUL bytes: this looks like a binary file", FORMAT_FIX
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(
                name, number, f"invalid UTF-8 at byte {error.start}", "save the file as UTF-8"
            ) from None
        fields = text.split("\t")
        if len(fields) not in (2, 4):
            raise InputError(
                name,
                number,
                f"expected 2 or 4 tab-separated columns, found {len(fields)}",
                FORMAT_FIX,
            )
        if columns is None:
            columns = len(fields)
        elif len(fields) != columns:
            raise InputError(
                name,
                number,
                f"{len(fields)} columns, but the file started with {columns}",
                "use one format for the whole file",
            )
        if columns == 2:
            query, passage = fields
            qid = pid = None
        else:
            qid, query, pid, passage = fields
            for label, value in (("qid", qid), ("pid", pid)):
                if not value.strip():
                    raise InputError(name, number, f"empty {label}", FORMAT_FIX)
        for label, value in (("query", query), ("passage", passage)):
            if not value.strip():
                raise InputError(name, number, f"empty {label}", FORMAT_FIX)
        yield Pair(number, query, passage, qid, pid, start)


def open_pairs(spec: str | os.PathLike[str]) -> PairsInput:
    """Check a pairs file (``-`` for standard input) from end to end; see module doc."""
    if str(spec) == "-":
        return _spool_stdin()
    path = Path(spec)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; expected a pairs file ({FORMAT_FIX})")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with open(path, "rb") as handle:
        count, has_ids, grouped = _check(handle, str(path))
    return PairsInput(path, str(path), count, has_ids, grouped=grouped)


def _check(lines: Iterable[bytes], name: str) -> tuple[int, bool, bool]:
    """(pairs, whether they have ids, whether each qid's lines are contiguous)."""
    count = 0
    has_ids = False
    grouped, previous, finished = True, None, set()
    for pair in parse_pairs(lines, name):
        count += 1
        has_ids = pair.qid is not None
        if has_ids and pair.qid != previous:
            if pair.qid in finished:
                grouped = False
            if previous is not None:
                finished.add(previous)
            previous = pair.qid
    if count == 0:
        raise InputError(name, None, "no pairs", FORMAT_FIX)
    return count, has_ids, grouped


def _spool_stdin() -> PairsInput:
    handle, name = tempfile.mkstemp(prefix="colbertkit-stdin-", suffix=".tsv")
    spool = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            stream: BinaryIO = sys.stdin.buffer
            shutil.copyfileobj(stream, out)
        with open(spool, "rb") as lines:
            count, has_ids, grouped = _check(lines, "<stdin>")
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    return PairsInput(spool, "<stdin>", count, has_ids, temporary=True, grouped=grouped)
