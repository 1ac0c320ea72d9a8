"""Ranking metrics, the one implementation that training and ``colbertkit evaluate`` share.

The definitions are trec_eval's (checked against ``pytrec_eval`` in the tests to 1e-6):

* **Relevance** is a grade: an integer from the qrels, or a bool (True = 1) for ``pos`` /
  ``neg`` rows. A grade above 0 is relevant; a grade of 0 or below is not and gains nothing.
* **NDCG@k** (trec_eval's ``ndcg_cut_k``): gain = grade, discount 1 / log2(rank + 1); the ideal
  ranking sorts the grades of *every* judged passage of the query, retrieved or not.
* **MRR@k**: 1 / rank of the first relevant passage within the top k, else 0 (trec_eval's
  ``recip_rank`` has no cut-off; it equals MRR@k on a run cut to its top k).
* **Recall@k**: relevant passages in the top k over all relevant passages of the query.
* **MAP** (trec_eval's ``map``): average precision over *all* relevant passages of the query,
  so a relevant passage that was never retrieved adds a precision of 0.

"All passages of the query" are the candidates themselves unless ``all_grades`` says otherwise
(the qrels may judge passages that the run does not hold). A query without a relevant passage
scores 0 everywhere; callers that average decide whether to count it.

**Ties**: candidates with equal scores are ranked pessimistically, lower grade first, so a
scorer that says nothing (equal scores) is not rewarded for the order in which the data happens
to list its positives. trec_eval breaks ties by document id instead, so the two agree exactly
only when the scores are distinct.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

CUTOFF = 10  # the k of MRR@k and NDCG@k


def metric_names(recall_at: Sequence[int] = (5, 10)) -> list[str]:
    """``["mrr@10", "ndcg@10", "recall@k"..., "map"]``: the order used everywhere."""
    return [
        f"mrr@{CUTOFF}",
        f"ndcg@{CUTOFF}",
        *(f"recall@{k}" for k in sorted(set(recall_at))),
        "map",
    ]


def ranked_relevance(scores: Sequence[float], relevance: Sequence[Any]) -> list[Any]:
    """``relevance`` reordered by decreasing score; among equal scores, lower grade first."""
    if len(scores) != len(relevance):
        raise ValueError(f"{len(scores)} scores but {len(relevance)} relevance labels")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], relevance[i]))
    return [relevance[i] for i in order]


def _relevant_count(grades: Sequence[float]) -> int:
    return sum(1 for grade in grades if grade > 0)


def mrr_at_k(ranked: Sequence[float], k: int = CUTOFF) -> float:
    """1 / rank of the first relevant candidate within the top k, else 0."""
    for rank, grade in enumerate(ranked[:k], start=1):
        if grade > 0:
            return 1.0 / rank
    return 0.0


def dcg_at_k(ranked: Sequence[float], k: int = CUTOFF) -> float:
    """Sum over the top k of grade / log2(rank + 1); grades of 0 or below gain nothing."""
    return sum(
        float(grade) / math.log2(rank + 1)
        for rank, grade in enumerate(ranked[:k], start=1)
        if grade > 0
    )


def ndcg_at_k(
    ranked: Sequence[float], k: int = CUTOFF, all_grades: Sequence[float] | None = None
) -> float:
    """DCG@k over the DCG@k of the ideal order of ``all_grades`` (default: ``ranked``'s)."""
    ideal_order = sorted(g for g in (ranked if all_grades is None else all_grades) if g > 0)
    ideal = dcg_at_k(ideal_order[::-1], k)
    return dcg_at_k(ranked, k) / ideal if ideal > 0 else 0.0


def recall_at_k(ranked: Sequence[float], k: int, total_relevant: int | None = None) -> float:
    """Relevant candidates in the top k over ``total_relevant`` (default: those in ``ranked``)."""
    total = _relevant_count(ranked) if total_relevant is None else total_relevant
    return _relevant_count(ranked[:k]) / total if total else 0.0


def average_precision(ranked: Sequence[float], total_relevant: int | None = None) -> float:
    """Mean over all relevant passages of the precision at their rank (0 if never ranked)."""
    total = _relevant_count(ranked) if total_relevant is None else total_relevant
    if not total:
        return 0.0
    hits = 0
    precision_sum = 0.0
    for rank, grade in enumerate(ranked, start=1):
        if grade > 0:
            hits += 1
            precision_sum += hits / rank
    return precision_sum / total


def ranking_metrics(
    scores: Sequence[float],
    relevance: Sequence[Any],
    recall_at: Sequence[int] = (5, 10),
    *,
    all_grades: Sequence[float] | None = None,
) -> dict[str, float]:
    """Every metric of :func:`metric_names` for one query.

    Args:
        scores: one score per candidate, higher is better.
        relevance: one grade (or bool) per candidate, aligned with ``scores``.
        recall_at: the k of each Recall@k.
        all_grades: grades of every judged passage of the query, retrieved or not (from the
            qrels); default: the candidates' own grades (every relevant passage is a candidate).
    """
    ranked = ranked_relevance(scores, relevance)
    judged = ranked if all_grades is None else all_grades
    total = _relevant_count(judged)
    metrics = {
        f"mrr@{CUTOFF}": mrr_at_k(ranked, CUTOFF),
        f"ndcg@{CUTOFF}": ndcg_at_k(ranked, CUTOFF, judged),
    }
    for k in sorted(set(recall_at)):
        metrics[f"recall@{k}"] = recall_at_k(ranked, k, total)
    metrics["map"] = average_precision(ranked, total)
    return metrics


def mean_metrics(per_query: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average of per-query metric dictionaries (all with the same keys)."""
    if not per_query:
        return {}
    return {name: sum(m[name] for m in per_query) / len(per_query) for name in per_query[0]}


# --------------------------------------------------------------------------------------------
# Paired comparison of two systems on the same queries
# --------------------------------------------------------------------------------------------

# Per-query differences this small are float noise: the two systems tie on that query.
TIE_TOLERANCE = 1e-9
# Bounds the (resamples x queries) index block drawn at once to ~80 MB of int64.
_BOOTSTRAP_BLOCK = 10_000_000


@dataclass(frozen=True)
class PairedDifference:
    """``system - baseline`` on one metric, over the same queries."""

    system: float  # mean of the system's per-query values
    baseline: float
    difference: float  # mean of the per-query differences
    low: float  # percentile bootstrap interval of ``difference``
    high: float
    won: int  # queries where the system is better by more than TIE_TOLERANCE
    lost: int
    tied: int
    confidence: float
    samples: int
    seed: int

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0: the difference is real."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_bootstrap(
    system: Sequence[float],
    baseline: Sequence[float],
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDifference:
    """Mean per-query difference with a seeded percentile bootstrap interval.

    Each of ``samples`` resamples draws len(system) queries with replacement and averages their
    differences; the interval holds the middle ``confidence`` share of those averages. The same
    seed and inputs give the same interval; every metric of one comparison sees the same
    resamples (same seed, same number of queries).

    Args:
        system, baseline: per-query values of one metric, aligned by query.
    """
    import numpy as np

    if len(system) != len(baseline):
        raise ValueError(f"{len(system)} system values but {len(baseline)} baseline values")
    if not system:
        raise ValueError("no queries to compare")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    differences = np.asarray(system, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    count = len(differences)
    generator = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    # The block size depends on the number of queries only, so results depend on the seed only.
    block = max(1, _BOOTSTRAP_BLOCK // count)
    for start in range(0, samples, block):
        stop = min(samples, start + block)
        indices = generator.integers(0, count, size=(stop - start, count))  # (block, queries)
        means[start:stop] = differences[indices].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(
        system=float(np.mean(system)),
        baseline=float(np.mean(baseline)),
        difference=float(differences.mean()),
        low=float(low),
        high=float(high),
        won=int((differences > TIE_TOLERANCE).sum()),
        lost=int((differences < -TIE_TOLERANCE).sum()),
        tied=int((np.abs(differences) <= TIE_TOLERANCE).sum()),
        confidence=confidence,
        samples=samples,
        seed=seed,
    )
