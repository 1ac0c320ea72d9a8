"""The ColBERT contrastive loss as pure functions over token embeddings.

Split like sentence-transformers' losses: the *loss from embeddings* (:func:`contrastive_loss`)
needs no model, so the plain step (encode with gradients, then the loss) and the cached step
(GradCache: encode without gradients, loss, gradients of the embeddings, re-encode chunk by chunk)
share it and can be tested for equal losses and gradients.

Batch layout. A batch of Q queries comes with P passages. ``positive_columns[q]`` is the column
of query q's own positive; ``is_positive[p]`` marks every positive column. For the reference's
grouping (each example = 1 positive + N hard negatives, positive first)
:func:`grouped_positive_columns` builds both.

The reference loss (RAG-Retrieval / BGE-M3), for query q::

    logits_q = [s(q, own positive), s(q, every hard negative in the batch)] / temperature
    loss     = mean_q cross_entropy(logits_q, label = the own positive)

Other queries' positives are left out of the logits unless ``other_positives_as_negatives``.
Column order does not change a cross-entropy, so the own positive stays at its natural column
instead of being moved to index 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from colbertkit.scoring import maxsim_matrix


class ChunkLike(Protocol):
    """What the encode side needs of a chunk (see :class:`colbertkit.collate.Chunk`)."""

    positions: torch.Tensor  # (n,) long: rows of the batch this chunk holds
    input_ids: torch.Tensor  # (n, L)
    attention_mask: torch.Tensor  # (n, L)


# encode(chunks) -> [(embeddings (n, L-1, D), mask (n, L-1)) per chunk]
EncodeFn = Callable[[Sequence[ChunkLike]], list[tuple[torch.Tensor, torch.Tensor]]]
# loss_from_embeddings(queries_embeddings, queries_mask, passages_embeddings, passages_mask)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grouped_positive_columns(
    num_queries: int, group_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the positives when every query owns ``group_size`` passages, positive first.

    Returns (positive_columns (Q,) long, is_positive (Q * group_size,) bool).
    """
    positive_columns = torch.arange(num_queries, device=device) * group_size  # (Q,)
    is_positive = torch.zeros(num_queries * group_size, dtype=torch.bool, device=device)
    is_positive[positive_columns] = True  # (P,)
    return positive_columns, is_positive


def contrastive_logits(
    queries_embeddings: torch.Tensor,
    queries_mask: torch.Tensor,
    passages_embeddings: torch.Tensor,
    passages_mask: torch.Tensor,
    positive_columns: torch.Tensor,
    is_positive: torch.Tensor,
    *,
    temperature: float,
    other_positives_as_negatives: bool = False,
) -> torch.Tensor:
    """MaxSim logits of every query against every passage, excluded columns at -inf.

    queries_embeddings: (Q, Lq, D); queries_mask: (Q, Lq)
    passages_embeddings: (P, Lp, D); passages_mask: (P, Lp)
    positive_columns: (Q,) long; is_positive: (P,) bool
    Returns logits: (Q, P) float32; a column that is another query's positive is -inf unless
    ``other_positives_as_negatives``.
    """
    scores = maxsim_matrix(
        queries_embeddings.float(), queries_mask, passages_embeddings.float(), passages_mask
    )  # (Q, P)
    logits = scores / temperature  # (Q, P)
    if not other_positives_as_negatives:
        columns = torch.arange(logits.shape[1], device=logits.device)  # (P,)
        own = columns[None, :] == positive_columns[:, None]  # (Q, P)
        excluded = is_positive[None, :] & ~own  # (Q, P)
        logits = logits.masked_fill(excluded, float("-inf"))
    return logits


