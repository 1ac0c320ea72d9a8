"""The evaluation core: readers of qrels and score files, which queries count, model scoring
through the one scorer, the paired comparison and the per-query file."""

from __future__ import annotations

import json
import random

import pytest

from colbertkit.errors import InputError, UsageError
from colbertkit.evaluation import MISSING, NO_RELEVANT, RANKED, evaluate, evaluate_run
from colbertkit.metrics import mean_metrics, metric_names, ranking_metrics
from colbertkit.runs import read_qrels, read_run

CPU = {"device": "cpu"}

EVAL_ROWS = [
    {
        "query": "what is the capital of france",
        "pos": ["paris is the capital of france"],
        "neg": ["the cat eats fish", "dogs run fast", "london is a city in england"],
    },
    {
        "query": "how do fish swim",
        "pos": ["fish swim in the sea", "a fish can swim in the river"],
        "neg": ["the sun is a star", "python is a language", "music and song"],
    },
    {
        "query": "which animal is a good pet",
        "pos": ["a cat is a good pet"],
        "neg": ["the moon at night", "big red ball", "history of science", "one two three"],
    },
    {"query": "what do birds eat", "pos": ["birds eat food"], "neg": []},
]

PAIRS = (
    "q1\twhat is the capital of france\tp1\tthe cat eats fish\n"
    "q1\twhat is the capital of france\tp2\tparis is the capital of france\n"
    "q1\twhat is the capital of france\tp3\tfrance is a country in europe\n"
    "q2\thow do fish swim\tp4\tfish swim in the sea\n"
    "q2\thow do fish swim\tp1\tthe cat eats fish\n"
    "q3\twhat is music\tp5\tmusic and song\n"
)
# BEIR layout with its header; q3 has no relevant passage, q4 is not in the pairs.
QRELS = (
    "query-id\tcorpus-id\tscore\nq1\tp2\t2\nq1\tp3\t1\nq1\tp9\t1\nq2\tp4\t1\nq3\tp5\t0\nq4\tp7\t1\n"
)


@pytest.fixture
def files(tmp_path):
    def write(name: str, text: str):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def eval_rows(files):
    return files("eval.jsonl", "".join(json.dumps(row) + "\n" for row in EVAL_ROWS))


def _pairs_run(checkpoint) -> dict[str, dict[str, float]]:
    from colbertkit.scorer import score_pairs

    lines = [line.split("\t") for line in PAIRS.splitlines()]
    scores = score_pairs(str(checkpoint), [(q, p) for _, q, _, p in lines], device="cpu")
    run: dict[str, dict[str, float]] = {}
    for (qid, _, pid, _), score in zip(lines, scores, strict=True):
        run.setdefault(qid, {})[pid] = score
    return run


# --- readers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "query-id\tcorpus-id\tscore\nq1\tp1\t2\nq1\tp2\t0\nq2\tp1\t1\n",
        "q1 0 p1 2\nq1 0 p2 0\n\nq2 0 p1 1\n",
        "\ufeffq1\tp1\t2\r\nq1\tp2\t0\r\nq2\tp1\t1\r\nq2\tp1\t1\r\n",  # BOM, CRLF, a repeat
    ],
)
def test_qrels_layouts(files, text):
    qrels = read_qrels(files("qrels.tsv", text))
    assert qrels.judgements == {"q1": {"p1": 2, "p2": 0}, "q2": {"p1": 1}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("q1\tp1\t1\nq1\tp2\thigh\n", "qrels.tsv:2: grade 'high' is not an integer"),
        ("q1\tp1\t1\nq1\tp2\n", "qrels.tsv:2: expected 3 or 4 columns, found 2"),
        ("q1\tp1\t1\nq1 0 p2 1\n", "qrels.tsv:2: 4 columns, but the file started with 3"),
        ("q1\tp1\t1\nq1\tp1\t2\n", "qrels.tsv:2: q1/p1 is graded 2 here but 1 on line 1"),
        ("q1\tp1\t0.5\n", "qrels.tsv:1: grade '0.5' is not an integer"),
        ("qid\tpid\tgrade\n", "qrels.tsv: no judgements"),  # a header only
        ("\n", "qrels.tsv: no judgements"),
    ],
)
def test_bad_qrels_name_file_line_and_fix(files, text, message):
    with pytest.raises(InputError) as caught:
        read_qrels(files("qrels.tsv", text))
    assert message in str(caught.value)
    assert "(" in str(caught.value)  # a fix follows


