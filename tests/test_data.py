"""The row schema, its fast path, the training reader and negative sampling."""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colbertkit.data import (
    LINE_TOO_LONG,
    RowRules,
    TrainingRow,
    check_row,
    expected_duplicates,
    fast_row_is_valid,
    iter_raw_lines,
    read_training_rows,
    sample_negatives,
    schema_problems,
)
from colbertkit.errors import ColbertkitError, InputError, UsageError

VALID = {"query": "what is a cat", "pos": ["a cat is an animal"], "neg": ["paris", "the sea"]}


def kinds(obj, require_negatives=True):
    return sorted(problem.kind for problem in schema_problems(obj, require_negatives))


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(
        b"".join(
            (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
            for line in lines
        )
    )
    return path


# ---- schema ---------------------------------------------------------------------------------


def test_valid_row_and_extra_keys_kept():
    row = TrainingRow.model_validate({**VALID, "id": 7})
    assert row.pos == ["a cat is an animal"]
    assert row.model_extra == {"id": 7}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"pos": "a cat is an animal"}, ["wrong_type"]),  # a string is never split
        ({"neg": "paris"}, ["wrong_type"]),
        ({"query": 3}, ["wrong_type"]),
        ({"query": ["q"]}, ["wrong_type"]),
        ({"pos": ["ok", 1]}, ["wrong_type"]),
        ({"pos": [None]}, ["wrong_type"]),
        ({"neg": {"a": "b"}}, ["wrong_type"]),
        ({"query": "  \t"}, ["empty_text"]),
        ({"pos": ["ok", ""]}, ["empty_text"]),
        ({"neg": ["\u3000"]}, ["empty_text"]),  # ideographic space is whitespace too
        ({"pos": []}, ["empty_pos"]),
        ({"neg": []}, ["empty_neg"]),
        ({"query": "bad \ud800 text"}, ["invalid_utf8"]),
        ({"pos": "x", "query": ""}, ["empty_text", "wrong_type"]),
    ],
)
def test_each_schema_error_kind(change, expected):
    assert kinds({**VALID, **change}) == expected


def test_missing_fields_and_non_objects():
    assert kinds({"query": "q"}) == ["missing_field"]
    (problem,) = schema_problems({"query": "q"})
    assert "pos is missing" in problem.message and "neg is missing" in problem.message
    assert kinds([1, 2]) == ["not_object"]
    assert kinds("text") == ["not_object"]
    assert kinds(None) == ["not_object"]


def test_string_instead_of_list_message_says_how_to_fix():
    (problem,) = schema_problems({**VALID, "pos": "a cat"})
    assert problem.message == 'pos is a string, not a list of strings (wrap it: ["..."])'


@pytest.mark.parametrize(
    ("change", "expected", "message"),
    [
        ({"pos_scores": [0.5]}, [], None),
        ({"pos_scores": [1], "neg_scores": [0, -2.5]}, [], None),  # ints are numbers
        (
            {"pos_scores": [0.5, 0.1]},
            ["scores_mismatch"],
            "pos_scores holds 2 values but pos has 1",
        ),
        ({"neg_scores": [0.5]}, ["scores_mismatch"], "neg_scores holds 1 values but neg has 2"),
        ({"pos_scores": [float("nan")]}, ["invalid_score"], "pos_scores[0] is nan, not a finite"),
        ({"neg_scores": [1, float("inf")]}, ["invalid_score"], "neg_scores[1] is inf"),
        ({"pos_scores": ["0.5"]}, ["invalid_score"], "pos_scores[0] must be a number, not a str"),
        ({"pos_scores": [True]}, ["invalid_score"], "must be a number, not a boolean"),
        ({"pos_scores": 0.5}, ["wrong_type"], "pos_scores must be a list of numbers, not a number"),
    ],
)
def test_teacher_scores_schema(change, expected, message):
    problems = schema_problems({**VALID, **change})
    assert sorted(problem.kind for problem in problems) == expected
    if message:
        assert message in problems[0].message


