"""MaxSim late-interaction scoring as pure tensor functions (no model).

Embeddings here are the ColBERT token vectors *after* the CLS position was dropped, masked
and L2-normalised (see :mod:`colbertkit.model`). A mask is 1 for a real token, 0 for padding.

The score of query q against passage d is (BGE-M3 / reference semantics)::

    s(q, d) = sum_i max_j <q_i, d_j>  /  number of real query tokens

where i runs over the query's real tokens and j over the passage's real tokens only, so a
score never depends on padding, batch size or batch-mates.

``pad_to_length`` reproduces the reference implementation, which pads every passage to
``passage_max_len`` with zero vectors that take part in the max: a passage with fewer than
``pad_to_length`` real vectors then floors every query token's best similarity at 0.
"""

from __future__ import annotations

import torch


def _masked_token_max(
    similarities: torch.Tensor,
    documents_mask: torch.Tensor,
    pad_to_length: int | None,
) -> torch.Tensor:
    """Max over the document axis (last) of ``similarities``, real document tokens only.

    similarities: (..., Ld) with documents_mask broadcastable to it.
    Returns (...,).
    """
    real = documents_mask.bool()
    best = similarities.masked_fill(~real, float("-inf")).amax(dim=-1)  # (...)
    if pad_to_length is not None:
        # The reference's zero padding vectors join the max when the passage is shorter
        # than the padded length.
        padded = real.sum(dim=-1) < pad_to_length  # (..., ) broadcastable
        best = torch.where(padded, best.clamp(min=0.0), best)
    # A document with no real token at all has no similarity; count it as 0, not -inf.
    return best.nan_to_num(neginf=0.0)


def maxsim_pairs(
    queries_embeddings: torch.Tensor,
    queries_mask: torch.Tensor,
    documents_embeddings: torch.Tensor,
    documents_mask: torch.Tensor,
    pad_to_length: int | None = None,
) -> torch.Tensor:
    """Score aligned pairs: query b against document b.

    queries_embeddings: (B, Lq, D); queries_mask: (B, Lq)
    documents_embeddings: (B, Ld, D); documents_mask: (B, Ld)
    Returns scores: (B,).
    """
    similarities = torch.einsum(
        "bid,bjd->bij", queries_embeddings, documents_embeddings
    )  # (B, Lq, Ld)
    best = _masked_token_max(similarities, documents_mask[:, None, :], pad_to_length)  # (B, Lq)
    return _query_mean(best, queries_mask)


def maxsim_matrix(
    queries_embeddings: torch.Tensor,
    queries_mask: torch.Tensor,
    documents_embeddings: torch.Tensor,
    documents_mask: torch.Tensor,
    pad_to_length: int | None = None,
) -> torch.Tensor:
    """Score every query against every document.

    queries_embeddings: (Q, Lq, D); queries_mask: (Q, Lq)
    documents_embeddings: (P, Ld, D); documents_mask: (P, Ld)
    Returns scores: (Q, P).
    """
    similarities = torch.einsum(
        "qid,pjd->qpij", queries_embeddings, documents_embeddings
    )  # (Q, P, Lq, Ld)
    best = _masked_token_max(
        similarities, documents_mask[None, :, None, :], pad_to_length
    )  # (Q, P, Lq)
    return _query_mean(best, queries_mask[:, None, :])


def _query_mean(best: torch.Tensor, queries_mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token maxima over real query tokens / their number.

    best: (..., Lq); queries_mask broadcastable to it. Returns (...,).
    """
    mask = queries_mask.to(best.dtype)
    token_count = mask.sum(dim=-1).clamp(min=1.0)
    return (best * mask).sum(dim=-1) / token_count
