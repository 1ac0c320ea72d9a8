"""validate_dataset: every error and warning kind with exact counts and line numbers."""

from __future__ import annotations

import json
import random
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colbertkit.data import ERROR_KINDS, read_training_rows
from colbertkit.errors import ColbertkitError, InputError, UsageError
from colbertkit.validation import (
    WARNING_KINDS,
    Distribution,
    FingerprintTable,
    validate_dataset,
)


def row(query="what is a cat", pos=("a cat is an animal",), neg=("paris", "the sea"), **extra):
    # A str stays a str (the wrong type under test); tuples become lists.
    as_list = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731
    return {"query": query, "pos": as_list(pos), "neg": as_list(neg), **extra}


def write(tmp_path, lines, name="train.jsonl", newline=b"\n"):
    """lines: dicts (dumped as JSON), str (encoded) or raw bytes; one per line."""
    path = tmp_path / name
    encoded = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        if isinstance(line, str):
            line = line.encode("utf-8")
        encoded.append(line + newline)
    path.write_bytes(b"".join(encoded))
    return path


def issues(report, severity="errors", role="train"):
    """{kind: (count, [sample lines])} for one file of a report."""
    file = report.to_dict()["files"][[f.role for f in report.files].index(role)]
    return {
        kind: (issue["count"], [sample["line"] for sample in issue["samples"]])
        for kind, issue in file[severity].items()
    }


# ---- errors ---------------------------------------------------------------------------------


def test_every_error_kind_with_counts_and_lines(tmp_path):
    path = write(
        tmp_path,
        [
            row(),  # 1 valid
            "{not json",  # 2
            b'{"query": "caf\xff"}',  # 3 invalid UTF-8
            "[1, 2]",  # 4
            {"query": "q", "pos": ["p"]},  # 5 no neg
            row(pos="a cat"),  # 6 string instead of list
            {"query": "q", "pos": ["p", 3], "neg": ["n"]},  # 7
            row(query=" \t "),  # 8
            row(pos=[]),  # 9
            row(neg=[]),  # 10
            json.dumps(row(neg=["x" * 300])),  # 11 over the 200-byte limit
            '{"query": "q\\ud800", "pos": ["p"], "neg": ["n"]}',  # 12 lone surrogate
            "",  # 13 blank: a warning, not an error
            row(query="another"),  # 14 valid
            '"just a string"',  # 15
            row(pos=["ok", ""], neg=["  "]),  # 16 two empty texts, one row
            b'{"query": "q\xed\xa0\x80", "pos": ["p"], "neg": ["n"]}',  # 17 encoded surrogate
            b'\x00"\x00a\x00"',  # 18 UTF-16: never guessed, UTF-8 only; NUL bytes: named as binary
        ],
    )
    report = validate_dataset(path, max_line_bytes=200)
    assert issues(report) == {
        "line_too_long": (1, [11]),
        "invalid_utf8": (4, [3, 12, 17, 18]),
        "invalid_json": (1, [2]),
        "not_object": (2, [4, 15]),
        "missing_field": (1, [5]),
        "wrong_type": (2, [6, 7]),
        "empty_text": (2, [8, 16]),
        "empty_pos": (1, [9]),
        "empty_neg": (1, [10]),
    }
    train = report.files[0]
    assert (train.lines, train.rows, train.rows_with_errors) == (18, 2, 15)
    assert not report.ok and report.error_count == 15
    assert issues(report, "warnings") == {"blank_line": (1, [13])}
    messages = {
        issue["samples"][0]["line"]: issue["samples"][0]["message"]
        for issue in report.to_dict()["files"][0]["errors"].values()
    }
    assert messages[6] == 'pos is a string, not a list of strings (wrap it: ["..."])'
    assert messages[5] == "neg is missing"
    assert (
        messages[11]
        == "line longer than 200 bytes (the size limit; raise `max_line_bytes` if the row is meant to be that long)"
    )


def test_samples_are_capped_and_the_rest_counted(tmp_path):
    path = write(tmp_path, [row()] + ["oops"] * 12)
    report = validate_dataset(path, sample_limit=3)
    issue = report.to_dict()["files"][0]["errors"]["invalid_json"]
    assert issue["count"] == 12
    assert [sample["line"] for sample in issue["samples"]] == [2, 3, 4]
    assert issue["more"] == 9


