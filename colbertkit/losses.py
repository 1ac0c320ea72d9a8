"""ColBERT's training losses as pure functions over token embeddings.

Split like sentence-transformers' losses: the *loss from embeddings* (:func:`contrastive_loss`,
:func:`kl_distillation_loss`) needs no model, so the plain step (encode with gradients, then the
loss) and the cached step (GradCache: encode without gradients, loss, gradients of the
embeddings, re-encode chunk by chunk) share it and can be tested for equal losses and gradients.

Batch layout. A batch of Q queries comes with P passages. ``positive_columns[q]`` is the column
of query q's own positive; ``is_positive[p]`` marks every positive column. For the reference's
grouping (each example = 1 positive + N hard negatives, positive first)
:func:`grouped_positive_columns` builds both.

The reference loss (RAG-Retrieval / BGE-M3), for query q::

    logits_q = [s(q, own positive), s(q, every hard negative in the batch)] / temperature
    loss     = mean_q cross_entropy(logits_q, label = the own positive)

Other queries' positives are left out of the logits unless ``other_positives_as_negatives``.
``query_positives[q, p]`` marks the passages whose *text* is a positive of query q (its other
positives in the batch, a negative that repeats a positive): they are never q's negatives
(:func:`query_positive_mask` builds it from text fingerprints). Column order does not change a
cross-entropy, so the own positive stays at its natural column instead of being moved to index 0.

The distillation loss (ColBERTv2, PyLate) compares, for each query, the teacher's distribution
over the query's own passages with the student's::

    loss = mean_q KL( softmax(teacher_q / teacher_temperature) || softmax(s(q, own) / temperature) )
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from colbertkit.scoring import maxsim_matrix, maxsim_pairs


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


def query_positive_mask(
    passage_fingerprints: torch.Tensor, positive_fingerprints: torch.Tensor
) -> torch.Tensor:
    """Which passages are positives of which query, by text.

    passage_fingerprints: (P,) int64, one per passage text; positive_fingerprints: (Q, K) int64,
    the fingerprints of each query's positive texts, padded with 0 (a value no text has).
    Returns (Q, P) bool.
    """
    matches = passage_fingerprints[None, :, None] == positive_fingerprints[:, None, :]  # (Q, P, K)
    return matches.any(dim=-1)  # (Q, P)


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
    query_positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """MaxSim logits of every query against every passage, excluded columns at -inf.

    queries_embeddings: (Q, Lq, D); queries_mask: (Q, Lq)
    passages_embeddings: (P, Lp, D); passages_mask: (P, Lp)
    positive_columns: (Q,) long; is_positive: (P,) bool
    query_positives: (Q, P) bool or None: passages that are positives of the query by text.
    Returns logits: (Q, P) float32. Excluded (-inf) for query q, never its own positive column:
    another query's positive unless ``other_positives_as_negatives``, and every column of
    ``query_positives[q]``.
    """
    scores = maxsim_matrix(
        queries_embeddings.float(), queries_mask, passages_embeddings.float(), passages_mask
    )  # (Q, P)
    logits = scores / temperature  # (Q, P)
    columns = torch.arange(logits.shape[1], device=logits.device)  # (P,)
    own = columns[None, :] == positive_columns[:, None]  # (Q, P)
    excluded = torch.zeros_like(own)  # (Q, P)
    if not other_positives_as_negatives:
        excluded |= is_positive[None, :]
    if query_positives is not None:
        excluded |= query_positives
    return logits.masked_fill(excluded & ~own, float("-inf"))


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
    query_positives: torch.Tensor | None = None,
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
        query_positives=query_positives,
    )  # (Q, P)
    return F.cross_entropy(logits, positive_columns)


def grouped_scores(
    queries_embeddings: torch.Tensor,
    queries_mask: torch.Tensor,
    passages_embeddings: torch.Tensor,
    passages_mask: torch.Tensor,
) -> torch.Tensor:
    """MaxSim of each query against its own group of passages only.

    queries_embeddings: (Q, Lq, D); queries_mask: (Q, Lq)
    passages_embeddings: (Q * G, Lp, D), query q's G passages at rows q * G ... q * G + G - 1;
    passages_mask: (Q * G, Lp).
    Returns scores: (Q, G) float32.
    """
    num_queries = queries_embeddings.shape[0]
    group_size = passages_embeddings.shape[0] // num_queries
    repeated = queries_embeddings.float().repeat_interleave(group_size, dim=0)  # (Q*G, Lq, D)
    repeated_mask = queries_mask.repeat_interleave(group_size, dim=0)  # (Q*G, Lq)
    scores = maxsim_pairs(
        repeated, repeated_mask, passages_embeddings.float(), passages_mask
    )  # (Q*G,)
    return scores.view(num_queries, group_size)  # (Q, G)


def kl_divergence_from_scores(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """Mean over queries of KL(teacher || student) between softmaxes over each query's passages.

    student_scores, teacher_scores: (Q, G). Returns a scalar (0 when the distributions agree).
    """
    student_log_probs = F.log_softmax(student_scores.float() / temperature, dim=-1)  # (Q, G)
    teacher_log_probs = F.log_softmax(teacher_scores.float() / teacher_temperature, dim=-1)
    # batchmean: the sum over passages, averaged over queries (the true KL per query).
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)


def kl_distillation_loss(
    queries_embeddings: torch.Tensor,
    queries_mask: torch.Tensor,
    passages_embeddings: torch.Tensor,
    passages_mask: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """Distil the teacher's ranking of each query's own passages (ColBERTv2 / PyLate).

    queries_embeddings: (Q, Lq, D); queries_mask: (Q, Lq)
    passages_embeddings: (Q * G, Lp, D) grouped as in :func:`grouped_scores`; passages_mask:
    (Q * G, Lp); teacher_scores: (Q, G), the teacher's score of each of those passages.
    Returns a scalar: mean_q KL(softmax(teacher_q / teacher_temperature) ||
    softmax(s(q, own passages) / temperature)).
    """
    student_scores = grouped_scores(
        queries_embeddings, queries_mask, passages_embeddings, passages_mask
    )  # (Q, G)
    return kl_divergence_from_scores(
        student_scores,
        teacher_scores.to(student_scores.device),
        temperature=temperature,
        teacher_temperature=teacher_temperature,
    )


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


class GatheredPassages(NamedTuple):
    """Every process's passages (see :func:`gather_passages`)."""

    embeddings: torch.Tensor  # (W*P, L, D)
    mask: torch.Tensor  # (W*P, L)
    positive_columns: torch.Tensor  # (Q,) shifted to this process's block
    is_positive: torch.Tensor  # (W*P,)
    fingerprints: torch.Tensor | None  # (W*P,) int64, when given


