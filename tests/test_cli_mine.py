"""``colbertkit mine`` as a user runs it: the installed command in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import WORDS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's `colbertkit` console script


def run(*command: str, cwd: Path, shell: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    args = command[0] if shell else [str(BIN / "colbertkit"), *command]
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, shell=shell
    )


@pytest.fixture
def workdir(tmp_path) -> Path:
    """queries.jsonl and corpus.jsonl (BEIR-like) from the tiny model's vocabulary."""
    words = sorted(set(WORDS))
    passages = [
        " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12)) for i in range(150)
    ]
    with open(tmp_path / "corpus.jsonl", "w") as corpus:
        for i, text in enumerate(passages):
            corpus.write(json.dumps({"_id": f"doc{i}", "title": words[i % 9], "text": text}) + "\n")
    with open(tmp_path / "queries.jsonl", "w") as queries:
        for i in range(0, 150, 10):
            query = " ".join(passages[i].split()[:3])
            queries.write(json.dumps({"qid": f"q{i}", "query": query, "pos": [passages[i]]}) + "\n")
    return tmp_path


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_summary_on_stderr_and_output_passes_validate_data(workdir):
    result = run(
        "mine", "queries.jsonl", "corpus.jsonl", "out.jsonl", "--neg-nums", "4", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "language: en (detected from the first 150 passages)" in result.stderr
    assert (
        "wrote 15 rows to out.jsonl (60 negatives; per row min 4, mean 4.0, max 4)" in result.stderr
    )
    assert "15 of 15 positives found in it" in result.stderr
    assert re.search(r"indexed in [\d.]+ s \([\d,]+ passages/s\), mined in", result.stderr)
    assert sorted(p.name for p in workdir.iterdir()) == [
        "corpus.jsonl",
        "out.jsonl",
        "queries.jsonl",
    ]

    checked = run("validate-data", "out.jsonl", "--neg-nums", "4", cwd=workdir)
    assert checked.returncode == 0, checked.stdout
    assert "0 rows with errors" in checked.stdout


def test_json_report_matches_the_file_and_runs_repeat_exactly(workdir):
    first = run(
        "mine",
        "queries.jsonl",
        "corpus.jsonl",
        "a.jsonl",
        "--format",
        "json",
        "--seed",
        "5",
        cwd=workdir,
    )
    second = run(
        "mine", "queries.jsonl", "corpus.jsonl", "b.jsonl", "--quiet", "--seed", "5", cwd=workdir
    )
    assert first.returncode == second.returncode == 0
    assert second.stderr == "" and second.stdout == ""
    assert (workdir / "a.jsonl").read_bytes() == (workdir / "b.jsonl").read_bytes()
    report = json.loads(first.stdout)
    rows = (workdir / "a.jsonl").read_text().splitlines()
    assert report["rows_written"] == len(rows)
    assert report["negatives_written"] == sum(len(json.loads(row)["neg"]) for row in rows)
    assert set(report["removed"]) == {"positive", "near_duplicate", "duplicate", "false_negative"}


def test_existing_output_exits_2_unless_force(workdir):
    (workdir / "out.jsonl").write_text("keep me\n")
    result = run("mine", "queries.jsonl", "corpus.jsonl", "out.jsonl", cwd=workdir)
    assert result.returncode == 2
    assert error_line(result) == (
        "Error: out.jsonl already exists; choose another file or pass --force"
    )
    assert (workdir / "out.jsonl").read_text() == "keep me\n"
    forced = run("mine", "queries.jsonl", "corpus.jsonl", "out.jsonl", "--force", cwd=workdir)
    assert forced.returncode == 0
    assert json.loads((workdir / "out.jsonl").read_text().splitlines()[0])["neg"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--max-relative", "0.9"],
            "Error: --max-relative needs --model: it compares model scores",
        ),
        (["--range", "5"], "Error: --range 5: write START:END, e.g. 10:100"),
        (["--language", "xx"], "Error: --language xx: use one of auto, en,"),
    ],
)
def test_usage_errors_exit_2_with_one_line(workdir, args, message):
    result = run("mine", "queries.jsonl", "corpus.jsonl", "out.jsonl", *args, cwd=workdir)
    assert result.returncode == 2
    assert error_line(result).startswith(message)
    assert not (workdir / "out.jsonl").exists()


def test_bad_input_lines_exit_1_naming_file_and_line(workdir):
    with open(workdir / "queries.jsonl", "a") as queries:
        queries.write('{"query": "q", "pos": "not a list"}\n')
    result = run("mine", "queries.jsonl", "corpus.jsonl", "out.jsonl", cwd=workdir)
    assert result.returncode == 1
    assert error_line(result).startswith(
        "Error: queries.jsonl:16: pos is a string, not a list of strings"
    )
    assert not (workdir / "out.jsonl").exists()