def test_empty_file_has_no_rows(tmp_path):
    report = validate_dataset(write(tmp_path, []))
    assert issues(report) == {"no_rows": (1, [None])}
    blank_only = validate_dataset(write(tmp_path, ["", "  "], name="blank.jsonl"))
    assert issues(blank_only) == {"no_rows": (1, [None])}
    assert issues(blank_only, "warnings") == {"blank_line": (2, [1, 2])}


def test_negatives_not_required_with_neg_nums_zero(tmp_path):
    path = write(tmp_path, [{"query": "q", "pos": ["p"]}, row(neg=[])])
    assert issues(validate_dataset(path)) == {"missing_field": (1, [1]), "empty_neg": (1, [2])}
    relaxed = validate_dataset(path, neg_nums=0)
    assert relaxed.ok and relaxed.settings["require_negatives"] is False


# ---- warnings -------------------------------------------------------------------------------


def test_few_negatives_counts_resampling(tmp_path):
    path = write(
        tmp_path,
        [
            row(neg=["a", "b", "c"]),  # 1: enough
            row(query="q2", pos=["p1", "p2"], neg=["a"]),  # 2: 1 < 3, two examples
            row(query="q3", neg=["a", "b"]),  # 3: 2 < 3
        ],
    )
    report = validate_dataset(path, neg_nums=3)
    assert issues(report, "warnings") == {"few_negatives": (2, [2, 3])}
    sampling = report.files[0].statistics["negative_sampling"]
    # 1 negative, 3 wanted: always 2 repeats (x2 examples); 2 negatives: always 1 repeat.
    assert sampling == {
        "neg_nums": 3,
        "rows_resampled": 2,
        "examples_resampled": 3,
        "expected_repeated_negatives_per_epoch": 5.0,
    }
    assert (
        "about 2.0 repeated negatives per example"
        in (report.to_dict()["files"][0]["warnings"]["few_negatives"]["samples"][0]["message"])
    )
    assert issues(validate_dataset(path), "warnings") == {}  # no neg_nums: nothing to say


def test_false_negative_and_duplicate_texts(tmp_path):
    path = write(
        tmp_path,
        [
            row(pos=["x", "y"], neg=["a", "y"]),  # 1: y in both
            row(query="q2", pos=["x", "x"], neg=["a", "b", "a"]),  # 2: repeats in both lists
            row(query="q3"),  # 3: clean
            row(query="q4", neg=["a", "a"]),  # 4
        ],
    )
    report = validate_dataset(path)
    assert issues(report, "warnings") == {
        "false_negative": (1, [1]),
        "duplicate_text": (2, [2, 4]),
    }
    messages = report.to_dict()["files"][0]["warnings"]
    assert messages["false_negative"]["samples"][0]["message"] == (
        "1 text(s) in both pos and neg (neg[1])"
    )
    assert messages["duplicate_text"]["samples"][0]["message"] == (
        "pos has 1 repeated texts; neg has 1 repeated texts"
    )


def test_duplicate_rows_and_repeated_queries(tmp_path):
    path = write(
        tmp_path,
        [
            row(),  # 1
            row(query="other"),  # 2
            row(),  # 3: same row as 1
            row(pos=["another positive"]),  # 4: same query as 1, different row
            row(id=5),  # 5: same as 1 apart from an extra key: still a duplicate
            row(pos=["yet another"]),  # 6: query of line 1 again
        ],
    )
    report = validate_dataset(path)
    found = issues(report, "warnings")
    assert found["duplicate_row"] == (2, [3, 5])
    assert found["repeated_query"] == (2, [4, 6])
    warnings = report.to_dict()["files"][0]["warnings"]
    assert warnings["duplicate_row"]["samples"][0]["message"] == "same row as line 1"
    assert warnings["repeated_query"]["samples"][1]["message"] == (
        "query also on line 1 (5 rows so far)"
    )
    assert report.files[0].statistics["most_repeated_queries"] == [{"line": 1, "rows": 5}]
    assert report.files[0].duplicate_detection["complete"] is True


def test_extra_keys(tmp_path):
    path = write(tmp_path, [row(id=1), row(query="b"), row(query="c", id=2, source="x")])
    report = validate_dataset(path)
    assert issues(report, "warnings") == {"extra_keys": (2, [1, 3])}
    assert report.files[0].statistics["extra_keys"] == {"id": 2, "source": 1}
    message = report.to_dict()["files"][0]["warnings"]["extra_keys"]["samples"][1]["message"]
    assert message == "extra keys ignored by training: id, source"