def gather_passages(
    passages_embeddings: torch.Tensor,
    passages_mask: torch.Tensor,
    positive_columns: torch.Tensor,
    is_positive: torch.Tensor,
    passage_fingerprints: torch.Tensor | None = None,
) -> GatheredPassages:
    """Passages of every process, differentiable: gradients reach every process's own passages.

    Every process must hold the same number of passages P. Token lengths may differ: they are
    padded to the longest across processes first.

    passages_embeddings: (P, Lp, D); passages_mask: (P, Lp); positive_columns: (Q,);
    is_positive: (P,); passage_fingerprints: (P,) int64 or None (their texts' fingerprints, to
    mask a query's positives wherever they come from).
    Returns :class:`GatheredPassages`: embeddings (W*P, L, D), mask (W*P, L), positive_columns
    (Q,) shifted to this process's block, is_positive (W*P,), fingerprints (W*P,) or None.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return GatheredPassages(
            passages_embeddings, passages_mask, positive_columns, is_positive, passage_fingerprints
        )
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

    def gathered(tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    offset = rank * passages_embeddings.shape[0]
    return GatheredPassages(
        all_embeddings,
        gathered(mask),
        positive_columns + offset,
        gathered(is_positive.to(torch.uint8)).bool(),  # gloo has no bool collectives
        None
        if passage_fingerprints is None
        else gathered(passage_fingerprints.to(passages_embeddings.device)),
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
