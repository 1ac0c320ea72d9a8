"""Ranking metrics: hand-computed cases, pytrec_eval on random runs, the paired bootstrap."""

from __future__ import annotations

import math
import random

import pytest

from colbertkit.metrics import (
    average_precision,
    mean_metrics,
    metric_names,
    mrr_at_k,
    ndcg_at_k,
    paired_bootstrap,
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
    assert one == pytest.approx(
        {"mrr@10": 1 / 3, "ndcg@10": 0.5, "recall@1": 0.0, "recall@2": 0.0, "map": 1 / 3}
    )
    two = ranking_metrics([0.9, 0.1], [True, False], recall_at=(1, 2))
    mean = mean_metrics([one, two])
    assert mean["mrr@10"] == pytest.approx((1 / 3 + 1) / 2)
    assert mean["recall@1"] == 0.5
    assert mean_metrics([]) == {}


# --- graded relevance, judgements beyond the candidates, MAP ----------------------------------


def test_graded_ndcg_uses_the_grade_as_gain_and_every_judged_passage_for_the_ideal():
    # ranked grades 0, 2, 1; a grade-3 passage of the qrels was never retrieved
    ranked = [0, 2, 1]
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked) == pytest.approx(dcg / (2 + 1 / math.log2(3)))
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, all_grades=[3, 2, 1, 0]) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(ranked, k=1) == 0.0


def test_average_precision_counts_relevant_passages_never_retrieved():
    ranked = [True, False, True]  # precisions 1/1 and 2/3 at the two hits
    assert average_precision(ranked) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(ranked, total_relevant=4) == pytest.approx((1 + 2 / 3) / 4)
    assert average_precision([False, False]) == 0.0
    assert recall_at_k(ranked, 1, total_relevant=4) == 0.25


def test_ties_rank_lower_grades_first():
    assert ranked_relevance([0.5, 0.5, 0.5, 0.9], [2, 0, 1, 0]) == [0, 0, 1, 2]
    metrics = ranking_metrics([1.0, 1.0], [1, 0])
    assert metrics["mrr@10"] == 0.5  # a scorer that cannot tell them apart is not rewarded


def test_trainer_names_are_kept_and_map_added():
    assert metric_names((10, 5, 5)) == ["mrr@10", "ndcg@10", "recall@5", "recall@10", "map"]
    assert list(ranking_metrics([0.1, 0.2], [True, False])) == metric_names()


def _random_query(rng: random.Random, qid: int):
    """Graded qrels over 30 passages and a run over a random subset (some judged, some not)."""
    passages = [f"d{i}" for i in range(30)]
    judged = {p: rng.choice([0, 0, 1, 2, 3]) for p in rng.sample(passages, rng.randint(1, 12))}
    if not any(grade > 0 for grade in judged.values()):
        judged[rng.choice(list(judged))] = rng.randint(1, 3)
    ranked = {p: rng.uniform(-1, 1) for p in rng.sample(passages, rng.randint(1, 25))}
    return f"q{qid}", judged, ranked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_pytrec_eval_on_random_graded_runs(seed):
    import pytrec_eval  # dev dependency: pytrec-eval-terrier

    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(40):
        qid, judged, ranked = _random_query(rng, q)
        qrels[qid], run[qid] = judged, ranked
    reference = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10", "recall.1,5,20", "map"}
    ).evaluate(run)
    # trec_eval's recip_rank has no cut-off: give it each query's top 10 only.
    top10 = {q: dict(sorted(r.items(), key=lambda item: -item[1])[:10]) for q, r in run.items()}
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    for qid, ranked in run.items():
        pids = list(ranked)
        ours = ranking_metrics(
            [ranked[p] for p in pids],
            [qrels[qid].get(p, 0) for p in pids],
            recall_at=(1, 5, 20),
            all_grades=list(qrels[qid].values()),
        )
        theirs = reference[qid]
        assert ours["ndcg@10"] == pytest.approx(theirs["ndcg_cut_10"], abs=1e-6)
        assert ours["map"] == pytest.approx(theirs["map"], abs=1e-6)
        for k in (1, 5, 20):
            assert ours[f"recall@{k}"] == pytest.approx(theirs[f"recall_{k}"], abs=1e-6)
        assert ours["mrr@10"] == pytest.approx(reciprocal[qid]["recip_rank"], abs=1e-6)
    assert any(0 < reference[q]["map"] < 1 for q in run)  # the runs are not trivial


# --- paired bootstrap ------------------------------------------------------------------------


def test_an_identical_baseline_is_all_ties_with_a_zero_interval():
    values = [random.Random(3).random() for _ in range(30)]
    result = paired_bootstrap(values, list(values), samples=500, seed=1)
    assert (result.low, result.high, result.difference) == (0.0, 0.0, 0.0)
    assert (result.won, result.lost, result.tied) == (0, 0, 30)
    assert not result.excludes_zero


def test_a_clearly_better_system_has_an_interval_above_zero():
    rng = random.Random(4)
    baseline = [rng.uniform(0, 0.6) for _ in range(50)]
    system = [value + rng.uniform(0.05, 0.3) for value in baseline]
    system[0] = baseline[0]  # one tie
    system[1] = baseline[1] - 0.1  # one loss
    result = paired_bootstrap(system, baseline, samples=2000, seed=0)
    mean = sum(s - b for s, b in zip(system, baseline, strict=True)) / 50
    assert result.difference == pytest.approx(mean)
    assert 0 < result.low < mean < result.high
    assert result.excludes_zero
    assert (result.won, result.lost, result.tied) == (48, 1, 1)
    assert paired_bootstrap(baseline, system, samples=2000, seed=0).high < 0


def test_the_bootstrap_is_deterministic_for_a_seed():
    rng = random.Random(5)
    system = [rng.random() for _ in range(40)]
    baseline = [rng.random() for _ in range(40)]
    first = paired_bootstrap(system, baseline, samples=300, seed=7)
    assert paired_bootstrap(system, baseline, samples=300, seed=7) == first
    other = paired_bootstrap(system, baseline, samples=300, seed=8)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.difference == first.difference


def test_bootstrap_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 system values but 1 baseline"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="no queries"):
        paired_bootstrap([], [])
