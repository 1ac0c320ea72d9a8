"""Ranking metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from colbertkit.metrics import (
    mean_metrics,
    mrr_at_k,
    ndcg_at_k,
    ranked_relevance,
    ranking_metrics,
    recall_at_k,
)


def test_ranked_relevance_sorts_by_score_and_breaks_ties_pessimistically():
    assert ranked_relevance([0.1, 0.9, 0.5], [True, False, False]) == [False, False, True]
    assert ranked_relevance([1.0, 1.0], [True, False]) == [False, True]
    with pytest.raises(ValueError, match="2 scores but 1 relevance"):
        ranked_relevance([1.0, 2.0], [True])


def test_mrr():
    assert mrr_at_k([True, False]) == 1.0
    assert mrr_at_k([False, False, True]) == pytest.approx(1 / 3)
    assert mrr_at_k([False] * 10 + [True]) == 0.0  # rank 11 is outside the top 10
    assert mrr_at_k([False, True, True]) == 0.5  # first relevant only


def test_ndcg():
    assert ndcg_at_k([True, True, False]) == 1.0
    # one relevant at rank 2: (1/log2 3) / 1
    assert ndcg_at_k([False, True]) == pytest.approx(1 / math.log2(3))
    # two relevant at ranks 1 and 3, ideal 1 and 2
    expected = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k([True, False, True]) == pytest.approx(expected)
    assert ndcg_at_k([False, False]) == 0.0


def test_recall():
    ranked = [True, False, True, False, True]
    assert recall_at_k(ranked, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, 3) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, 10) == 1.0
    assert recall_at_k([False], 5) == 0.0


def test_ranking_metrics_and_mean():
    one = ranking_metrics([0.2, 0.8, 0.5], [True, False, False], recall_at=(1, 2))
    assert one == pytest.approx({"mrr@10": 1 / 3, "ndcg@10": 0.5, "recall@1": 0.0, "recall@2": 0.0})
    two = ranking_metrics([0.9, 0.1], [True, False], recall_at=(1, 2))
    mean = mean_metrics([one, two])
    assert mean["mrr@10"] == pytest.approx((1 / 3 + 1) / 2)
    assert mean["recall@1"] == 0.5
    assert mean_metrics([]) == {}
