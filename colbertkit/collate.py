"""Training examples, per-process batches and dynamic padding.

* :func:`epoch_examples` turns rows into examples (one per positive, ``neg_nums`` negatives by
  the reference rule) and shuffles them, all from a generator seeded by (seed, epoch): an
  epoch's examples are a pure function of the data, the seed and the epoch number, which is what
  makes resuming at "epoch e, batch b" exact.
* :class:`Collator` tokenizes a batch without padding; :func:`length_sorted_chunks` then pads
  sequences in chunks of similar length, each to its own longest (rounded up to a multiple of 8
  on GPU), instead of padding everything to ``passage_max_len``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from colbertkit.data import TrainingRow, sample_negatives


@dataclass(frozen=True)
class TrainingExample:
    """One query with one positive and its sampled hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...]


def epoch_generator(seed: int, epoch: int) -> random.Random:
    """The generator behind an epoch's negatives and order (independent of earlier epochs)."""
    return random.Random(seed * 1_000_003 + epoch)


def build_examples(
    rows: Sequence[TrainingRow], neg_nums: int, generator: random.Random
) -> list[TrainingExample]:
    """One example per positive of every row, in file order, negatives drawn from ``generator``."""
    examples = []
    for row in rows:
        for positive in row.pos:
            negatives = sample_negatives(row.neg, neg_nums, generator)
            examples.append(TrainingExample(row.query, positive, tuple(negatives)))
    return examples


def epoch_examples(
    rows: Sequence[TrainingRow],
    *,
    neg_nums: int,
    seed: int,
    epoch: int,
    sampling: str = "per_epoch",
) -> list[TrainingExample]:
    """The shuffled examples of ``epoch``.

    ``sampling="once"`` draws the negatives from epoch 0's generator in every epoch (the
    reference draws them once at load time); the order is still shuffled per epoch.
    """
    negatives_generator = epoch_generator(seed, epoch if sampling == "per_epoch" else 0)
    examples = build_examples(rows, neg_nums, negatives_generator)
    order_generator = (
        epoch_generator(seed, epoch) if sampling != "per_epoch" else negatives_generator
    )
    order_generator.shuffle(examples)
    return examples


@dataclass
class TokenizedBatch:
    """A batch tokenized without padding.

    ``passages`` holds ``group_size = 1 + neg_nums`` sequences per query: the positive, then
    its negatives.
    """

    queries: list[list[int]]
    passages: list[list[int]]
    group_size: int

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def real_tokens(self) -> int:
        return sum(map(len, self.queries)) + sum(map(len, self.passages))


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
        passages = [text for ex in examples for text in (ex.positive, *ex.negatives)]
        return TokenizedBatch(
            queries=self.tokenize([ex.query for ex in examples], self.query_max_len),
            passages=self.tokenize(passages, self.passage_max_len),
            group_size=1 + len(examples[0].negatives),
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
