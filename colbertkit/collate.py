"""Training examples, per-process batches and dynamic padding.

* :func:`epoch_examples` turns rows into examples (one per positive, ``neg_nums`` negatives by
  the reference rule; a graded row gives one example, see :func:`build_examples`) and shuffles
  them, all from a generator seeded by (seed, epoch): an epoch's examples are a pure function of
  the data, the seed and the epoch number, which is what makes resuming at "epoch e, batch b"
  exact. Negatives are drawn as indices, so teacher scores stay with their passages.
* :class:`Collator` tokenizes a batch without padding and carries, as tensors, what the loss
  needs besides the texts: the teacher scores of each query's passages and text fingerprints
  that tell which passages are positives of which query (in-batch masking, also across
  processes). :func:`length_sorted_chunks` then pads sequences in chunks of similar length, each
  to its own longest (rounded up to a multiple of 8 on GPU), instead of padding everything to
  ``passage_max_len``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from colbertkit.data import TrainingRow, sample_negative_indices
from colbertkit.errors import ColbertkitError


@dataclass(frozen=True)
class TrainingExample:
    """One query with one positive and its sampled hard negatives.

    ``teacher_scores``: the teacher's score of each passage, aligned with
    ``(positive, *negatives)``, or None when the row has none. ``query_positives``: every text
    that is a positive of this query in the data (all its rows), so no batch uses one of them as
    a negative for it.
    """

    query: str
    positive: str
    negatives: tuple[str, ...]
    teacher_scores: tuple[float, ...] | None = None
    query_positives: frozenset[str] = frozenset()

    @property
    def passages(self) -> tuple[str, ...]:
        return (self.positive, *self.negatives)


def epoch_generator(seed: int, epoch: int) -> random.Random:
    """The generator behind an epoch's negatives and order (independent of earlier epochs)."""
    return random.Random(seed * 1_000_003 + epoch)


def build_examples(
    rows: Sequence[TrainingRow],
    neg_nums: int,
    generator: random.Random,
    *,
    graded_rows: bool = True,
) -> list[TrainingExample]:
    """The examples of ``rows`` in file order, negatives drawn from ``generator``.

    * A row with negatives gives one example per positive; each draws ``neg_nums`` of the row's
      negatives (the reference rule), and their teacher scores with them.
    * A graded row (no ``neg``; every passage of ``pos`` scored by the teacher) gives one
      example: its top-scored passage (the first one on a tie) is the positive and ``neg_nums``
      of the other passages, drawn by the same rule, are its graded candidates. A distilling
      loss learns the teacher's preferences among all of them; a contrastive term treats the
      candidates as negatives. ``graded_rows=False`` (a loss that ignores teacher scores) reads
      such a row like any other: one example per positive.
    """
    positives_of = query_positives(rows, graded_rows=graded_rows)
    examples = []
    for row in rows:
        positives = positives_of[row.query]
        if graded_rows and row.is_graded:
            scores = row.pos_scores
            assert scores is not None
            best = max(range(len(scores)), key=scores.__getitem__)
            others = [i for i in range(len(row.pos)) if i != best]
            drawn = [others[i] for i in _draw(len(others), neg_nums, generator)]
            examples.append(
                TrainingExample(
                    row.query,
                    row.pos[best],
                    tuple(row.pos[i] for i in drawn),
                    tuple(float(scores[i]) for i in (best, *drawn)),
                    positives,
                )
            )
            continue
        for index, positive in enumerate(row.pos):
            drawn = _draw(len(row.neg), neg_nums, generator)
            teacher = None
            if row.pos_scores is not None and (row.neg_scores is not None or not drawn):
                negative_scores = row.neg_scores or []
                teacher = (
                    float(row.pos_scores[index]),
                    *(float(negative_scores[i]) for i in drawn),
                )
            examples.append(
                TrainingExample(
                    row.query, positive, tuple(row.neg[i] for i in drawn), teacher, positives
                )
            )
    return examples


def _draw(available: int, neg_nums: int, generator: random.Random) -> list[int]:
    if neg_nums == 0:
        return []
    if not available:
        raise ColbertkitError(
            f"a row has no hard negatives but neg_nums is {neg_nums}; add negatives to every "
            "row or set neg_nums to 0 (see `colbertkit validate-data FILE`)"
        )
    return sample_negative_indices(available, neg_nums, generator)


def count_examples(rows: Sequence[TrainingRow], *, graded_rows: bool = True) -> int:
    """Examples of an epoch: one per positive, one per graded row (see :func:`build_examples`)."""
    return sum(1 if graded_rows and row.is_graded else len(row.pos) for row in rows)


def query_positives(
    rows: Sequence[TrainingRow], *, graded_rows: bool = True
) -> dict[str, frozenset[str]]:
    """Every positive text of each query, over all its rows (a graded row: its top passage)."""
    found: dict[str, set[str]] = {}
    for row in rows:
        if graded_rows and row.is_graded:
            assert row.pos_scores is not None
            best = max(range(len(row.pos_scores)), key=row.pos_scores.__getitem__)
            found.setdefault(row.query, set()).add(row.pos[best])
        else:
            found.setdefault(row.query, set()).update(row.pos)
    return {query: frozenset(texts) for query, texts in found.items()}