def test_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "windows.jsonl"
    lines = [json.dumps(row()), "", json.dumps(row(query="b")), "  ", json.dumps(row(query="c"))]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    report = validate_dataset(path)
    assert report.ok and report.files[0].rows == 3
    assert issues(report, "warnings") == {
        "bom": (1, [1]),
        "crlf": (5, [1, 2, 3, 4, 5]),
        "blank_line": (2, [2, 4]),
    }


def test_eval_leaks_are_warnings_on_eval_lines(tmp_path):
    train = write(
        tmp_path,
        [
            row(query="t1", pos=["tp1"], neg=["shared negative", "tn1"]),
            row(query="shared query", pos=["tp2"], neg=["tn2"]),
            row(query="t3", pos=["leaked positive"], neg=["tn3"]),
        ],
    )
    evaluation = write(
        tmp_path,
        [
            row(query="e1", pos=["ep1"], neg=["tn1"]),  # 1: negatives may be shared
            row(query="shared query", pos=["ep2"], neg=["en2"]),  # 2: query leak
            row(query="e3", pos=["leaked positive"], neg=["en3"]),  # 3: positive as a positive
            row(query="e4", pos=["shared negative"], neg=["en4"]),  # 4: positive as a negative
        ],
        name="eval.jsonl",
    )
    report = validate_dataset(train, eval_path=evaluation)
    assert [f.role for f in report.files] == ["train", "eval"]
    assert issues(report, "warnings", role="train") == {}
    assert issues(report, "warnings", role="eval") == {
        "query_in_train": (1, [2]),
        "positive_in_train": (2, [3, 4]),
    }
    samples = report.to_dict()["files"][1]["warnings"]["positive_in_train"]["samples"]
    assert samples[0]["message"] == f"a positive is also a positive on line 3 of {train}"
    assert samples[1]["message"] == f"a positive is also a negative on line 1 of {train}"
    assert report.ok and report.warning_count == 3


def test_warnings_only_for_valid_rows(tmp_path):
    # A row with an error is not also checked for duplicates or counted in statistics.
    path = write(tmp_path, [row(), row(pos="x", extra=1), row(pos="x", extra=1)])
    report = validate_dataset(path)
    assert issues(report) == {"wrong_type": (2, [2, 3])}
    assert issues(report, "warnings") == {}
    assert report.files[0].statistics["rows"] == 1


# ---- statistics -----------------------------------------------------------------------------


def test_statistics(tmp_path):
    path = write(
        tmp_path,
        [
            row(query="ab", pos=["xxxx"], neg=["n1", "n2", "n3"]),
            row(query="abcd", pos=["y", "yy", "yyy"], neg=["m"]),
            row(query="abcdef", pos=["z", "zz"], neg=["k1", "k2"]),
        ],
    )
    report = validate_dataset(path, batch_size=4)
    stats = report.files[0].statistics
    assert stats["rows"] == 3 and stats["examples"] == 6
    assert stats["steps_per_epoch"] == 2 and stats["batch_size"] == 4
    assert stats["positives_per_row"] == {
        "count": 3,
        "min": 1,
        "mean": 2.0,
        "median": 2,
        "p95": 3,
        "max": 3,
    }
    assert stats["negatives_per_row"]["median"] == 2
    assert stats["characters"]["query"] == {
        "count": 3,
        "min": 2,
        "mean": 4.0,
        "median": 4,
        "p95": 6,
        "max": 6,
    }
    assert stats["characters"]["positive"]["count"] == 6
    assert stats["tokens"] is None and stats["negative_sampling"] is None
    assert validate_dataset(path).files[0].statistics["steps_per_epoch"] is None


def test_token_statistics_with_the_packaged_minilm(tmp_path):
    path = write(
        tmp_path,
        [
            row(query="hello world", pos=["the cat sat on the mat"], neg=["a b c d e f g h"]),
            row(query="hello", pos=["hi"], neg=["one two"]),
        ],
    )
    report = validate_dataset(
        path,
        tokenizer="sentence-transformers/all-MiniLM-L6-v2",
        query_max_len=3,
        passage_max_len=5,
    )
    tokens = report.files[0].statistics["tokens"]
    # [CLS] + words + [SEP]: "hello world" 4, "hello" 3; passages 8, 10, 3, 4
    assert tokens["query"]["max"] == 4 and tokens["query"]["min"] == 3
    assert tokens["passage"]["count"] == 4
    assert (tokens["passage"]["min"], tokens["passage"]["max"]) == (3, 10)
    assert tokens["queries_truncated"] == {"count": 1, "share": 0.5}
    assert tokens["passages_truncated"] == {"count": 2, "share": 0.5}
    assert tokens["rows_tokenized"] == 2
    limited = validate_dataset(path, tokenizer=report_tokenizer(), token_rows=1)
    assert limited.files[0].statistics["tokens"]["rows_tokenized"] == 1
    assert any("first 1 valid rows" in note for note in limited.notes)


