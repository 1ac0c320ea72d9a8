"""``colbertkit evaluate`` as users run it: the installed command in a subprocess."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from colbertkit.cli.app import app
from tests.test_evaluation import EVAL_ROWS, PAIRS, QRELS

runner = CliRunner()

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COLBERTKIT = shutil.which("colbertkit", path=str(BIN)) or shutil.which("colbertkit")


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def colbertkit(*args: str, cwd: Path, input: str | None = None) -> subprocess.CompletedProcess:
    assert COLBERTKIT is not None, "the colbertkit command is not installed (pip install -e .)"
    return subprocess.run(
        [COLBERTKIT, *args], cwd=cwd, input=input, capture_output=True, text=True,
        env=environment(), timeout=300,
    )  # fmt: skip


def overlap_run(pairs: str) -> str:
    """A TREC run scored by word overlap: a stand-in for BM25 (with ties, as BM25 has)."""
    lines = []
    for line in pairs.splitlines():
        qid, query, pid, passage = line.split("\t")
        overlap = len(set(query.split()) & set(passage.split()))
        lines.append(f"{qid} Q0 {pid} 0 {overlap}.0 overlap\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, tiny_parts) -> Path:
    """The tiny encoder with another head: a second model that ranks differently."""
    import torch

    from colbertkit.checkpoint import save_checkpoint
    from colbertkit.model import ColBERT
    from tests.conftest import COLBERT_DIM, HIDDEN

    encoder, tokenizer, _ = tiny_parts
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("base") / "model"
    save_checkpoint(
        ColBERT(encoder, torch.nn.Linear(HIDDEN, COLBERT_DIM)),
        tokenizer,
        path,
        query_max_len=32,
        passage_max_len=64,
    )
    return path


@pytest.fixture
def workdir(tmp_path, colbertkit_dir, base_checkpoint) -> Path:
    """The files the journey's commands name, in a fresh directory."""
    (tmp_path / "ckpt").symlink_to(colbertkit_dir, target_is_directory=True)
    (tmp_path / "base").symlink_to(base_checkpoint, target_is_directory=True)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in EVAL_ROWS))
    (tmp_path / "pairs.tsv").write_text(PAIRS)
    (tmp_path / "qrels.tsv").write_text(QRELS)
    (tmp_path / "bm25.tsv").write_text(overlap_run(PAIRS))
    return tmp_path


# Every input kind and output of the command, as a user chains them (the README's own lines
# run in tests/test_readme.py, on the demo model).
JOURNEY = [
    "colbertkit evaluate ckpt/ eval.jsonl",
    "colbertkit evaluate ckpt/ eval.jsonl --baseline base/",
    "colbertkit evaluate ckpt/ pairs.tsv --qrels qrels.tsv --per-query per_query.tsv",
    "colbertkit score ckpt/ pairs.tsv > scores.tsv",
    "colbertkit evaluate --scores scores.tsv --qrels qrels.tsv",
    "colbertkit evaluate ckpt/ pairs.tsv --qrels qrels.tsv --baseline-scores bm25.tsv "
    "--format json > report.json",
]


def plain_table(stdout: str) -> dict[str, list[str]]:
    """metric -> the cells of its row in the plain-text table."""
    names = ("mrr@10", "ndcg@10", "recall@5", "recall@10", "map")
    return {
        line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.startswith(names)
    }


def run_line(line: str) -> Result:
    """One command line, in this process: argv as the shell splits it, ``> FILE`` too."""
    words = shlex.split(line, comments=True)
    target = None
    if ">" in words:
        words, target = words[: words.index(">")], words[words.index(">") + 1]
    assert words[0] == "colbertkit", line
    result = runner.invoke(app, words[1:])
    assert result.exit_code == 0, f"{line}\n{result.output}"
    if target is not None:
        Path(target).write_text(result.stdout)
    return result


def test_a_journey_through_every_input_kind(workdir, monkeypatch):
    # In process (a subprocess costs seconds of imports each); the installed command is run
    # in a subprocess by the tests below.
    monkeypatch.chdir(workdir)
    outputs = [run_line(line) for line in JOURNEY]
    rows, baseline, pairs, _, scores, _ = outputs

    table = plain_table(rows.stdout)  # piped: plain text
    assert list(table) == ["mrr@10", "ndcg@10", "recall@5", "recall@10", "map"]
    assert "queries: 3 counted (eval rows of eval.jsonl)" in rows.stdout
    assert "1 row without negatives skipped" in rows.stdout
    assert "found colbertkit layout" in rows.stderr

    assert "baseline: base/" in baseline.stdout and "95% interval" in baseline.stdout
    compared = plain_table(baseline.stdout)
    assert compared["mrr@10"][0] == table["mrr@10"][0]  # same system, same number
    won, lost, tied = map(int, compared["mrr@10"][-3:])
    assert won + lost + tied == 3

    assert "1 not in the system's run count 0" in pairs.stdout
    assert "1 without a relevant passage left out" in pairs.stdout
    per_query = (workdir / "per_query.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in per_query] == [
        ["qid", "status"], ["q1", "ranked"], ["q2", "ranked"], ["q4", "missing"],
        ["q3", "no_relevant"],
    ]  # fmt: skip

    # Scores written by `colbertkit score` give the numbers the model gave.
    assert "as a colbertkit score TSV file" in scores.stdout
    assert {k: v[0] for k, v in plain_table(scores.stdout).items()} == {
        k: v[0] for k, v in plain_table(pairs.stdout).items()
    }

    report = json.loads((workdir / "report.json").read_text())
    assert report["baseline"]["name"] == "bm25.tsv" and report["baseline"]["kind"] == "scores"
    assert set(report["comparison"]) == set(report["metrics"])
    assert report["queries"] == 3
    assert "read bm25.tsv as a TREC run file" in report["baseline"]["notes"]