@pytest.mark.parametrize(
    ("text", "layout"),
    [
        ("qid\tpid\tscore\nq1\tp1\t0.5\nq1\tp2\t-1.25\nq2\tp1\t3\n", "qid pid score"),
        (
            "q1\tquery one\tp1\tpassage one\t0.500000\nq1\tquery one\tp2\tpassage two\t-1.25\n"
            "q2\tquery two\tp1\tpassage one\t3\n",
            "colbertkit score TSV",
        ),
        (
            "q1\tquery one\tp1\tpassage one\t1\t0.5\nq1\tquery one\tp2\tpassage two\t2\t-1.25\n"
            "q2\tquery two\tp1\tpassage one\t1\t3\n",
            "colbertkit score --rank TSV",
        ),
        ("q1 Q0 p1 1 0.5 bm25\nq1 Q0 p2 2 -1.25 bm25\nq2 Q0 p1 1 3 bm25\n", "TREC run"),
        (
            '{"line": 1, "qid": "q1", "pid": "p1", "score": 0.5}\n'
            '{"qid": "q1", "pid": "p2", "score": -1.25}\n{"qid": "q2", "pid": "p1", "score": 3}\n',
            "JSON lines",
        ),
    ],
)
def test_score_file_layouts_are_detected(files, text, layout):
    run = read_run(files("scores.tsv", text))
    assert run.format == layout
    assert run.scores == {"q1": {"p1": 0.5, "p2": -1.25}, "q2": {"p1": 3.0}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("q1\tp1\t0.5\nq1\tp2\tnan\n", "scores.tsv:2: score 'nan' is not a finite number"),
        ("q1\tp1\t0.5\nq1\tp1\t0.7\n", "scores.tsv:2: q1/p1 is scored twice (first on line 1)"),
        ("q1\tp1\t0.5\nq1\tp2\t0.5\t1\n", "scores.tsv:2: 4 columns, but the file started as"),
        ("q1 p1\n", "scores.tsv:1: 2 columns, a layout I do not know"),
        ('{"qid": "q1", "score": 1}\n', "scores.tsv:1: a JSON line needs qid, pid and score"),
    ],
)
def test_bad_score_files_name_file_line_and_fix(files, text, message):
    with pytest.raises(InputError) as caught:
        read_run(files("scores.tsv", text))
    assert message in str(caught.value)


# --- which queries count ---------------------------------------------------------------------


def test_missing_queries_count_zero_and_queries_without_relevant_are_left_out():
    qrels = {"a": {"x": 1, "y": 0}, "b": {"z": 2}, "c": {"w": 0}}
    run = {"a": {"x": 0.9, "y": 0.1}, "c": {"w": 0.5}}
    result = evaluate_run(run, qrels, recall_at=(10,))
    assert [(q.qid, q.status) for q in result.queries] == [
        ("a", RANKED),
        ("b", MISSING),
        ("c", NO_RELEVANT),
    ]
    assert result.means == pytest.approx({name: 0.5 for name in metric_names((10,))})
    assert any("1 query with a relevant passage not in the run" in n for n in result.notes)
    assert any("left out of the means (e.g. c)" in n for n in result.notes)


def test_ties_across_relevance_are_noted():
    result = evaluate_run({"a": {"x": 1.0, "y": 1.0}}, {"a": {"x": 1}})
    assert result.means["mrr@10"] == 0.5
    assert any("ranked pessimistically" in note for note in result.notes)


# --- with a model ----------------------------------------------------------------------------


def test_eval_rows_rank_each_rows_pos_and_neg_with_the_scorer(colbertkit_dir, eval_rows):
    from colbertkit.scorer import score_pairs

    report = evaluate(colbertkit_dir, eval_rows, options=CPU)
    expected = []
    for row in EVAL_ROWS[:3]:  # the last row has no negatives: skipped
        passages = [*row["pos"], *row["neg"]]
        scores = score_pairs(
            str(colbertkit_dir), [(row["query"], p) for p in passages], device="cpu"
        )
        relevance = [True] * len(row["pos"]) + [False] * len(row["neg"])
        expected.append(ranking_metrics(scores, relevance))  # what the trainer computes
    assert report.system.means == pytest.approx(mean_metrics(expected), abs=1e-6)
    assert [q.qid for q in report.system.queries] == ["1", "2", "3"]
    assert report.system.pairs_scored == sum(len(r["pos"]) + len(r["neg"]) for r in EVAL_ROWS[:3])
    assert any("1 row without negatives skipped" in note for note in report.notes)
    assert report.baseline is None and report.comparison is None


