"""``colbertkit score`` as a user runs it: exit codes, messages, formats, ranking, stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from colbertkit.cli.app import app

runner = CliRunner()

TWO_COLUMNS = (
    "what is the capital of france\tparis is the capital of france\n"
    "what is the capital of france\tthe cat eats fish\n"
    "how do fish swim\tfish swim in the sea\n"
)
FOUR_COLUMNS = (
    "q1\twhat is the capital of france\tp1\tthe cat eats fish\n"
    "q1\twhat is the capital of france\tp2\tparis is the capital of france\n"
    "q2\thow do fish swim\tp3\tfish swim in the sea\n"
    "q1\twhat is the capital of france\tp3\tfish swim in the sea\n"
)


@pytest.fixture
def pairs_file(tmp_path):
    def write(text: str | bytes, name: str = "pairs.tsv"):
        path = tmp_path / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    return write


def score(*args, input=None):
    return runner.invoke(app, ["score", *map(str, args)], input=input)


def test_two_columns_tsv_in_input_order(reference_dir, pairs_file):
    result = score(reference_dir, pairs_file(TWO_COLUMNS), "--format", "tsv")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.rsplit("\t", 1)[0] for line in lines] == TWO_COLUMNS.splitlines()
    assert all(-1.0 <= float(line.rsplit("\t", 1)[1]) <= 1.0 for line in lines)
    assert "found reference layout" in result.stderr


def test_piped_output_defaults_to_tsv_and_matches_python_api(reference_dir, pairs_file):
    from colbertkit.scorer import score_pairs

    result = score(reference_dir, pairs_file(TWO_COLUMNS), "--quiet")
    assert result.exit_code == 0
    assert result.stderr == ""
    cli_scores = [float(line.rsplit("\t", 1)[1]) for line in result.stdout.splitlines()]
    pairs = [tuple(line.split("\t")) for line in TWO_COLUMNS.splitlines()]
    assert cli_scores == pytest.approx(
        score_pairs(str(reference_dir), pairs, device="cpu"), abs=1e-6
    )


def test_stdin_and_output_file(reference_dir, pairs_file, tmp_path):
    out = tmp_path / "scores.tsv"
    result = score(reference_dir, "-", "--output", out, input=TWO_COLUMNS)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    from_file = score(reference_dir, pairs_file(TWO_COLUMNS), "--format", "tsv").stdout
    assert out.read_text() == from_file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.tsv", "scores.tsv"]


def test_jsonl_keeps_ids_and_line_numbers(reference_dir, pairs_file):
    result = score(reference_dir, pairs_file(FOUR_COLUMNS), "--format", "jsonl")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["line"], r["qid"], r["pid"]) for r in records] == [
        (1, "q1", "p1"),
        (2, "q1", "p2"),
        (3, "q2", "p3"),
        (4, "q1", "p3"),
    ]
    assert all(isinstance(r["score"], float) for r in records)


def test_rank_sorts_each_query_and_top_k_and_trec(reference_dir, pairs_file):
    path = pairs_file(FOUR_COLUMNS)
    plain = {
        (r["qid"], r["pid"]): r["score"]
        for r in map(
            json.loads, score(reference_dir, path, "--format", "jsonl").stdout.splitlines()
        )
    }
    ranked = score(reference_dir, path, "--rank", "--format", "jsonl").stdout.splitlines()
    ranked = [json.loads(line) for line in ranked]
    assert [r["qid"] for r in ranked] == ["q1", "q1", "q1", "q2"]
    q1 = [r["score"] for r in ranked if r["qid"] == "q1"]
    assert q1 == sorted(q1, reverse=True)
    assert [r["rank"] for r in ranked] == [1, 2, 3, 1]

    top = score(
        reference_dir, path, "--rank", "--top-k", "1", "--format", "tsv"
    ).stdout.splitlines()
    assert len(top) == 2 and all(line.split("\t")[4] == "1" for line in top)

    trec = score(reference_dir, path, "--format", "trec").stdout.splitlines()
    first = trec[0].split()
    assert first[:2] == ["q1", "Q0"] and first[3] == "1" and first[5] == "colbertkit"
    assert float(first[4]) == pytest.approx(
        max(v for (q, _), v in plain.items() if q == "q1"), abs=1e-6
    )


def test_table_on_request(reference_dir, pairs_file):
    result = score(reference_dir, pairs_file(FOUR_COLUMNS), "--format", "table", "--rank")
    assert result.exit_code == 0
    assert "qid" in result.stdout and "score" in result.stdout and "q2" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("one column only\n", "pairs.tsv:1: expected 2 or 4 tab-separated columns, found 1"),
        ("a\tb\nc\td\te\n", "pairs.tsv:2: expected 2 or 4 tab-separated columns, found 3"),
        ("a\tb\nq\ta\tp\tb\n", "pairs.tsv:2: 4 columns, but the file started with 2"),
        ("a\tb\n\t passage\n", "pairs.tsv:2: empty query"),
        ("a\tb\nq\t  \n", "pairs.tsv:2: empty passage"),
        ("q1\ta\t\tb\n", "pairs.tsv:1: empty pid"),
        (b"a\tb\nc\t\xff\xfe\n", "pairs.tsv:2: invalid UTF-8"),
        ("\n\n", "pairs.tsv: no pairs"),
    ],
)
def test_bad_lines_name_file_and_line_and_leave_no_output(
    reference_dir, pairs_file, tmp_path, content, message
):
    out = tmp_path / "scores.tsv"
    out.write_text("previous results\n")
    result = score(reference_dir, pairs_file(content), "--output", out)
    assert result.exit_code == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_text() == "previous results\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.tsv", "scores.tsv"]


def test_bad_checkpoint_leaves_no_output_file(tmp_path, pairs_file):
    out = tmp_path / "scores.tsv"
    result = score(tmp_path, pairs_file(TWO_COLUMNS), "--output", out)
    assert result.exit_code == 1
    assert "no config.json" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank"], "ranking needs ids"),
        (["--format", "trec"], "ranking needs ids"),
        (["--top-k", "2"], "--top-k needs --rank"),
        (["--dtype", "fp16", "--device", "cpu"], "fp16 is not supported on CPU"),
        (["--output", "/nonexistent/dir/out.tsv"], "does not exist"),
    ],
)
def test_usage_errors_exit_2(reference_dir, pairs_file, args, message):
    result = score(reference_dir, pairs_file(TWO_COLUMNS), *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_missing_pairs_file_exits_2(reference_dir, tmp_path):
    result = score(reference_dir, tmp_path / "absent.tsv")
    assert result.exit_code == 2
    assert "absent.tsv: no such file" in result.stderr


def test_debug_shows_the_traceback(reference_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("COLBERTKIT_DEBUG", raising=False)
    result = runner.invoke(
        app, ["--debug", "score", str(reference_dir), str(tmp_path / "absent.tsv")]
    )
    assert result.exit_code != 0
    assert result.exception is not None and "no such file" in str(result.exception)
    # The next command without --debug is back to one red line and exit 2.
    again = runner.invoke(app, ["score", str(reference_dir), str(tmp_path / "absent.tsv")])
    assert again.exit_code == 2 and "no such file" in again.stderr


def test_fresh_head_on_an_encoder_without_head(encoder_dir, pairs_file):
    assert score(encoder_dir, pairs_file(TWO_COLUMNS)).exit_code == 1
    result = score(encoder_dir, pairs_file(TWO_COLUMNS), "--fresh-head", "--colbert-dim", "8")
    assert result.exit_code == 0
    assert "fresh head 32 -> 8" in result.stderr


def test_version_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from colbertkit.cli.app import app\n"
        "for args in (['--help'], ['score', '--help'], ['--version']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False False"
    assert "colbertkit 0." in result.stdout


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "colbertkit", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("colbertkit ")


@pytest.mark.slow
def test_real_minilm_ranks_the_relevant_passage_first(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(
        "q\twhat is the capital of france\tgood\tParis is the capital and largest city of France.\n"
        "q\twhat is the capital of france\tbad\tThe recipe needs two eggs, flour and some milk.\n"
        "r\thow do fish breathe\tbad\tThe stock market fell sharply on Monday morning.\n"
        "r\thow do fish breathe\tgood\tFish breathe with gills that take oxygen from water.\n"
    )
    result = score(
        "sentence-transformers/all-MiniLM-L6-v2",
        pairs,
        "--fresh-head",
        "--rank",
        "--format",
        "jsonl",
    )
    assert result.exit_code == 0, result.output
    ranked = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["qid"], r["pid"]) for r in ranked if r["rank"] == 1] == [
        ("q", "good"),
        ("r", "good"),
    ]
    best = {r["qid"]: r["score"] for r in ranked if r["rank"] == 1}
    worst = {r["qid"]: r["score"] for r in ranked if r["rank"] == 2}
    assert all(best[q] - worst[q] > 0.1 for q in best)


def test_dtype_auto_says_what_ran(reference_dir, pairs_file):
    from colbertkit.precision import resolve_dtype

    chosen, reason = resolve_dtype("auto", "cpu")
    result = score(reference_dir, pairs_file(TWO_COLUMNS), "--device", "cpu", "--dtype", "auto")
    assert result.exit_code == 0, result.output
    assert f"scoring 3 pairs on cpu ({chosen}, {reason})" in result.stderr
    exact = score(reference_dir, pairs_file(TWO_COLUMNS), "--device", "cpu", "--dtype", chosen)
    assert result.stdout == exact.stdout


def test_fp32_run_hints_at_auto_only_where_auto_is_faster(reference_dir, pairs_file):
    from colbertkit.precision import auto_hint

    hint = auto_hint("cpu")  # None on a CPU without native bf16: nothing to gain, nothing said
    result = score(reference_dir, pairs_file(TWO_COLUMNS), "--device", "cpu")
    assert result.exit_code == 0
    assert "scoring 3 pairs on cpu (fp32)," in result.stderr
    assert ("--dtype auto is" in result.stderr) == (hint is not None)
    if hint is not None:
        assert result.stderr.count("--dtype auto is") == 1
    quiet = score(reference_dir, pairs_file(TWO_COLUMNS), "--device", "cpu", "--quiet")
    assert quiet.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-machines", "2"], "--num-machines 2 needs --main-process-ip"),
        (["--machine-rank", "1"], "--machine-rank 1 must be below --num-machines 1"),
        (["--num-processes", "2", "--device", "mps"], "--device mps: several processes"),
    ],
)
def test_launch_settings_errors_name_the_flags(reference_dir, pairs_file, args, message):
    result = score(reference_dir, pairs_file(FOUR_COLUMNS), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def colbertkit_command(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed ``colbertkit`` console script, as a user runs it."""
    import shutil

    executable = shutil.which("colbertkit") or str(
        __import__("pathlib").Path(sys.executable).with_name("colbertkit")
    )
    return subprocess.run(
        [executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


def threads_like_each_of(processes: int) -> dict[str, str]:
    """The environment of one process that computes with the threads each of ``processes``
    CPU processes gets (``OMP_NUM_THREADS``, else the machine's cores shared out). A matrix
    product's rounding depends on how many threads split it, so bit-identity holds at equal
    threads per process."""
    from colbertkit.launcher import cpu_threads_for

    return {"OMP_NUM_THREADS": str(cpu_threads_for(processes, gpu=False))}


@pytest.mark.slow
def test_two_cpu_processes_write_byte_identical_output(colbertkit_dir, tmp_path):
    # 61 pairs in windows of 8: 8 windows split over 2 processes (gloo), the last one short.
    words = [
        "the",
        "cat",
        "eats",
        "fish",
        "dogs",
        "swim",
        "in",
        "the",
        "river",
        "paris",
        "is",
        "the",
        "capital",
        "of",
        "france",
    ]
    lines = []
    for index in range(61):
        query = " ".join(words[(index // 5) % 7 : (index // 5) % 7 + 3])
        passage = " ".join(words[(index * 3) % 11 : (index * 3) % 11 + 2 + index % 6])
        lines.append(f"q{index // 5}\t{query}\tp{index}\t{passage}\n")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(lines))
    one, two = tmp_path / "one.tsv", tmp_path / "two.tsv"
    single = colbertkit_command(
        "score",
        colbertkit_dir,
        pairs,
        "-o",
        one,
        "--window",
        "8",
        "-q",
        env=threads_like_each_of(2),
    )
    assert single.returncode == 0, single.stderr
    double = colbertkit_command(
        "score", colbertkit_dir, pairs, "-o", two, "--window", "8", "--num-processes", "2"
    )
    assert double.returncode == 0, double.stderr
    assert "launching 2 process(es) x 1 machine(s) on CPU" in double.stderr
    assert two.read_bytes() == one.read_bytes()
    assert len(one.read_text().splitlines()) == 61
    # Ranked output is made from the merged scores by the same code as one process's: its
    # input is the same bytes (above), so it is too; one run shows the launch path ranks.
    ranked = colbertkit_command(
        "score", colbertkit_dir, pairs, "--format", "trec", "--window", "8", "-q",
        "--num-processes", "2",
    )  # fmt: skip
    assert ranked.returncode == 0, ranked.stderr
    cells = [line.split("\t") for line in one.read_text().splitlines()]
    ranks = [row.split() for row in ranked.stdout.splitlines()]
    assert {(r[0], r[2], r[4]) for r in ranks} == {(c[0], c[2], c[4]) for c in cells}
    assert list(dict.fromkeys(r[0] for r in ranks)) == list(dict.fromkeys(c[0] for c in cells))
    for qid in {r[0] for r in ranks}:
        mine = [r for r in ranks if r[0] == qid]
        assert [int(r[3]) for r in mine] == list(range(1, len(mine) + 1))
        assert [float(r[4]) for r in mine] == sorted((float(r[4]) for r in mine), reverse=True)


@pytest.mark.slow
def test_a_failing_worker_fails_the_command_and_writes_nothing(colbertkit_dir, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(FOUR_COLUMNS)
    out = tmp_path / "out.tsv"
    result = colbertkit_command(
        "score", colbertkit_dir, pairs, "-o", out, "--num-processes", "2", "--colbert-dim", "5"
    )
    assert result.returncode == 2, result.stderr  # the worker's own exit code (a usage error)
    assert "does not match the checkpoint's head" in result.stderr
    assert "scoring failed in a worker process" in result.stderr
    assert not out.exists()