def report_tokenizer():
    from colbertkit.validation import load_tokenizer

    tokenizer, _ = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    return tokenizer


def test_bad_settings_and_missing_files_are_usage_errors(tmp_path):
    path = write(tmp_path, [row()])
    with pytest.raises(UsageError, match="no such file"):
        validate_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="no such file"):
        validate_dataset(path, eval_path=tmp_path / "missing.jsonl")
    with pytest.raises(UsageError):
        validate_dataset(path, neg_nums=-1)
    with pytest.raises(UsageError):
        validate_dataset(path, batch_size=0)
    with pytest.raises(UsageError, match=r"tokenizer .*no such directory"):
        validate_dataset(path, tokenizer=str(tmp_path / "no-tokenizer-here"))


# ---- report API -----------------------------------------------------------------------------


def test_report_json_shape(tmp_path):
    path = write(tmp_path, [row(), "bad", row(id=3)])
    report = validate_dataset(path, neg_nums=2, batch_size=8)
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert set(data) == {
        "format",
        "format_version",
        "ok",
        "error_count",
        "warning_count",
        "settings",
        "files",
        "notes",
    }
    assert data["format"] == "colbertkit.validate-data" and data["format_version"] == 1
    assert (data["ok"], data["error_count"], data["warning_count"]) == (False, 1, 2)
    (file,) = data["files"]
    assert set(file) == {
        "role",
        "path",
        "size_bytes",
        "lines",
        "rows",
        "rows_with_errors",
        "errors",
        "warnings",
        "statistics",
        "duplicate_detection",
    }
    assert set(file["errors"]["invalid_json"]) == {"count", "description", "samples", "more"}
    assert set(file["statistics"]) == {
        "rows",
        "examples",
        "batch_size",
        "steps_per_epoch",
        "positives_per_row",
        "negatives_per_row",
        "characters",
        "negative_sampling",
        "teacher_scores",
        "most_repeated_queries",
        "extra_keys",
        "tokens",
    }
    assert file["size_bytes"] == path.stat().st_size
    assert set(data["settings"]) >= {"neg_nums", "tokenizer", "batch_size", "query_max_len"}


def test_raise_for_errors_points_at_validate_data(tmp_path):
    good = write(tmp_path, [row(), row(id=1)], name="good.jsonl")
    validate_dataset(good).raise_for_errors()
    with pytest.raises(ColbertkitError, match="strict"):
        validate_dataset(good).raise_for_errors(strict=True)
    bad = write(tmp_path, [row(), "x"], name="bad.jsonl")
    with pytest.raises(ColbertkitError) as caught:
        validate_dataset(bad).raise_for_errors()
    assert f"colbertkit validate-data {bad}" in str(caught.value)
    assert "1 invalid_json" in str(caught.value)


def test_progress_callback_sees_every_byte(tmp_path):
    path = write(tmp_path, [row(query=f"q{i}") for i in range(50)])
    seen = []
    validate_dataset(path, progress=seen.append)
    assert sum(seen) == path.stat().st_size


def test_every_kind_is_documented():
    assert set(ERROR_KINDS).isdisjoint(WARNING_KINDS)
    assert all(ERROR_KINDS.values()) and all(WARNING_KINDS.values())


# ---- bounded building blocks ----------------------------------------------------------------


def test_fingerprint_table_matches_a_dict_and_stays_bounded():
    generator = random.Random(0)
    table = FingerprintTable(max_entries=5000)
    reference: dict[int, list[int]] = {}
    for line in range(1, 20001):
        key = (
            generator.getrandbits(64) if generator.random() < 0.5 else generator.randrange(2, 3000)
        )
        got = table.add(key, line)
        if key not in reference and len(reference) < 5000:
            reference[key] = [line, 0]
        if key in reference:
            reference[key][1] += 1
            assert got == tuple(reference[key])
        else:
            assert got is None
    assert table.size == 5000 and not table.complete
    assert len(table._keys) <= 16384  # never more slots than 2x the limit, rounded up
    assert table.find(-1) is None or table.find(-1)[0] >= 1