def test_pairs_with_qrels_match_the_same_scores_read_from_a_file(colbertkit_dir, files):
    qrels = files("qrels.tsv", QRELS)
    from_model = evaluate(colbertkit_dir, files("pairs.tsv", PAIRS), qrels=qrels, options=CPU)
    run = _pairs_run(colbertkit_dir)
    scores = files(
        "scores.tsv",
        "".join(f"{q}\t{p}\t{s!r}\n" for q, passages in run.items() for p, s in passages.items()),
    )
    from_file = evaluate(scores=scores, qrels=qrels)
    assert from_model.system.means == pytest.approx(from_file.system.means, abs=1e-9)
    system = from_model.system
    assert [(q.qid, q.status) for q in system.queries] == [
        ("q1", RANKED),
        ("q2", RANKED),
        ("q4", MISSING),
        ("q3", NO_RELEVANT),
    ]
    q1 = system.queries[0]
    assert (q1.candidates, q1.relevant) == (3, 3)  # p9 is judged relevant, never retrieved
    assert q1.metrics["recall@10"] == pytest.approx(2 / 3)
    assert system.queries[2].metrics == dict.fromkeys(metric_names(), 0.0)
    assert system.means["map"] == pytest.approx(
        sum(q.metrics["map"] for q in system.queries[:3]) / 3
    )
    assert list(system.means) == metric_names()


def test_an_identical_baseline_ties_on_every_query(colbertkit_dir, eval_rows, tmp_path):
    report = evaluate(colbertkit_dir, eval_rows, baseline=colbertkit_dir, options=CPU)
    assert report.comparison is not None
    for diff in report.comparison.values():
        assert (diff.low, diff.high, diff.difference) == (0.0, 0.0, 0.0)
        assert (diff.won, diff.lost, diff.tied) == (0, 0, 3)
    out = tmp_path / "per_query.tsv"
    report.write_per_query(out)
    header, *lines = out.read_text().splitlines()
    assert header.split("\t") == [
        "qid", "status", "candidates", "relevant", *metric_names(),
        *(f"baseline_{name}" for name in metric_names()),
    ]  # fmt: skip
    assert len(lines) == 3
    cells = lines[0].split("\t")
    assert cells[4:9] == cells[9:14]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "per_query.tsv"]


def _synthetic_runs(files, queries: int = 30):
    """A scores file that ranks the relevant passage first on most queries, one that does not."""
    rng = random.Random(0)
    qrels, good, bad = [], [], []
    for q in range(queries):
        qrels.append(f"q{q} 0 rel{q} 1\n")
        for p in range(5):
            pid = f"rel{q}" if p == 0 else f"n{q}-{p}"
            good.append(f"q{q}\t{pid}\t{(2.0 if p == 0 and q % 6 else 0.0) + rng.random()}\n")
            bad.append(f"q{q}\t{pid}\t{rng.random()}\n")
    return (
        files("qrels.txt", "".join(qrels)),
        files("good.tsv", "".join(good)),
        files("bad.tsv", "".join(bad)),
    )


def test_a_clearly_better_run_has_an_interval_above_zero(files):
    qrels, good, bad = _synthetic_runs(files)
    report = evaluate(scores=good, qrels=qrels, baseline_scores=bad, bootstrap_seed=3)
    assert report.comparison is not None
    mrr = report.comparison["mrr@10"]
    assert mrr.low > 0 and mrr.excludes_zero
    assert mrr.won > mrr.lost and mrr.won + mrr.lost + mrr.tied == 30
    assert mrr.difference == pytest.approx(
        report.system.means["mrr@10"] - report.baseline.means["mrr@10"]
    )
    again = evaluate(scores=good, qrels=qrels, baseline_scores=bad, bootstrap_seed=3)
    assert again.comparison == report.comparison  # seeded: the same interval
    assert any("as a qid pid score file" in note for note in report.system.notes)


# --- errors ----------------------------------------------------------------------------------


def test_queries_the_qrels_do_not_know_are_an_error_with_the_line(files):
    qrels = files("qrels.tsv", QRELS)
    scores = files("bm25.tsv", "q1\tp1\t1.0\nq8\tp1\t2.0\nq9\tp2\t1.0\nq8\tp2\t0.5\n")
    with pytest.raises(InputError) as caught:
        evaluate(scores=scores, qrels=qrels)
    message = str(caught.value)
    assert "bm25.tsv:2: query 'q8' (and 1 other queries) is not in" in message
    assert "qrels of the same queries" in message
    pairs = files("pairs.tsv", PAIRS + "q8\tquery\tp1\tpassage\n")
    with pytest.raises(InputError, match=r"pairs.tsv:7: query 'q8' is not in"):
        evaluate("unused-checkpoint", pairs, qrels=qrels)