def test_json_output_is_the_python_report(workdir):
    from colbertkit.evaluation import evaluate

    done = colbertkit(
        "evaluate", "--scores", "bm25.tsv", "--qrels", "qrels.tsv", "--baseline-scores",
        "bm25.tsv", "--format", "json", "--bootstrap-samples", "200", cwd=workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = evaluate(
        scores=workdir / "bm25.tsv",
        qrels=workdir / "qrels.tsv",
        baseline_scores=workdir / "bm25.tsv",
        bootstrap_samples=200,
    )
    report = json.loads(done.stdout)
    assert report["system"]["means"] == pytest.approx(expected.system.means)
    assert report["comparison"]["map"]["tied"] == 3
    assert report["system"]["missing"] == ["q4"] and report["system"]["no_relevant"] == ["q3"]


def test_pairs_from_stdin(workdir):
    from colbertkit.evaluation import evaluate

    done = colbertkit(
        "evaluate", "ckpt", "-", "--qrels", "qrels.tsv", "--format", "json", "--device", "cpu",
        cwd=workdir, input=PAIRS,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = evaluate(
        workdir / "ckpt",
        workdir / "pairs.tsv",
        qrels=workdir / "qrels.tsv",
        options={"device": "cpu"},
    )
    assert json.loads(done.stdout)["system"]["means"] == pytest.approx(expected.system.means)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt"], "CKPT needs DATA to score"),
        (["--scores", "bm25.tsv"], "--scores needs --qrels"),
        (
            ["ckpt", "eval.jsonl", "--scores", "bm25.tsv", "--qrels", "q"],
            "give CKPT and DATA, or --scores, not both",
        ),
        (
            ["--scores", "bm25.tsv", "--qrels", "qrels.tsv", "--baseline", "base"],
            "--baseline needs DATA to score",
        ),
        (["ckpt", "pairs.tsv"], "pairs.tsv: a pairs TSV needs --qrels"),
        (["ckpt", "eval.jsonl", "--qrels", "qrels.tsv"], "eval rows carry their labels"),
        (
            ["ckpt", "eval.jsonl", "--per-query", "no/dir/out.tsv"],
            "directory no/dir does not exist",
        ),
        (["--scores", "absent.tsv", "--qrels", "qrels.tsv"], "absent.tsv: no such file"),
    ],
)
def test_usage_errors_exit_2_with_one_line(workdir, args, message):
    done = colbertkit("evaluate", *args, cwd=workdir)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("qrels.tsv", "q1\tp2\t2\nq1\tp3\tvery\n", "qrels.tsv:2: grade 'very' is not an integer"),
        ("bm25.tsv", "q1 Q0 p2 1 2.0 x\nq7 Q0 p1 2 1.0 x\n", "bm25.tsv:2: query 'q7' is not in"),
    ],
)
def test_bad_input_exits_1_naming_file_and_line(workdir, name, content, message):
    (workdir / name).write_text(content)
    done = colbertkit("evaluate", "--scores", "bm25.tsv", "--qrels", "qrels.tsv", cwd=workdir)
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""


def test_help_imports_no_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from colbertkit.cli.app import app\n"
        "result = CliRunner().invoke(app, ['evaluate', '--help'])\n"
        "assert result.exit_code == 0 and '--baseline-scores' in result.stdout, result.output\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_rich_table_on_a_terminal_shows_the_same_facts(workdir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # long temporary paths would wrap in 80
    from colbertkit.cli.evaluate import _render_rich, render_plain
    from colbertkit.evaluation import evaluate

    report = evaluate(
        scores=workdir / "bm25.tsv",
        qrels=workdir / "qrels.tsv",
        baseline_scores=workdir / "bm25.tsv",
    ).to_dict()
    _render_rich(report)
    shown = capsys.readouterr().out
    plain = render_plain(report)
    for fact in ("mrr@10", "map", "95% interval", "won", "1 not in the system's run count 0"):
        assert fact in shown and fact in plain
