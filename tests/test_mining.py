"""colbertkit.mining and colbertkit.bm25: windows, filters, sampling, formats, models, languages."""

from __future__ import annotations

import json
import math

import pytest

from colbertkit.bm25 import Analyzer, BM25Index, detect_language, normalize
from colbertkit.errors import InputError, UsageError
from colbertkit.mining import MiningReport, mine_negatives


def graded_corpus(count: int = 12) -> list[str]:
    """Passages whose BM25 score for "alpha" falls strictly with their position.

    All have 20 words; passage i holds "alpha" 20 - i times, so term frequency alone orders them.
    """
    return [" ".join(["alpha"] * (20 - i) + [f"filler{i}"] * i) for i in range(count)]


def mine(tmp_path, queries, corpus, **options) -> tuple[MiningReport, list[dict]]:
    out = tmp_path / "out.jsonl"
    options.setdefault("force", True)
    report = mine_negatives(queries, corpus, out, **options)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return report, rows


# --- analysis -------------------------------------------------------------------------------


def test_english_analysis_drops_stop_words_and_stems():
    analyzer = Analyzer("en")
    assert analyzer.terms(normalize("The cats are Running to the Rivers")) == [
        "cat",
        "run",
        "river",
    ]


def test_cjk_text_becomes_characters_and_bigrams_latin_words_stay_words():
    analyzer = Analyzer("cjk")
    # \uff0c: a full-width comma
    assert analyzer.terms(normalize("我爱北京 Beijing\uff0c天安门")) == [
        "beijing",
        "我", "爱", "北", "京", "我爱", "爱北", "北京",
        "天", "安", "门", "天安", "安门",
    ]  # fmt: skip


def test_cjk_runs_are_split_even_under_english():
    # A Chinese run is never one giant word, whatever the language of the rest.
    assert Analyzer("en").terms(normalize("北京 cities")) == ["citi", "北", "京", "北京"]


def test_normalisation_folds_width_and_case():
    full_width_abc = "\uff21\uff22\uff23"
    assert Analyzer("none").terms(normalize(full_width_abc + " Straße")) == ["abc", "strasse"]


def test_language_detection_by_share_of_cjk_characters():
    assert detect_language(["鹦鹉吃自己的小鱼吗", "how do fish swim"]) == "cjk"
    assert detect_language(["how do fish swim", "the cat eats fish", "北京"]) == "en"


def test_unknown_language_is_a_usage_error():
    with pytest.raises(UsageError, match="--language xx: use one of auto, en"):
        Analyzer("xx")


def test_index_scores_equal_bm25s_on_the_same_terms():
    import bm25s

    corpus = [
        "the cat eats fish and the dog eats meat",
        "fish swim in the sea",
        "a cat and a dog play in the garden",
        "paris is the capital of france",
        "the sea is big and blue and the fish are small",
    ]
    index = BM25Index(Analyzer("en"))
    for text in corpus:
        index.add(normalize(text))
    index.build()
    positions, scores = index.search("cats eating fish", depth=5)

    reference = bm25s.BM25(method="lucene")
    reference.index([Analyzer("en").terms(normalize(text)) for text in corpus], show_progress=False)
    query_terms = Analyzer("en").terms(normalize("cats eating fish"))
    expected = reference.get_scores(query_terms)
    matched = [i for i in range(len(corpus)) if expected[i] > 0]
    assert sorted(positions.tolist()) == matched
    assert scores.tolist() == pytest.approx([expected[i] for i in positions], rel=1e-6)
    assert list(scores) == sorted(scores, reverse=True)


def test_ties_are_ordered_by_corpus_position():
    index = BM25Index(Analyzer("en"))
    for text in ["zebra one", "zebra two", "zebra one", "zebra zebra"]:
        index.add(normalize(text))
    index.build()
    positions, _ = index.search("zebra one", depth=4)
    assert positions.tolist() == [0, 2, 3, 1]


# --- window, filters, sampling ------------------------------------------------------------