def test_fingerprint_table_zero_and_negative_keys():
    table = FingerprintTable(10)
    assert table.add(0, 1) == (1, 1)
    assert table.add(-5, 2) == (2, 1)
    assert table.add(0, 3) == (1, 2)
    assert table.find(-5) == (2, 1)
    assert table.bump(-5) == (2, 1) and table.bump(-5) == (2, 2)
    assert table.bump(42) is None


def test_distribution_is_exact_below_the_binning_threshold():
    generator = random.Random(3)
    values = [generator.randrange(0, 5000) for _ in range(1001)]
    distribution = Distribution()
    distribution.add_many(values)
    summary = distribution.summary()
    assert summary["median"] == statistics.median_low(values)
    assert (summary["min"], summary["max"]) == (min(values), max(values))
    assert summary["mean"] == round(sum(values) / len(values), 2)
    assert distribution.count_above(2500) == sum(v > 2500 for v in values)


def test_distribution_bins_large_values_with_small_error():
    distribution = Distribution()
    values = list(range(0, 2_000_000, 7))
    for start in range(0, len(values), 1000):
        distribution.add_many(values[start : start + 1000])
    assert len(distribution.counts) < 4 * 16384 + 1
    median = distribution.quantile(0.5)
    assert abs(median - statistics.median_low(values)) / statistics.median_low(values) < 0.002
    assert distribution.max == values[-1]


# ---- properties -----------------------------------------------------------------------------

LINES = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"", b"  ", b"\r", b"\xef\xbb\xbf", b"{", b"null", b"[]", b'"\\ud800"']),
    st.builds(
        lambda r: json.dumps(r, ensure_ascii=False).encode(),
        st.fixed_dictionaries(
            {},
            optional={
                "query": st.one_of(st.text(max_size=4), st.integers(), st.none()),
                "pos": st.one_of(st.lists(st.text(max_size=3), max_size=3), st.text(max_size=3)),
                "neg": st.one_of(st.lists(st.text(max_size=3), max_size=3), st.integers()),
                "x": st.integers(),
            },
        ),
    ),
    st.sampled_from(
        [
            json.dumps(row()).encode(),
            json.dumps(row(query="q\u3000")).encode(),
            b'{"query": "\\ud83d\\ude00", "pos": ["p"], "neg": ["n"]}',  # a valid pair
            b'{"query": "q", "pos": ["\\udc00"], "neg": ["n"]}',
        ]
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=600), neg_nums=st.one_of(st.none(), st.integers(0, 4)))
def test_random_bytes_never_crash(tmp_path, data, neg_nums):
    path = tmp_path / "random.jsonl"
    path.write_bytes(data)
    report = validate_dataset(path, neg_nums=neg_nums, max_line_bytes=64)
    train = report.files[0]
    blank = train.warnings.counts.get("blank_line", 0)
    assert train.rows + train.rows_with_errors + blank == train.lines
    json.loads(report.to_json())


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(LINES, min_size=1, max_size=8), require_negatives=st.booleans())
def test_reader_rejects_exactly_the_lines_the_validator_calls_errors(
    tmp_path, lines, require_negatives
):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    neg_nums = None if require_negatives else 0
    report = validate_dataset(path, neg_nums=neg_nums, sample_limit=100)
    flagged = {
        sample.get("line")
        for issue in report.to_dict()["files"][0]["errors"].values()
        for sample in issue["samples"]
    } - {None}
    rejected = set()
    for number, line in enumerate(lines, start=1):
        single = tmp_path / "single.jsonl"
        single.write_bytes(line + b"\n")
        try:
            list(read_training_rows(single, require_negatives=require_negatives))
        except InputError:
            rejected.add(number)
    assert rejected == flagged
    # On the whole file, the reader stops at the first of them.
    try:
        accepted = [
            number for number, _ in read_training_rows(path, require_negatives=require_negatives)
        ]
    except InputError as error:
        assert error.line == min(flagged)
    else:
        assert not flagged and len(accepted) == report.files[0].rows