def contrastive_loss(
    queries_embeddings: torch.Tensor,
    queries_mask: torch.Tensor,
    passages_embeddings: torch.Tensor,
    passages_mask: torch.Tensor,
    positive_columns: torch.Tensor,
    is_positive: torch.Tensor,
    *,
    temperature: float,
    other_positives_as_negatives: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of each query's own positive against the batch's negatives.

    Shapes as in :func:`contrastive_logits`. Returns a scalar.
    """
    logits = contrastive_logits(
        queries_embeddings,
        queries_mask,
        passages_embeddings,
        passages_mask,
        positive_columns,
        is_positive,
        temperature=temperature,
        other_positives_as_negatives=other_positives_as_negatives,
    )  # (Q, P)
    return F.cross_entropy(logits, positive_columns)


def pad_token_axis(
    embeddings: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the token axis to ``length`` (padding has mask 0, so MaxSim ignores it).

    embeddings: (N, L, D); mask: (N, L). Returns ((N, length, D), (N, length)).
    """
    missing = length - embeddings.shape[1]
    if missing <= 0:
        return embeddings, mask
    return F.pad(embeddings, (0, 0, 0, missing)), F.pad(mask, (0, missing))


def concat_padded(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (embeddings (Ni, Li, D), mask (Ni, Li)) parts along the batch axis.

    Returns ((sum Ni, max Li, D), (sum Ni, max Li)).
    """
    length = max(embeddings.shape[1] for embeddings, _ in parts)
    padded = [pad_token_axis(embeddings, mask, length) for embeddings, mask in parts]
    return (
        torch.cat([embeddings for embeddings, _ in padded]),
        torch.cat([mask for _, mask in padded]),
    )


def gather_passages(
    passages_embeddings: torch.Tensor,
    passages_mask: torch.Tensor,
    positive_columns: torch.Tensor,
    is_positive: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Passages of every process, differentiable: gradients reach every process's own passages.

    Every process must hold the same number of passages P. Token lengths may differ: they are
    padded to the longest across processes first.

    passages_embeddings: (P, Lp, D); passages_mask: (P, Lp); positive_columns: (Q,);
    is_positive: (P,).
    Returns (embeddings (W*P, L, D), mask (W*P, L), positive_columns (Q,) shifted to this
    process's block, is_positive (W*P,)).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return passages_embeddings, passages_mask, positive_columns, is_positive
    world_size, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.tensor(list(passages_embeddings.shape[:2]), device=passages_embeddings.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size)]
    dist.all_gather(all_sizes, sizes)
    counts = {int(size[0]) for size in all_sizes}
    if len(counts) != 1:
        raise RuntimeError(
            f"processes hold different passage counts {sorted(counts)}; cannot gather"
        )
    length = max(int(size[1]) for size in all_sizes)
    embeddings, mask = pad_token_axis(passages_embeddings, passages_mask, length)
    # Our own differentiable gather, not torch.distributed.nn.functional.all_gather: on gloo its
    # all-to-all backward gave other gradients than one process on the global batch
    # (tests/test_training_processes.py), this one gives the same.
    all_embeddings = _GatherWithGradient.apply(embeddings)  # (W*P, L, D)
    all_masks = [torch.empty_like(mask) for _ in range(world_size)]
    dist.all_gather(all_masks, mask.contiguous())
    # gloo has no bool collectives: travel as uint8.
    flags = is_positive.to(torch.uint8).contiguous()
    all_flags = [torch.empty_like(flags) for _ in range(world_size)]
    dist.all_gather(all_flags, flags)
    offset = rank * passages_embeddings.shape[0]
    return (
        all_embeddings,
        torch.cat(all_masks),
        positive_columns + offset,
        torch.cat(all_flags).bool(),
    )


def reassemble(
    outputs: Sequence[tuple[torch.Tensor, torch.Tensor]], chunks: Sequence[ChunkLike]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put chunk outputs back in batch order.

    outputs[i]: (embeddings (n_i, L_i, D), mask (n_i, L_i)) of chunks[i].
    Returns (embeddings (N, max L_i, D), mask (N, max L_i)) with row r = batch row r.
    """
    embeddings, mask = concat_padded(list(outputs))  # (N, L, D), (N, L) in chunk order
    positions = torch.cat([chunk.positions for chunk in chunks]).to(embeddings.device)  # (N,)
    order = torch.argsort(positions)  # chunk-order index of batch row r
    return embeddings[order], mask[order.to(mask.device)]


def plain_backward(
    encode: EncodeFn,
    query_chunks: Sequence[ChunkLike],
    passage_chunks: Sequence[ChunkLike],
    loss_from_embeddings: LossFn,
    backward: Callable[[torch.Tensor], None],
) -> torch.Tensor:
    """Encode everything with gradients in one call, compute the loss, back-propagate.

    Returns the loss, detached.
    """
    outputs = encode([*query_chunks, *passage_chunks])
    queries = reassemble(outputs[: len(query_chunks)], query_chunks)
    passages = reassemble(outputs[len(query_chunks) :], passage_chunks)
    loss = loss_from_embeddings(*queries, *passages)
    backward(loss)
    return loss.detach()


class RandomState:
    """The torch RNG states (CPU and CUDA) at construction; ``with state:`` replays them.

    GradCache encodes every chunk twice; replaying the first pass's RNG state makes dropout
    draw the same masks in the second pass, so the cached gradients belong to the same function.
    ``torch.random.fork_rng`` restores the surrounding state afterwards.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def grad_cache_backward(
    encode: EncodeFn,
    query_chunks: Sequence[ChunkLike],
    passage_chunks: Sequence[ChunkLike],
    loss_from_embeddings: LossFn,
    backward: Callable[[torch.Tensor], None],
    defer_sync: Callable[[], AbstractContextManager[object]] = nullcontext,
    sync: bool = True,
) -> torch.Tensor:
    """GradCache (Gao et al. 2021): the plain loss's gradients at the memory of one chunk.

    1. Encode each chunk without gradients (remembering its RNG state).
    2. Compute the loss on the whole batch from those embeddings and back-propagate to the
       embeddings only: the gradient cache.
    3. Encode each chunk again with gradients (same RNG state) and back-propagate the cached
       gradient through it: sum(embeddings * cached_gradient) has exactly that gradient.

    ``backward(tensor)`` back-propagates into the parameters (the training loop scales it for
    accumulation and mixed precision). ``defer_sync()`` is entered around every chunk but the
    last one when ``sync`` (and around all of them otherwise), so a DDP model reduces its
    gradients once per step. Returns the loss, detached.
    """
    chunks = [*query_chunks, *passage_chunks]
    states: list[RandomState] = []
    outputs = []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState())
            outputs.append(encode([chunk])[0])
    queries_embeddings, queries_mask = reassemble(outputs[: len(query_chunks)], query_chunks)
    passages_embeddings, passages_mask = reassemble(outputs[len(query_chunks) :], passage_chunks)
    del outputs
    queries_embeddings.requires_grad_(True)
    passages_embeddings.requires_grad_(True)
    loss = loss_from_embeddings(
        queries_embeddings, queries_mask, passages_embeddings, passages_mask
    )
    # The cache: queries_embeddings.grad (Q, Lq, D), passages_embeddings.grad (P, Lp, D).
    loss.backward()
    for index, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
        is_query = index < len(query_chunks)
        cache = queries_embeddings.grad if is_query else passages_embeddings.grad
        last = index == len(chunks) - 1
        # `state` replays the first pass's RNG inside and restores the current one on exit.
        with nullcontext() if (sync and last) else defer_sync(), state.replay():
            embeddings, _ = encode([chunk])[0]  # (n, L, D)
            cached = cache[chunk.positions.to(cache.device), : embeddings.shape[1]]  # (n, L, D)
            backward((embeddings * cached.to(embeddings.dtype)).sum())
    return loss.detach()


class _GatherWithGradient(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns, to each process, the sum over all
    processes of the gradient of its own block: the exact gradient of the summed loss.

    (An all-reduce of the whole gradient: plain, and supported by every backend, gloo included.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        gradient = gradient.contiguous()
        dist.all_reduce(gradient)  # every process's gradient for every block, summed
        start = ctx.rank * ctx.rows
        return gradient[start : start + ctx.rows]
