"""Fast, exact MaxSim scoring of (query, passage) pairs with a loaded ColBERT model.

Where the time goes is the encoder, so the scorer spends as little of it as possible:

* every distinct query and passage of a window of pairs is encoded once;
* texts are sorted by token length and batched, each batch padded only to its own longest
  text (dynamic padding), so almost no compute goes to padding;
* passages are scored against their queries as soon as their batch is encoded and then
  dropped, so memory holds one window of query vectors and one batch of passage vectors;
* input is streamed in windows; scores still come out in input order.

Scores do not depend on batch size, batch-mates or padding: the maths lives in
:mod:`colbertkit.scoring`, which masks padding exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch.nn.utils.rnn import pad_sequence

from colbertkit import defaults
from colbertkit.collate import length_sorted_chunks, tokenize
from colbertkit.errors import UsageError, validate_options
from colbertkit.pairs import Pair, PairsInput
from colbertkit.precision import DTYPE_NAMES, torch_dtype
from colbertkit.scoring import maxsim_pairs

DEFAULT_BATCH_SIZE = defaults.ENCODE_BATCH_SIZE
DEFAULT_WINDOW = 4096  # pairs whose distinct texts are encoded together


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(
            f"`device` {requested}: not a device (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"`device` {requested}: CUDA is not available here; use `device=cpu`")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"`device` {requested}: MPS is not available here; use `device=cpu`")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise UsageError(f"`dtype` {name}: use one of {', '.join(DTYPE_NAMES)}")
    if name == "fp16" and device.type == "cpu":
        raise UsageError("`dtype=fp16` is not supported on CPU; use bf16 or fp32")
    return torch_dtype(name)


class ScorerOptions(BaseModel):
    """The checked options of :class:`PairScorer`."""

    query_max_len: int = Field(ge=2, description="CLS + at least one token")
    passage_max_len: int = Field(ge=2, description="CLS + at least one token")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    window: int = Field(default=DEFAULT_WINDOW, ge=1)


@dataclass
class _Encoded:
    """Token vectors of a sorted batch of texts."""

    indices: list[int]  # positions of the texts in the list given to the encoder
    embeddings: torch.Tensor  # (B, L-1, D) float32, zeros at padding
    mask: torch.Tensor  # (B, L-1)


class PairScorer:
    """Scores pairs with a :class:`colbertkit.model.ColBERT`; see the module doc."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        query_max_len: int,
        passage_max_len: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
        pad_floor: bool = False,
        window: int = DEFAULT_WINDOW,
        encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
    ) -> None:
        options = validate_options(
            ScorerOptions,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            batch_size=batch_size,
            window=window,
        )
        self.model = model
        self.tokenizer = tokenizer
        self.query_max_len = options.query_max_len
        self.passage_max_len = options.passage_max_len
        self.batch_size = options.batch_size
        self.window = options.window
        # What runs a forward: the model itself, or e.g. a trainer's FSDP-wrapped module.
        self.forward = encode or model
        self.inference_mode = encode is None
        # The reference's padded passages hold passage_max_len - 1 vectors after CLS.
        self.pad_to_length = self.passage_max_len - 1 if pad_floor else None
        self.device = next(model.parameters()).device
        # Tensor cores want lengths in multiples of 8; on CPU any extra token is waste.
        self.length_multiple = 8 if self.device.type == "cuda" else 1

    # --- encoding -------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        return tokenize(self.tokenizer, texts, max_len)

    def _encode_batches(self, texts: Sequence[str], max_len: int) -> Iterator[_Encoded]:
        """Encode ``texts`` longest first, in batches padded to their own longest text."""
        chunks = length_sorted_chunks(
            self.tokenize(texts, max_len),
            chunk_size=self.batch_size,
            pad_id=self.tokenizer.pad_token_id or 0,
            multiple_of=self.length_multiple,
        )
        for chunk in chunks:
            chunk = chunk.to(self.device)
            embeddings, mask = self.forward(
                chunk.input_ids, chunk.attention_mask
            )  # (B, L-1, D), (B, L-1)
            yield _Encoded(chunk.positions.tolist(), embeddings, mask)

    def _no_grad(self) -> Any:
        # inference_mode is the faster; a trainer's FSDP module needs plain no_grad (inference
        # tensors must not reach the parameters it all-gathers and trains afterwards).
        return torch.inference_mode() if self.inference_mode else torch.no_grad()

    def encode(self, texts: Sequence[str], max_len: int) -> list[torch.Tensor]:
        """Real token vectors of each text: a list of (n_i - 1, D) float32 tensors."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        with self._no_grad():
            for batch in self._encode_batches(texts, max_len):
                lengths = batch.mask.sum(dim=1).tolist()
                for row, index in enumerate(batch.indices):
                    out[index] = batch.embeddings[row, : lengths[row]].clone()
        return out

    # --- scoring --------------------------------------------------------------------------

    def score(
        self,
        pairs: Iterable[tuple[str, str]],
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[float]:
        """Scores of ``pairs`` in input order; ``progress(n)`` is told of each n pairs done."""
        iterator = iter(pairs)
        query_cache: dict[str, torch.Tensor] = {}
        while window := list(itertools.islice(iterator, self.window)):
            with self._no_grad():
                scores, query_cache = self._score_window(window, query_cache, progress)
            yield from scores

    def _score_window(
        self,
        window: list[tuple[str, str]],
        previous_queries: dict[str, torch.Tensor],
        progress: Callable[[int], None] | None,
    ) -> tuple[list[float], dict[str, torch.Tensor]]:
        queries = list(dict.fromkeys(query for query, _ in window))
        new_queries = [query for query in queries if query not in previous_queries]
        encoded = dict(zip(new_queries, self.encode(new_queries, self.query_max_len), strict=True))
        # Keep the vectors of this window's queries only: sorted inputs reuse them across the
        # window boundary, and memory stays bounded by one window.
        query_vectors = {
            query: previous_queries.get(query, encoded.get(query)) for query in queries
        }

        passages = list(dict.fromkeys(passage for _, passage in window))
        passage_index = {passage: i for i, passage in enumerate(passages)}
        pairs_of_passage: list[list[int]] = [[] for _ in passages]
        for pair_index, (_, passage) in enumerate(window):
            pairs_of_passage[passage_index[passage]].append(pair_index)

        scores = torch.empty(len(window))
        for batch in self._encode_batches(passages, self.passage_max_len):
            rows = [row for row, index in enumerate(batch.indices) for _ in pairs_of_passage[index]]
            pair_indices = [p for index in batch.indices for p in pairs_of_passage[index]]
            query_list = [query_vectors[window[p][0]] for p in pair_indices]
            queries_embeddings = pad_sequence(query_list, batch_first=True)  # (N, Lq, D)
            lengths = torch.tensor([len(q) for q in query_list], device=queries_embeddings.device)
            queries_mask = (
                torch.arange(queries_embeddings.shape[1], device=lengths.device) < lengths[:, None]
            )
            row_index = torch.tensor(rows, device=batch.embeddings.device)
            batch_scores = maxsim_pairs(
                queries_embeddings,
                queries_mask,
                batch.embeddings[row_index],  # (N, Ld, D)
                batch.mask[row_index],
                pad_to_length=self.pad_to_length,
            )  # (N,)
            scores[pair_indices] = batch_scores.float().cpu()
            if progress is not None:
                progress(len(pair_indices))
        return scores.tolist(), query_vectors


def rank_scored_pairs(
    source: PairsInput,
    scored: Iterable[tuple[Pair, float]],
    top_k: int | None = None,
    *,
    note: Callable[[str], None] | None = None,
) -> Iterator[tuple[Pair, int, float]]:
    """(pair, rank, score) of each kept pair: queries in first-seen order, best score first.

    Ties keep input order; ranks start at 1. When each qid's lines are contiguous
    (``source.grouped``) one query is held at a time. Otherwise every pair's qid, score and
    file position are held (32 bytes a pair; ``note`` is told how much) and the texts of the
    kept pairs are read again from the file.
    """
    from array import array

    if source.grouped:
        group: list[tuple[Pair, float]] = []
        for pair, score in scored:
            if group and pair.qid != group[0][0].qid:
                yield from _ranked_group(group, top_k)
                group = []
            group.append((pair, score))
        yield from _ranked_group(group, top_k)
        return
    if note is not None:
        note(
            f"ranking {source.count:,} pairs whose qids are not grouped holds "
            f"{source.count * 32 / 1e6:.1f} MB of scores and positions; sort the input by qid "
            "to stream it"
        )
    qid_index: dict[str, int] = {}
    qids, scores, offsets, lines = array("q"), array("d"), array("q"), array("q")
    for pair, score in scored:
        qids.append(qid_index.setdefault(str(pair.qid), len(qid_index)))
        scores.append(score)
        offsets.append(pair.offset)
        lines.append(pair.line)
    members: list[list[int]] = [[] for _ in qid_index]
    for index, qid in enumerate(qids):
        members[qid].append(index)
    del qids
    for indices in members:
        ordered = sorted(indices, key=lambda i: -scores[i])[:top_k]
        again = source.at((offsets[i], lines[i]) for i in ordered)
        for rank, (index, pair) in enumerate(zip(ordered, again, strict=True), start=1):
            yield pair, rank, scores[index]


def _ranked_group(
    group: list[tuple[Pair, float]], top_k: int | None
) -> Iterator[tuple[Pair, int, float]]:
    ordered = sorted(group, key=lambda item: -item[1])[:top_k]  # stable: ties keep input order
    for rank, (pair, score) in enumerate(ordered, start=1):
        yield pair, rank, score


def score_pairs(
    checkpoint: str,
    pairs: Iterable[tuple[str, str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    pad_floor: bool = False,
    **load_options: Any,
) -> list[float]:
    """Load ``checkpoint`` and return the MaxSim score of each (query, passage) pair.

    Lengths default to the checkpoint's metadata, else :mod:`colbertkit.defaults`'.
    """
    from colbertkit.checkpoint import load_checkpoint

    target = pick_device(device)
    loaded = load_checkpoint(
        checkpoint, device=str(target), dtype=pick_dtype(dtype, target), **load_options
    )
    scorer = PairScorer(
        loaded.model,
        loaded.tokenizer,
        query_max_len=query_max_len or loaded.query_max_len,
        passage_max_len=passage_max_len or loaded.passage_max_len,
        batch_size=batch_size,
        pad_floor=pad_floor,
    )
    return list(scorer.score(pairs))