def test_negatives_come_from_the_rank_window_in_rank_order(tmp_path):
    corpus = graded_corpus()
    queries = [{"query": "alpha", "pos": ["a positive that is not in the corpus"]}]
    report, rows = mine(tmp_path, queries, corpus, rank_range="2:5", neg_nums=10)
    assert rows == [{"query": "alpha", "pos": queries[0]["pos"], "neg": corpus[2:5]}]
    assert report.candidates == 3
    assert report.rows_with_fewer == 1
    assert report.negatives_per_row == {"min": 3, "mean": 3.0, "max": 3}


def test_sampling_draws_neg_nums_from_the_window_and_keeps_rank_order(tmp_path):
    corpus = graded_corpus(30)
    queries = [{"query": "alpha", "pos": ["elsewhere"]}]
    _, rows = mine(tmp_path, queries, corpus, rank_range=(0, 30), neg_nums=5, seed=1)
    negatives = rows[0]["neg"]
    assert len(negatives) == 5
    assert set(negatives) <= set(corpus)
    assert negatives == sorted(negatives, key=corpus.index)
    _, again = mine(tmp_path, queries, corpus, rank_range=(0, 30), neg_nums=5, seed=2)
    assert again[0]["neg"] != negatives


def test_a_positive_is_never_a_negative_whatever_its_spacing_or_case(tmp_path):
    corpus = graded_corpus()
    positive = corpus[3]
    corpus.append("  " + positive.upper().replace(" ", "\u3000 ") + "\n")  # the same, spaced
    queries = [{"query": "alpha", "pos": [positive]}]
    report, rows = mine(tmp_path, queries, corpus, rank_range=(0, 20), neg_nums=20)
    assert positive not in rows[0]["neg"] and corpus[-1] not in rows[0]["neg"]
    assert len(rows[0]["neg"]) == len(corpus) - 2
    assert report.removed["positive"] == 2
    assert (report.positives, report.positives_in_corpus) == (1, 1)