def test_graded_rows_and_required_scores():
    graded = {"query": "q", "pos": ["a", "b", "c"], "pos_scores": [0.9, 0.2, 0.1]}
    row = TrainingRow.model_validate(graded)
    assert row.is_graded and row.neg == []
    assert kinds(graded) == []  # validate-data's default: both forms
    assert kinds(graded, RowRules.for_training("kl", 15)) == []
    contrastive = schema_problems(graded, RowRules.for_training("contrastive", 15))
    assert [p.kind for p in contrastive] == ["missing_field"]
    assert "trains only with loss kl or contrastive+kl" in contrastive[0].message
    single = {"query": "q", "pos": ["a"], "pos_scores": [0.9]}
    assert kinds(single) == ["empty_neg"]  # nothing to rank the top passage against
    kl = RowRules.for_training("contrastive+kl", 15)
    assert kinds(VALID, kl) == ["missing_scores"]
    assert kinds({**VALID, "pos_scores": [1.0]}, kl) == ["missing_scores"]
    assert kinds({**VALID, "pos_scores": [1.0], "neg_scores": [0.0, 0.1]}, kl) == []


def test_negatives_optional_only_when_not_required():
    without_neg = {"query": "q", "pos": ["p"]}
    assert kinds(without_neg) == ["missing_field"]
    assert kinds(without_neg, require_negatives=False) == []
    assert kinds({**without_neg, "neg": []}, require_negatives=False) == []
    assert kinds({**without_neg, "neg": "x"}, require_negatives=False) == ["wrong_type"]


# ---- fast path == schema --------------------------------------------------------------------

TEXTS = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["", " ", "\t\n", "\x1c", "\u3000", "\u00a0", "a", " a ", "\u200b"]),
)
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXTS)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXTS, children, max_size=3),
    max_leaves=6,
)
SCORE_VALUES = st.one_of(
    st.none(),
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(min_value=-(2**60), max_value=2**60),
            st.booleans(),
            TEXTS,
        ),
        max_size=4,
    ),
    JSON_LEAVES,
)
FIELD_VALUES = st.one_of(
    TEXTS,
    st.lists(TEXTS, max_size=4),
    st.lists(st.one_of(TEXTS, JSON_LEAVES), max_size=3),
    JSON_VALUES,
)
ROW_LIKE = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "query": FIELD_VALUES,
            "pos": FIELD_VALUES,
            "neg": FIELD_VALUES,
            "pos_scores": SCORE_VALUES,
            "neg_scores": SCORE_VALUES,
            "extra": JSON_VALUES,
        },
    ),
    JSON_VALUES,
)
RULES = st.builds(RowRules, st.booleans(), st.booleans(), st.booleans())


@settings(max_examples=600, deadline=None)
@given(obj=ROW_LIKE, rules=st.one_of(st.booleans(), RULES))
def test_fast_path_agrees_with_schema(obj, rules):
    # Surrogate-free values, as json.loads gives for lines without \ud800-style escapes.
    obj = json.loads(json.dumps(obj))
    schema_valid = schema_problems(obj, rules) == []
    assert fast_row_is_valid(obj, rules) == schema_valid
    assert (check_row(obj, rules, maybe_surrogates=False) == []) == schema_valid


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4),
    negatives=st.one_of(st.none(), st.lists(st.sampled_from(["x", "y"]), max_size=3)),
    positive_scores=SCORE_VALUES,
    negative_scores=SCORE_VALUES,
    rules=RULES,
)
def test_fast_path_agrees_with_schema_on_scored_rows(
    texts, negatives, positive_scores, negative_scores, rules
):
    """Rows that are valid apart from their scores: the cases random rows rarely reach."""
    obj: dict = {"query": "q", "pos": texts}
    for key, value in (("neg", negatives), ("pos_scores", positive_scores)):
        if value is not None:
            obj[key] = value
    if negative_scores is not None:
        obj["neg_scores"] = negative_scores
    obj = json.loads(json.dumps(obj))  # NaN and Infinity survive as Python floats
    schema_valid = schema_problems(obj, rules) == []
    assert fast_row_is_valid(obj, rules) == schema_valid


# ---- line splitting --------------------------------------------------------------------------


def test_iter_raw_lines_numbers_and_limits():
    data = b"a\n" + b"x" * 3_000_000 + b"\nb\r\n\n" + b"y" * 10
    got = list(iter_raw_lines(io.BytesIO(data), max_line_bytes=100))
    assert got == [(1, b"a"), (2, LINE_TOO_LONG), (3, b"b\r"), (4, b""), (5, b"y" * 10)]
    # An over-long last line without a newline is still reported.
    assert list(iter_raw_lines(io.BytesIO(b"ok\n" + b"z" * 300), max_line_bytes=100)) == [
        (1, b"ok"),
        (2, LINE_TOO_LONG),
    ]


