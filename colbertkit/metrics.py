"""Ranking metrics for reranking evaluation: MRR@10, NDCG@10, Recall@k.

Each function takes one query's candidate scores and binary relevance labels and returns a
float in [0, 1]; :func:`ranking_metrics` computes them all for one query. Ties in scores are
broken pessimistically (irrelevant candidates first), so a scorer that says nothing (equal
scores) is not rewarded for the order in which the data happens to list the positives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def ranked_relevance(scores: Sequence[float], relevant: Sequence[bool]) -> list[bool]:
    """Relevance labels in order of decreasing score; among equal scores, irrelevant first."""
    if len(scores) != len(relevant):
        raise ValueError(f"{len(scores)} scores but {len(relevant)} relevance labels")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], bool(relevant[i])))
    return [bool(relevant[i]) for i in order]


def mrr_at_k(ranked: Sequence[bool], k: int = 10) -> float:
    """1 / rank of the first relevant candidate within the top k, else 0."""
    for rank, is_relevant in enumerate(ranked[:k], start=1):
        if is_relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[bool], k: int = 10) -> float:
    """Binary-gain NDCG: sum of 1/log2(rank+1) over relevant top-k, over the ideal sum."""
    gains = sum(1.0 / math.log2(rank + 1) for rank, rel in enumerate(ranked[:k], start=1) if rel)
    ideal_hits = min(sum(ranked), k)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, ideal_hits + 1))
    return gains / ideal if ideal > 0 else 0.0


def recall_at_k(ranked: Sequence[bool], k: int) -> float:
    """Share of all relevant candidates that are in the top k."""
    total = sum(ranked)
    return sum(ranked[:k]) / total if total else 0.0


def ranking_metrics(
    scores: Sequence[float], relevant: Sequence[bool], recall_at: Sequence[int] = (5, 10)
) -> dict[str, float]:
    """``{"mrr@10", "ndcg@10", "recall@k"...}`` for one query."""
    ranked = ranked_relevance(scores, relevant)
    metrics = {"mrr@10": mrr_at_k(ranked, 10), "ndcg@10": ndcg_at_k(ranked, 10)}
    for k in sorted(set(recall_at)):
        metrics[f"recall@{k}"] = recall_at_k(ranked, k)
    return metrics


def mean_metrics(per_query: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average of per-query metric dictionaries (all with the same keys)."""
    if not per_query:
        return {}
    return {name: sum(m[name] for m in per_query) / len(per_query) for name in per_query[0]}