def test_near_duplicates_of_a_positive_are_dropped(tmp_path):
    positive = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron"
    titled = "The Greek letters: " + positive  # contains the positive, which is most of it
    truncated = positive[: len(positive) * 2 // 3]  # most of the positive
    mention = "alpha " + " ".join(f"word{i}" for i in range(60)) + " " + positive[:20]
    corpus = [titled, truncated, mention, "alpha and omega", "alpha centauri is a star"]
    queries = [{"query": "alpha", "pos": [positive]}]
    report, rows = mine(tmp_path, queries, corpus, rank_range=(0, 10), neg_nums=10)
    assert sorted(rows[0]["neg"]) == sorted(
        [mention, "alpha and omega", "alpha centauri is a star"]
    )
    assert report.removed["near_duplicate"] == 2
    assert report.positives_in_corpus == 0


def test_repeated_corpus_texts_give_one_negative(tmp_path):
    corpus = ["alpha beta", "Alpha  Beta", "alpha gamma"]
    report, rows = mine(tmp_path, [{"query": "alpha", "pos": ["x"]}], corpus, rank_range=(0, 5))
    assert rows[0]["neg"] == ["alpha beta", "alpha gamma"]
    assert report.removed["duplicate"] == 1


def test_rows_without_candidates_are_not_written_and_are_counted(tmp_path):
    corpus = graded_corpus()
    queries = [
        {"query": "alpha", "pos": ["p"]},
        {"query": "nothing matches this", "pos": ["p"]},
        {"query": "alpha", "pos": ["p"], "neg": ["old"], "qid": "q3", "pos_scores": [1.0]},
    ]
    report, rows = mine(tmp_path, queries, corpus, rank_range=(0, 3), neg_nums=3)
    assert [row["query"] for row in rows] == ["alpha", "alpha"]
    assert rows[1] == {"query": "alpha", "pos": ["p"], "neg": corpus[:3], "qid": "q3"}
    assert report.queries == 3
    assert (report.rows_written, report.rows_without_negatives) == (2, 1)
    assert report.rows_with_replaced_negatives == 1
    assert report.short_rankings == 1


def test_same_inputs_give_byte_identical_output(tmp_path):
    corpus = graded_corpus(40) + [f"alpha beta {i}" for i in range(40)]
    queries = [{"query": "alpha beta", "pos": [f"p{i}"]} for i in range(20)]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (first, second):
        mine_negatives(queries, corpus, out, rank_range=(5, 60), neg_nums=7, seed=3)
    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len({tuple(row["neg"]) for row in rows}) > 1  # rows draw independently


# --- corpus formats -------------------------------------------------------------------------


def test_jsonl_tsv_and_text_corpora_give_the_same_negatives(tmp_path):
    corpus = graded_corpus()
    files = {
        "corpus.jsonl": "".join(
            json.dumps({"_id": f"d{i}", "text": text}) + "\n" for i, text in enumerate(corpus)
        ),
        "corpus.tsv": "".join(f"d{i}\t{text}\r\n" for i, text in enumerate(corpus)),
        "corpus.txt": "\ufeff" + "\n\n".join(corpus) + "\n",
    }
    queries = [{"query": "alpha", "pos": ["p"]}]
    results = []
    for name, content in files.items():
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        _, rows = mine(tmp_path, queries, path, rank_range=(1, 6), neg_nums=10)
        results.append(rows)
    assert results[0] == results[1] == results[2]
    assert results[0][0]["neg"] == corpus[1:6]


def test_titles_are_searched_but_not_written(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        json.dumps({"_id": "1", "title": "Zanzibar", "text": "an island off the coast"}) + "\n"
        + json.dumps({"_id": "2", "title": "Other", "text": "nothing to see"}) + "\n"
    )  # fmt: skip
    _, rows = mine(tmp_path, [{"query": "zanzibar", "pos": ["p"]}], corpus, rank_range=(0, 5))
    assert rows[0]["neg"] == ["an island off the coast"]


def test_a_bad_corpus_line_names_file_and_line_and_leaves_no_output(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "alpha"}\n{"title": "no text"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match=r"corpus.jsonl:2: no text field"):
        mine_negatives([{"query": "alpha", "pos": ["p"]}], corpus, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_cjk_corpus_is_mined_by_characters_and_bigrams(tmp_path):
    corpus = ["北京是中国的首都", "上海是一个大城市", "北京大学在海淀区", "我喜欢吃苹果"]
    queries = [{"query": "北京的大学", "pos": ["清华大学也在北京"]}]
    report, rows = mine(tmp_path, queries, corpus, rank_range=(0, 10), neg_nums=10)
    assert report.language == "cjk"
    # Ranked by shared characters and bigrams: 北京 + 大学 first, then 北京 + 的.
    assert rows[0]["neg"][:2] == ["北京大学在海淀区", "北京是中国的首都"]
    assert "我喜欢吃苹果" not in rows[0]["neg"]


# --- models ---------------------------------------------------------------------------------


def test_max_relative_drops_candidates_scoring_close_to_the_positive(tmp_path, colbertkit_dir):
    from colbertkit.scorer import score_pairs

    corpus = [
        "the cat eats fish", "a cat and a dog", "fish swim in the sea", "the dog eats meat",
        "cats like milk", "the red cat sleeps", "a big cat runs fast", "the cat is a pet animal",
    ]  # fmt: skip
    query, positive = "what does the cat eat", "cats eat fish and drink milk"
    scores = score_pairs(
        str(colbertkit_dir), [(query, text) for text in [positive, *corpus]], device="cpu"
    )
    positive_score, candidate_scores = scores[0], dict(zip(corpus, scores[1:], strict=True))
    assert positive_score > 0  # the ratio below assumes a positive score
    # A threshold halfway between two candidates' ratios: float noise cannot flip a decision.
    ratios = sorted(score / positive_score for score in candidate_scores.values())
    max_relative = (ratios[3] + ratios[4]) / 2
    report, rows = mine(
        tmp_path, [{"query": query, "pos": [positive]}], corpus, model=str(colbertkit_dir),
        rank_range=(0, 8), rerank_top=8, max_relative=max_relative, neg_nums=8, device="cpu",
    )  # fmt: skip
    retrieved = [text for text in corpus if "cat" in text or "eat" in text]
    kept = [t for t in retrieved if candidate_scores[t] <= max_relative * positive_score]
    assert rows[0]["neg"] == sorted(kept, key=lambda t: -candidate_scores[t])  # model order
    assert report.removed["false_negative"] == len(retrieved) - len(kept) > 0
    assert report.settings["max_relative"] == max_relative


def test_teacher_scores_from_a_colbert_checkpoint_are_its_maxsim(tmp_path, colbertkit_dir):
    from colbertkit.scorer import score_pairs

    corpus = graded_corpus()
    queries = [{"query": "alpha", "pos": ["alpha beta", "alpha gamma"]}]
    _, rows = mine(
        tmp_path, queries, corpus, rank_range=(0, 4), teacher=str(colbertkit_dir), device="cpu"
    )
    row = rows[0]
    expected = score_pairs(
        str(colbertkit_dir), [("alpha", text) for text in row["pos"] + row["neg"]], device="cpu"
    )
    assert row["pos_scores"] + row["neg_scores"] == pytest.approx(expected, abs=2e-6)
    assert (len(row["pos_scores"]), len(row["neg_scores"])) == (2, 4)


def test_teacher_scores_from_a_cross_encoder_are_its_logits(tmp_path, cross_encoder_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    corpus = graded_corpus()
    _, rows = mine(
        tmp_path, [{"query": "alpha", "pos": ["alpha beta"]}], corpus, rank_range=(0, 3),
        teacher=str(cross_encoder_dir), device="cpu",
    )  # fmt: skip
    row = rows[0]
    model = AutoModelForSequenceClassification.from_pretrained(str(cross_encoder_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(cross_encoder_dir))
    expected = []
    for text in row["pos"] + row["neg"]:  # one pair at a time: no padding at all
        with torch.inference_mode():
            expected.append(model(**tokenizer("alpha", text, return_tensors="pt")).logits.item())
    assert row["pos_scores"] + row["neg_scores"] == pytest.approx(expected, abs=2e-6)
    assert all(math.isfinite(score) for score in expected)


def test_an_encoder_without_head_is_no_teacher(tmp_path, encoder_dir):
    from colbertkit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="neither a ColBERT checkpoint with a head"):
        mine_negatives(
            [{"query": "a", "pos": ["b"]}], ["a"], tmp_path / "o.jsonl", teacher=str(encoder_dir)
        )


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_relative": 0.9}, "--max-relative needs --model"),
        ({"rank_range": "100:10"}, "--range 100:10 is no window: it needs 0 <= START < END"),
        ({"rank_range": "ten"}, "--range ten: write START:END"),
        ({"neg_nums": 0}, "--neg-nums 0: must be at least 1"),
        ({"model": "m", "rank_range": (0, 50), "rerank_top": 20}, "--rerank-top 20 is smaller"),
        ({"corpus_format": "csv"}, "--corpus-format csv: use one of"),
    ],
)
def test_contradictory_settings_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        mine_negatives([{"query": "a", "pos": ["b"]}], ["a"], tmp_path / "o.jsonl", **options)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_force_and_an_input_is_never_the_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    with pytest.raises(UsageError, match="already exists; choose another file or pass --force"):
        mine_negatives([{"query": "alpha", "pos": ["p"]}], ["alpha"], out)
    assert out.read_text() == "mine\n"
    with pytest.raises(UsageError, match="is also an input"):
        mine_negatives(out, ["alpha"], out, force=True)
    mine_negatives([{"query": "alpha", "pos": ["p"]}], ["alpha"], out, force=True, rank_range="0:5")
    assert json.loads(out.read_text())["neg"] == ["alpha"]
