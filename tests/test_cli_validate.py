"""``colbertkit validate-data`` as a user runs it: exit codes, formats, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from colbertkit.cli.app import app
from colbertkit.cli.validate import render_plain

runner = CliRunner()
EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "example_data"


def row(query="what is a cat", pos=("a cat is an animal",), neg=("paris", "the sea"), **extra):
    as_list = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731
    return json.dumps({"query": query, "pos": as_list(pos), "neg": as_list(neg), **extra})


@pytest.fixture
def data_file(tmp_path):
    def write(*lines: str, name: str = "train.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write


def validate(*args):
    return runner.invoke(app, ["validate-data", *map(str, args)])


def test_clean_file_exits_0_with_a_plain_summary(data_file):
    path = data_file(row(), row(query="what is a dog"))
    result = validate(path, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert f"{path} (train): 2 lines, 2 valid rows, 0 rows with errors" in out
    assert "steps per epoch: 1 at batch size 2" in out
    assert out.rstrip().endswith("OK: no problems found")
    assert "\x1b[" not in out  # piped: no colour codes


def test_errors_exit_1_with_one_line_on_stderr(data_file):
    path = data_file(row(), "{broken", row(pos="a cat"))
    result = validate(path)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"Error: {path}: 2 errors (1 invalid_json, 1 wrong_type)")
    assert "line 2: not valid JSON" in result.stdout
    assert 'line 3: pos is a string, not a list of strings (wrap it: ["..."])' in result.stdout
    assert "FAILED: 2 errors" in result.stdout


def test_warnings_pass_unless_strict(data_file):
    path = data_file(row(), row(), row(query="b", id=3))
    relaxed = validate(path)
    assert relaxed.exit_code == 0
    assert "OK with 2 warnings" in relaxed.stdout
    strict = validate(path, "--strict")
    assert strict.exit_code == 1
    assert "--strict treats warnings as errors" in strict.stderr
    assert strict.stderr.count("\n") == 1


def test_neg_nums_warning(data_file):
    path = data_file(row(), row(query="q2", neg=["only one"]))
    result = validate(path, "--neg-nums", "2")
    assert result.exit_code == 0
    assert "few_negatives: 1" in result.stdout
    assert "line 2: 1 negatives < neg_nums 2" in result.stdout
    assert "neg resampling: 1 rows (1 examples) have < 2 negatives" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["missing.jsonl"],
        ["{train}", "--eval", "missing-eval.jsonl"],
        ["{train}", "--neg-nums", "-1"],
        ["{train}", "--batch-size", "0"],
        ["{train}", "--format", "xml"],
        ["{train}", "--no-such-option"],
        ["{train}", "--model", "no/such-dir/here"],
    ],
)
def test_cannot_run_exits_2(data_file, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    train = data_file(row())
    result = validate(*[arg.format(train=train) for arg in args])
    assert result.exit_code == 2, result.output


def test_missing_file_message_is_one_line(tmp_path):
    result = validate(tmp_path / "nope.jsonl")
    assert result.exit_code == 2
    assert result.stderr == f"Error: {tmp_path / 'nope.jsonl'}: no such file\n"


def test_json_format_has_the_documented_shape(data_file):
    train = data_file(row(), "[]", row(query="b", id=1))
    evaluation = data_file(row(query="b", pos=["new"]), name="eval.jsonl")
    result = validate(train, "--eval", evaluation, "--format", "json", "--neg-nums", "2")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["format"] == "colbertkit.validate-data" and data["format_version"] == 1
    assert (data["ok"], data["error_count"], data["warning_count"]) == (False, 1, 2)
    assert [file["role"] for file in data["files"]] == ["train", "eval"]
    train_report, eval_report = data["files"]
    assert train_report["errors"]["not_object"]["samples"] == [
        {
            "line": 2,
            "message": "the line is a JSON array, not an object: write JSON Lines, one object "
            "a line (e.g. jq -c '.[]' on a JSON array file)",
        }
    ]
    assert train_report["warnings"]["extra_keys"]["count"] == 1
    assert eval_report["warnings"]["query_in_train"]["samples"][0]["line"] == 1
    assert data["settings"]["neg_nums"] == 2
    assert train_report["statistics"]["rows"] == 2


def test_example_data_is_clean():
    result = validate(
        EXAMPLE_DATA / "train.jsonl",
        "--eval",
        EXAMPLE_DATA / "eval.jsonl",
        "--neg-nums",
        "8",
        "--strict",
    )
    assert result.exit_code == 0, result.output
    assert "OK: no problems found" in result.stdout


def test_examples_option_caps_samples(data_file):
    path = data_file(*(["oops"] * 4))
    result = validate(path, "--examples", "1", "--format", "json")
    issue = json.loads(result.stdout)["files"][0]["errors"]["invalid_json"]
    assert (issue["count"], len(issue["samples"]), issue["more"]) == (4, 1, 3)
    text = validate(path, "--examples", "1")
    assert "... and 3 more" in text.stdout


def test_rich_rendering_does_not_crash(data_file, monkeypatch):
    from colbertkit.cli import validate as validate_module

    path = data_file(row(), "{bad", row(), row(query="[red]markup[/red]", id=1))
    from colbertkit.validation import validate_dataset

    data = validate_dataset(path, neg_nums=3, batch_size=2).to_dict()
    validate_module._render_rich(data, strict=False)  # rich markup in data is escaped
    assert "FAILED" in render_plain(data)


def test_help_is_fast_and_lists_the_command():
    # A fresh interpreter: importing the CLI must not pull in torch or transformers.
    code = (
        "import sys; from colbertkit.cli.app import app; import colbertkit.cli.validate; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    result = runner.invoke(app, ["--help"])
    assert "validate-data" in result.stdout


def test_teacher_scores_summary_and_loss_option(data_file):
    graded = json.dumps({"query": "q", "pos": ["a", "b"], "pos_scores": [0.9, 0.05]})
    path = data_file(row(pos_scores=[0.75], neg_scores=[0.25, 0.5]), graded)
    result = validate(path)
    assert result.exit_code == 0, result.output
    assert (
        "teacher scores: 2 rows (1 graded, no neg); pos 0.05 .. 0.9 (mean 0.5667); "
        "neg 0.25 .. 0.5 (mean 0.375)" in result.stdout
    )
    result = validate(path, "--loss", "contrastive")
    assert result.exit_code == 1
    assert "line 2: neg is missing (a graded row without neg trains only with loss kl" in (
        result.stdout
    )
    result = validate(path, "--loss", "kl", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["settings"]["loss"] == "kl"
