"""Fast, exact MaxSim scoring of (query, passage) pairs with a loaded ColBERT model.

Where the time goes is the encoder, so the scorer spends as little of it as possible:

* every distinct query and passage of a window of pairs is encoded once;
* texts are sorted by token length and batched, each batch padded only to its own longest
  text (dynamic padding), so almost no compute goes to padding;
* passages are scored against their queries as soon as their batch is encoded and then
  dropped, so memory holds one window of query vectors and one batch of passage vectors;
* input is streamed in windows; scores still come out in input order. Each window is scored on
  its own (no vectors are carried from one window to the next), so a window's scores are the
  same bits whichever process scores it (:mod:`colbertkit.distributed_scoring` relies on it);
* the next window is read and tokenized in a background thread while the encoder runs on this
  one (the tokenizers release the GIL).

The encoder runs in the precision asked for (``auto``: see
:func:`colbertkit.precision.resolve_dtype`); the head's output is normalised and MaxSim computed
in float32 whatever it ran in.

Scores do not depend on batch size, batch-mates or padding: the maths lives in
:mod:`colbertkit.scoring`, which masks padding exactly.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch.nn.utils.rnn import pad_sequence

from colbertkit import defaults
from colbertkit.collate import length_sorted_chunks, tokenize
from colbertkit.errors import UsageError, validate_options
from colbertkit.pairs import Pair, PairsInput
from colbertkit.precision import DTypeName, resolve_dtype, torch_dtype
from colbertkit.scoring import maxsim_pairs

DEFAULT_BATCH_SIZE = defaults.ENCODE_BATCH_SIZE
DEFAULT_WINDOW = defaults.SCORE_WINDOW


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
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise UsageError(
            f"`device` {requested}: this machine has {torch.cuda.device_count()} GPU(s), "
            "cuda:0 and up"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"`device` {requested}: MPS is not available here; use `device=cpu`")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype that ``name`` (``auto``, fp32, fp16, bf16) runs as on ``device``."""
    return torch_dtype(resolve_dtype(name, device)[0])


class ScorerOptions(BaseModel):
    """The checked options of :class:`PairScorer`."""

    query_max_len: int = Field(ge=2, description="CLS + at least one token")
    passage_max_len: int = Field(ge=2, description="CLS + at least one token")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    window: int = Field(default=DEFAULT_WINDOW, ge=1)


@dataclass
class _Window:
    """Pairs read and tokenized, ready for the encoder (prepared in the background)."""

    pairs: list[tuple[str, str]]
    queries: list[str]  # distinct, first-seen order
    query_ids: list[list[int]]
    passage_ids: list[list[int]]  # of the distinct passages, first-seen order
    pairs_of_passage: list[list[int]] = field(default_factory=list)


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

    def _encode_batches(self, token_ids: Sequence[Sequence[int]]) -> Iterator[_Encoded]:
        """Encode tokenized texts longest first, in batches padded to their own longest text."""
        chunks = length_sorted_chunks(
            token_ids,
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
            for batch in self._encode_batches(self.tokenize(texts, max_len)):
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

        def read_next() -> _Window | None:
            window = list(itertools.islice(iterator, self.window))
            return self._prepare(window) if window else None

        # One thread reads and tokenizes window k+1 while the encoder runs on window k. Only it
        # touches the input and the tokenizer, one window at a time.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="colbertkit-tokenize") as pool:
            upcoming: Future[_Window | None] = pool.submit(read_next)
            while (prepared := upcoming.result()) is not None:
                upcoming = pool.submit(read_next)
                with self._no_grad():
                    scores = self._score_window(prepared, progress)
                yield from scores

    def _prepare(self, window: list[tuple[str, str]]) -> _Window:
        queries = list(dict.fromkeys(query for query, _ in window))
        passages = list(dict.fromkeys(passage for _, passage in window))
        passage_index = {passage: i for i, passage in enumerate(passages)}
        pairs_of_passage: list[list[int]] = [[] for _ in passages]
        for pair_index, (_, passage) in enumerate(window):
            pairs_of_passage[passage_index[passage]].append(pair_index)
        return _Window(
            pairs=window,
            queries=queries,
            query_ids=self.tokenize(queries, self.query_max_len),
            passage_ids=self.tokenize(passages, self.passage_max_len),
            pairs_of_passage=pairs_of_passage,
        )

    def _score_window(
        self, prepared: _Window, progress: Callable[[int], None] | None
    ) -> list[float]:
        window, pairs_of_passage = prepared.pairs, prepared.pairs_of_passage
        query_vectors: dict[str, torch.Tensor] = {}
        for batch in self._encode_batches(prepared.query_ids):
            lengths = batch.mask.sum(dim=1).tolist()
            for row, index in enumerate(batch.indices):
                query_vectors[prepared.queries[index]] = batch.embeddings[row, : lengths[row]]

        scores = torch.empty(len(window))
        for batch in self._encode_batches(prepared.passage_ids):
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
        return scores.tolist()


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


@dataclass
class LoadedScorer:
    """A scorer on its device and precision, with the checkpoint it was loaded from."""

    scorer: PairScorer
    loaded: Any  # colbertkit.checkpoint.LoadedCheckpoint
    device: torch.device
    dtype: DTypeName  # what the encoder runs in
    dtype_asked: str  # "auto" or a precision
    dtype_reason: str  # why auto chose it ("AMX", ...); "asked" otherwise

    def describe(self) -> str:
        """``cpu (bf16, AMX)``: where and in what the encoder runs."""
        from colbertkit.precision import describe_dtype

        return f"{self.device} ({describe_dtype(self.dtype_asked, self.dtype, self.dtype_reason)})"


def load_scorer(
    checkpoint: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    pad_floor: bool = False,
    window: int = DEFAULT_WINDOW,
    compile_encoder: bool = False,
    **load_options: Any,
) -> LoadedScorer:
    """Load ``checkpoint`` on ``device`` in ``dtype`` (``auto``: bf16 where the hardware has it,
    see :func:`colbertkit.precision.resolve_dtype`) and build its :class:`PairScorer`.

    Lengths default to the checkpoint's metadata, else :mod:`colbertkit.defaults`'.
    ``load_options`` go to :func:`colbertkit.checkpoint.load_checkpoint` (``fresh_head``,
    ``colbert_dim``, ...).
    ``compile_encoder`` runs the encoder through ``torch.compile`` (dynamic shapes): off by
    default, because on CPU it gained about 1.2x after minutes of compiling
    (benchmarks/bench_score.py --compile), which only pays on very large inputs.
    """
    from colbertkit.checkpoint import load_checkpoint

    target = pick_device(device)
    resolved, reason = resolve_dtype(dtype, target)
    loaded = load_checkpoint(
        checkpoint, device=str(target), dtype=torch_dtype(resolved), **load_options
    )
    if compile_encoder:
        loaded.model.encoder.compile(dynamic=True)  # in place: parameter names unchanged
    scorer = PairScorer(
        loaded.model,
        loaded.tokenizer,
        query_max_len=query_max_len or loaded.query_max_len,
        passage_max_len=passage_max_len or loaded.passage_max_len,
        batch_size=batch_size,
        pad_floor=pad_floor,
        window=window,
    )
    return LoadedScorer(scorer, loaded, target, resolved, dtype, reason)


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
    window: int = DEFAULT_WINDOW,
    num_processes: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    **load_options: Any,
) -> list[float]:
    """Load ``checkpoint`` and return the MaxSim score of each (query, passage) pair.

    Lengths default to the checkpoint's metadata, else :mod:`colbertkit.defaults`'. ``dtype``:
    fp32 (exact, the default), bf16, fp16 (GPU) or ``auto`` (bf16 where the hardware computes
    it natively).

    ``num_processes`` (per machine) and ``num_machines`` > 1 score on several processes through
    ``accelerate launch`` (see :mod:`colbertkit.distributed_scoring`), each taking whole
    windows of ``window`` pairs; the scores are the same bits as one process's (at equal
    threads per process on a CPU). ``main_process_port``: default a free port on one machine,
    29500 across machines. On a machine other than the first (``machine_rank`` > 0) the list
    is empty: machine 0 gathers the scores.
    """
    if num_processes * num_machines > 1:
        from colbertkit.distributed_scoring import LaunchSettings, score_pairs_distributed

        launch = validate_options(
            LaunchSettings,
            num_processes=num_processes,
            num_machines=num_machines,
            machine_rank=machine_rank,
            main_process_ip=main_process_ip,
            main_process_port=main_process_port,
            device=device,
        )
        return score_pairs_distributed(
            checkpoint,
            pairs,
            launch=launch,
            batch_size=batch_size,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            dtype=dtype,
            pad_floor=pad_floor,
            window=window,
            **load_options,
        )
    loaded = load_scorer(
        checkpoint,
        batch_size=batch_size,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        device=device,
        dtype=dtype,
        pad_floor=pad_floor,
        window=window,
        **load_options,
    )
    return list(loaded.scorer.score(pairs))