def epoch_examples(
    rows: Sequence[TrainingRow],
    *,
    neg_nums: int,
    seed: int,
    epoch: int,
    sampling: str = "per_epoch",
    graded_rows: bool = True,
) -> list[TrainingExample]:
    """The shuffled examples of ``epoch`` (``graded_rows``: see :func:`build_examples`).

    ``sampling="once"`` draws the negatives from epoch 0's generator in every epoch (the
    reference draws them once at load time); the order is still shuffled per epoch.
    """
    negatives_generator = epoch_generator(seed, epoch if sampling == "per_epoch" else 0)
    examples = build_examples(rows, neg_nums, negatives_generator, graded_rows=graded_rows)
    order_generator = (
        epoch_generator(seed, epoch) if sampling != "per_epoch" else negatives_generator
    )
    order_generator.shuffle(examples)
    return examples


@dataclass
class TokenizedBatch:
    """A batch tokenized without padding.

    ``passages`` holds ``group_size = 1 + neg_nums`` sequences per query: the positive, then
    its negatives. ``teacher_scores`` (Q, group_size) float32: the teacher's score of each of
    them, or None when any example of the batch has none. ``passage_fingerprints`` (P,) int64:
    a 64-bit fingerprint of each passage's text; ``positive_fingerprints`` (Q, K) int64: those
    of every positive text of each query, padded with 0 (no text has fingerprint 0).
    """

    queries: list[list[int]]
    passages: list[list[int]]
    group_size: int
    teacher_scores: torch.Tensor | None = None
    passage_fingerprints: torch.Tensor | None = None
    positive_fingerprints: torch.Tensor | None = None

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def real_tokens(self) -> int:
        return sum(map(len, self.queries)) + sum(map(len, self.passages))


def text_fingerprint(text: str) -> int:
    """A 64-bit fingerprint of a text, the same in every process (unlike ``hash``); never 0."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def positive_fingerprints(examples: Sequence[TrainingExample]) -> torch.Tensor:
    """(Q, K) int64: fingerprints of each example's query positives, 0-padded to the most."""
    lists = [sorted(text_fingerprint(text) for text in ex.query_positives) for ex in examples]
    width = max(1, max(map(len, lists), default=0))
    table = torch.zeros((len(lists), width), dtype=torch.long)
    for row, values in enumerate(lists):
        table[row, : len(values)] = torch.tensor(values, dtype=torch.long)
    return table


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text, unpadded, truncated to ``max_len`` (CLS and SEP included)."""
    if not texts:
        return []  # the fast tokenizers fail on an empty batch
    encoded = tokenizer(
        list(texts),
        max_length=max_len,
        truncation=True,
        padding=False,
        add_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return [list(ids) for ids in encoded["input_ids"]]


class Collator:
    """Tokenize examples to id lists, truncated to the maximum lengths (CLS and SEP included)."""

    def __init__(self, tokenizer: Any, query_max_len: int, passage_max_len: int) -> None:
        self.tokenizer = tokenizer
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len

    def tokenize(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        return tokenize(self.tokenizer, texts, max_len)

    def __call__(self, examples: Sequence[TrainingExample]) -> TokenizedBatch:
        passages = [text for ex in examples for text in ex.passages]
        teacher_scores = None
        if all(ex.teacher_scores is not None for ex in examples):
            teacher_scores = torch.tensor(
                [ex.teacher_scores for ex in examples], dtype=torch.float32
            )  # (Q, group_size)
        return TokenizedBatch(
            queries=self.tokenize([ex.query for ex in examples], self.query_max_len),
            passages=self.tokenize(passages, self.passage_max_len),
            group_size=1 + len(examples[0].negatives),
            teacher_scores=teacher_scores,
            passage_fingerprints=torch.tensor(
                [text_fingerprint(text) for text in passages], dtype=torch.long
            ),  # (P,)
            positive_fingerprints=positive_fingerprints(examples),  # (Q, K)
        )


@dataclass
class Chunk:
    """Some sequences of a batch, padded together.

    ``positions``: where each row sits in the batch (long, (n,)); ``input_ids`` and
    ``attention_mask``: (n, L).
    """

    positions: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Chunk:
        return Chunk(
            self.positions.to(device),
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
        )


def padded_length(longest: int, multiple_of: int) -> int:
    """``longest`` rounded up to a multiple of ``multiple_of``."""
    return -(-longest // multiple_of) * multiple_of


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to ``length``.

    Returns (input_ids (n, length), attention_mask (n, length)).
    """
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def length_sorted_chunks(
    sequences: Sequence[Sequence[int]],
    *,
    chunk_size: int | None,
    pad_id: int,
    multiple_of: int = 1,
) -> list[Chunk]:
    """Split sequences into chunks of similar length, each padded to its own longest.

    ``chunk_size=None`` gives one chunk of everything (plain dynamic padding). Sorting by length
    first means a chunk's padding is small even when the batch's lengths spread widely.
    """
    if chunk_size is None:
        order = list(range(len(sequences)))
        chunk_size = max(1, len(sequences))
    else:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    chunks = []
    for start in range(0, len(order), chunk_size):
        positions = order[start : start + chunk_size]
        members = [sequences[i] for i in positions]
        length = padded_length(max(map(len, members)), multiple_of)
        input_ids, attention_mask = pad_sequences(members, pad_id, length)
        chunks.append(Chunk(torch.tensor(positions, dtype=torch.long), input_ids, attention_mask))
    return chunks