def test_qrels_without_a_relevant_passage_stop_before_any_model_loads(files):
    qrels = files("qrels.tsv", "q1\tp1\t0\nq2\tp1\t-1\n")
    with pytest.raises(InputError, match=r"qrels.tsv: no passage is judged relevant"):
        evaluate("unused-checkpoint", files("pairs.tsv", PAIRS), qrels=qrels)


def test_pairs_listed_twice_are_an_error(files):
    pairs = files("pairs.tsv", PAIRS + PAIRS.splitlines(keepends=True)[1])
    with pytest.raises(InputError, match=r"pairs.tsv:7: q1/p2 is listed twice \(first on line 2"):
        evaluate("unused-checkpoint", pairs, qrels=files("qrels.tsv", QRELS))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "nothing to evaluate: give `checkpoint` and `data`"),
        (
            {"checkpoint": "c", "scores": "s.tsv", "qrels": "q"},
            "give `checkpoint` and `data`, or `scores`, not both",
        ),
        ({"checkpoint": "c"}, "`checkpoint` needs `data` to score"),
        ({"scores": "s.tsv"}, "`scores` needs `qrels`"),
        (
            {"scores": "s", "qrels": "q", "baseline_scores": "b", "baseline": "b"},
            "give `baseline` or `baseline_scores`, not both",
        ),
        ({"scores": "s", "qrels": "q", "baseline": "b"}, "`baseline` needs `data` to score"),
        ({"checkpoint": "c", "data": "d", "recall_at": [0]}, "`recall_at` [0]"),
        (
            {"checkpoint": "c", "data": "d", "options": {"batch_sise": 2}},
            "`batch_sise` 2: Extra inputs are not permitted",
        ),
        (
            {"checkpoint": "c", "data": "d", "options": {"encode_batch_size": 0}},
            "`encode_batch_size` 0: Input should be greater than or equal to 1",
        ),
    ],
)
def test_arguments_that_do_not_fit_together(arguments, message):
    with pytest.raises(UsageError) as caught:
        evaluate(**arguments)
    assert message in str(caught.value)


def test_data_and_qrels_must_match_in_kind(files, eval_rows, tmp_path):
    qrels = files("qrels.tsv", QRELS)
    with pytest.raises(UsageError, match="eval rows carry their labels"):
        evaluate("c", eval_rows, qrels=qrels)
    with pytest.raises(UsageError, match="a pairs TSV needs `qrels`"):
        evaluate("c", files("pairs.tsv", PAIRS))
    two_columns = files("two.tsv", "what is it\tit is this\n")
    with pytest.raises(UsageError, match=r"two.tsv:1: 2 columns, no ids"):
        evaluate("c", two_columns, qrels=qrels)
    with pytest.raises(UsageError, match=r"absent\.jsonl: no such file"):
        evaluate("c", tmp_path / "absent.jsonl")
    only_positives = files("distill.jsonl", '{"query": "q", "pos": ["a", "b"]}\n')
    with pytest.raises(InputError, match=r"distill.jsonl: no row has negatives"):
        evaluate("c", only_positives)


def test_the_trainers_evaluator_and_evaluate_agree(tmp_path, colbertkit_dir, files):
    from colbertkit.training import train
    from tests.conftest import write_training_rows

    # The trainer refuses eval rows without negatives; the others are its eval set.
    eval_rows = files("eval.jsonl", "".join(json.dumps(row) + "\n" for row in EVAL_ROWS[:3]))

    result = train(
        {
            "model": str(colbertkit_dir),
            "dataset": str(write_training_rows(tmp_path / "train.jsonl", 4)),
            "eval_dataset": str(eval_rows),
            "eval_at_start": True,  # the untrained model: the checkpoint itself
            "output_dir": str(tmp_path / "run"),
            "batch_size": 2,
            "neg_nums": 2,
            "max_steps": 1,
            "query_max_len": 32,  # the checkpoint's own lengths, which evaluate uses
            "passage_max_len": 64,
            "best_metric": None,
            "progress_bar": False,
        }
    )
    at_start = result.eval_history[0]
    assert at_start["step"] == 0
    report = evaluate(colbertkit_dir, eval_rows, options=CPU)
    assert list(report.system.means) == [name for name in at_start if name != "step"]
    for name, value in report.system.means.items():
        assert at_start[name] == pytest.approx(value, abs=1e-6), name