def test_eval_rows_need_no_negatives_and_the_hint_names_eval(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps({"query": "e", "pos": ["p"]}) + "\n")
    assert validate_dataset(train, eval_path=evaluation, neg_nums=4).ok
    evaluation.write_text("not json\n")
    report = validate_dataset(train, eval_path=evaluation, neg_nums=4)
    with pytest.raises(ColbertkitError, match=f"validate-data {train} --eval {evaluation}"):
        report.raise_for_errors()


def test_neg_nums_0_says_what_training_needs_and_huge_negative_lists_warn(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [
        {"query": "q", "pos": ["p"], "neg": []},
        {"query": "r", "pos": ["p"], "neg": [f"n{i}" for i in range(1001)]},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = validate_dataset(data, neg_nums=0)
    assert report.ok
    assert any("other_positives_as_negatives: true" in note for note in report.notes)
    warnings = report.file("train").to_dict()["warnings"]
    assert warnings["many_negatives"]["samples"][0]["line"] == 2


# ---- teacher scores ---------------------------------------------------------------------------


def test_teacher_scores_checked_with_line_numbers_and_ranges_reported(tmp_path):
    path = write(
        tmp_path,
        [
            row(pos_scores=[0.9], neg_scores=[0.1, 0.95]),  # 1: a negative above the positive
            row(pos_scores=[0.9, 0.8]),  # 2: two scores for one positive
            row(pos_scores=[0.7], neg_scores=[0.2, "high"]),  # 3: not a number
            '{"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": [NaN], "neg_scores": [0]}',
            {"query": "q2", "pos": ["a", "b", "c"], "pos_scores": [3, -1, 0.5]},  # 5: graded
            row(pos_scores=[0.6], neg_scores=[0.0, 0.3]),  # 6
        ],
    )
    report = validate_dataset(path, neg_nums=2)
    assert issues(report) == {
        "invalid_score": (2, [3, 4]),
        "scores_mismatch": (1, [2]),
    }
    statistics = report.file("train").statistics
    assert statistics["examples"] == 3  # rows 1 and 6, and the graded row 5 once
    teacher = statistics["teacher_scores"]
    assert (teacher["rows"], teacher["graded_rows"]) == (3, 1)
    assert teacher["positive"] == {
        "count": 5, "min": -1, "max": 3, "mean": pytest.approx((0.9 + 3 - 1 + 0.5 + 0.6) / 5)
    }  # fmt: skip
    assert (teacher["negative"]["min"], teacher["negative"]["max"]) == (0.0, 0.95)
    assert teacher["rows_with_a_negative_above_a_positive"] == 1
    assert "pos_scores" not in statistics["extra_keys"]


def test_logit_scale_teachers_and_thin_graded_rows_are_warned_about(tmp_path):
    path = write(
        tmp_path,
        [
            row(neg=("x", "y", "z"), pos_scores=[0.9], neg_scores=[0.1, 0.5, 0.2]),  # 1: 0..1
            row("q1", neg=("x", "y", "z"), pos_scores=[7.5], neg_scores=[-3.0, 1.2, 0]),  # logits
            {"query": "q2", "pos": ["a", "b", "c"], "pos_scores": [0.9, 0.5, 0.1]},  # 3: 2 others
            {"query": "q3", "pos": ["a", "b", "c", "d"], "pos_scores": [0.9, 0.5, 0.1, 0.2]},
        ],
    )
    report = validate_dataset(path, neg_nums=3)
    assert issues(report) == {}
    assert issues(report, "warnings") == {"score_scale": (1, [2]), "few_candidates": (1, [3])}
    samples = report.to_dict()["files"][0]["warnings"]["score_scale"]["samples"]
    assert "magnitude 7.5" in samples[0]["message"]


def test_loss_decides_what_rows_need(tmp_path):
    graded = {"query": "q", "pos": ["a", "b"], "pos_scores": [0.9, 0.1]}
    path = write(tmp_path, [row(), graded])
    assert issues(validate_dataset(path, neg_nums=3)) == {}
    assert issues(validate_dataset(path, neg_nums=3, loss="contrastive")) == {
        "missing_field": (1, [2])
    }
    assert issues(validate_dataset(path, neg_nums=3, loss="kl")) == {"missing_scores": (1, [1])}
    assert validate_dataset(path, loss="kl").settings["loss"] == "kl"
    with pytest.raises(UsageError, match="loss"):
        validate_dataset(path, loss="ce")