def _counted(scores: Iterable[float], progress: Callable[[int], None] | None) -> Iterator[float]:
    for score in scores:
        if progress is not None:
            progress(1)
        yield score


@contextlib.contextmanager
def open_scoring(
    checkpoint: str,
    pairs: Any,
    *,
    launch: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    pad_floor: bool = False,
    window: int = DEFAULT_WINDOW,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
    **load_options: Any,
) -> Iterator[Callable[[Callable[[int], None] | None], Iterator[float]] | None]:
    """What ``colbertkit score`` runs: yields ``scores(progress)``, the scores of a checked
    pairs file (:class:`colbertkit.pairs.PairsInput`) in input order.

    ``launch`` (:class:`colbertkit.distributed_scoring.LaunchSettings`) with more than one
    process scores through ``accelerate launch`` (the workers say what they load and run on);
    on a machine other than the first it yields None (machine 0 has the scores). Otherwise the
    model loads here and ``log(line)`` is told what it is, where it runs and, for an fp32 run
    where ``auto`` would be faster, by how much (:func:`colbertkit.precision.auto_hint`).
    """
    if launch is not None and launch.world_size > 1:
        from colbertkit.distributed_scoring import scoring_launch

        with scoring_launch(
            checkpoint,
            pairs.path,
            count=pairs.count,
            launch=launch,
            batch_size=batch_size,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            dtype=dtype,
            pad_floor=pad_floor,
            window=window,
            quiet=quiet,
            log=log,
            **load_options,
        ) as merged:
            yield None if merged is None else (lambda progress: _counted(merged, progress))
        return
    from colbertkit.precision import auto_hint

    loaded = load_scorer(
        checkpoint,
        batch_size=batch_size,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        device=device,
        dtype=dtype,
        pad_floor=pad_floor,
        window=window,
        **load_options,
    )
    scorer = loaded.scorer
    if log is not None:
        for note in loaded.loaded.notes:
            log(note)
        log(
            f"scoring {pairs.count} pairs on {loaded.describe()}, "
            f"query/passage max len {scorer.query_max_len}/{scorer.passage_max_len}"
            f"{', pad floor' if pad_floor else ''}"
        )
        hint = auto_hint(loaded.device) if dtype == "fp32" else None
        if hint:
            log(hint)

    def scores(progress: Callable[[int], None] | None) -> Iterator[float]:
        return scorer.score(((pair.query, pair.passage) for pair in pairs.pairs()), progress)

    yield scores