def test_iter_raw_lines_reports_bytes_read():
    seen = []
    list(iter_raw_lines(io.BytesIO(b"abc\n" * 10), on_bytes=seen.append))
    assert sum(seen) == 40


# ---- the training reader ---------------------------------------------------------------------


def test_reader_streams_rows_and_tolerates_bom_crlf_blank(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(VALID).encode(), b"", b"   ", json.dumps({**VALID, "id": 1}).encode()]
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    rows = list(read_training_rows(path))
    assert [line for line, _ in rows] == [1, 4]
    assert rows[0][1] == TrainingRow(**VALID)
    assert rows[1][1].model_extra == {"id": 1}


def test_reader_raises_at_first_invalid_line(tmp_path):
    path = write_lines(tmp_path, [VALID, VALID, {**VALID, "pos": "oops"}, b"{not json"])
    reader = read_training_rows(path)
    assert next(reader)[0] == 1
    assert next(reader)[0] == 2
    with pytest.raises(InputError) as caught:
        next(reader)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: pos is a string, not a list of strings")
    assert f"colbertkit validate-data {path}" in message
    assert caught.value.line == 3
    assert "\n" not in message


def test_reader_optional_negatives(tmp_path):
    path = write_lines(
        tmp_path, [{"query": "q", "pos": ["p"]}, {"query": "q", "pos": ["p"], "neg": []}]
    )
    with pytest.raises(InputError, match=":1: neg is missing"):
        list(read_training_rows(path))
    rows = list(read_training_rows(path, require_negatives=False))
    assert [row.neg for _, row in rows] == [[], []]


def test_reader_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        list(read_training_rows(tmp_path / "nope.jsonl"))
    with pytest.raises(UsageError, match="is a directory"):
        list(read_training_rows(tmp_path))


def test_reader_reads_the_example_data():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "example_data"
    train = list(read_training_rows(root / "train.jsonl"))
    evaluation = list(read_training_rows(root / "eval.jsonl"))
    assert len(train) >= 50 and len(evaluation) >= 15
    assert all(len(row.neg) >= 8 for _, row in train + evaluation)


# ---- negative sampling ------------------------------------------------------------------------


def test_sample_enough_negatives_draws_without_replacement():
    negatives = [f"n{i}" for i in range(20)]
    drawn = sample_negatives(negatives, 15, random.Random(0))
    assert len(drawn) == 15 and len(set(drawn)) == 15 and set(drawn) <= set(negatives)
    assert drawn == sample_negatives(negatives, 15, random.Random(0))  # seeded: reproducible


def test_sample_few_negatives_repeats_the_list():
    drawn = sample_negatives(["a", "b", "c"], 7, random.Random(1))
    assert len(drawn) == 7
    counts = Counter(drawn)
    # the pool is the list repeated ceil(7 / 3) = 3 times: no text more than 3 times
    assert set(counts) <= {"a", "b", "c"} and max(counts.values()) <= 3


def test_sample_edge_cases():
    assert sample_negatives([], 0, random.Random(0)) == []
    with pytest.raises(ColbertkitError, match="no hard negatives"):
        sample_negatives([], 3, random.Random(0))
    with pytest.raises(ValueError):
        sample_negatives(["a"], -1, random.Random(0))
    assert sample_negatives(["a"], 4, random.Random(0)) == ["a"] * 4


@pytest.mark.parametrize(("available", "neg_nums"), [(1, 4), (2, 3), (3, 7), (10, 15), (15, 16)])
def test_expected_duplicates_matches_simulation(available, neg_nums):
    generator = random.Random(available * 100 + neg_nums)
    negatives = [str(i) for i in range(available)]
    trials = 4000
    repeats = sum(
        neg_nums - len(set(sample_negatives(negatives, neg_nums, generator))) for _ in range(trials)
    )
    expected = expected_duplicates(available, neg_nums)
    assert expected >= neg_nums - available  # at least the pigeonhole minimum
    assert math.isclose(repeats / trials, expected, abs_tol=0.1)
    assert expected_duplicates(neg_nums, neg_nums) == 0.0
