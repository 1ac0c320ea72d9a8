"""The README is a contract: every command line it shows runs here, as written, through the
installed ``colbertkit`` command in a shell, in README order, in one workspace.

When the README changes, this module changes: a command line without a check below fails
``test_every_readme_command_line_has_a_check``. The pip parts of the first two lines are what
``.ci/run`` itself runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def code_blocks(language: str) -> list[str]:
    """Fenced blocks of ``language`` (indented ones included), dedented."""
    pattern = re.compile(rf"^( *)```{language}\n(.*?)^\1```", re.S | re.M)
    blocks = []
    for indent, body in pattern.findall(README):
        blocks.append("".join(line[len(indent) :] + "\n" for line in body.splitlines()))
    return blocks


def readme_command_lines() -> list[str]:
    """Every colbertkit command line of the README's bash blocks, in order; pip parts dropped."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            parts = [part.strip() for part in line.split(" && ")]
            kept = [part for part in parts if not part.startswith("pip ")]
            if any("colbertkit" in part for part in kept):
                commands.append(" && ".join(kept))
    return commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, cross_encoder_dir) -> Path:
    """A folder a user would have: the example data and a few files the README names."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "example_data", root / "example_data")
    shutil.copy(root / "example_data" / "train.jsonl", root / "my.jsonl")
    (root / "pairs.tsv").write_text(
        "what is the capital of france\tParis is the capital and largest city of France.\n"
        "how do fish breathe\tThe cat sat on the mat.\n"
    )
    shutil.copy(root / "example_data" / "queries.tsv", root / "run.tsv")
    (yaml_profile,) = [block for block in code_blocks("yaml") if "num_machines: 2" in block]
    (root / "two-nodes.yaml").write_text(yaml_profile)
    # mine: the training rows as queries with positives, every text of the examples as a corpus
    shutil.copy(root / "example_data" / "train.jsonl", root / "queries.jsonl")
    texts = []
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (root / "example_data" / name).read_text().splitlines():
            row = json.loads(line)
            texts += [*row["pos"], *row["neg"]]
    with open(root / "corpus.jsonl", "w") as corpus:
        for i, text in enumerate(dict.fromkeys(texts)):
            corpus.write(json.dumps({"_id": f"d{i}", "text": text}) + "\n")
    shutil.copytree(cross_encoder_dir, root / "cross-encoder")
    return root


def sh(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``command`` in bash, as a user types it, with the installed colbertkit on PATH."""
    environment = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        **env,
    }
    environment.pop("COLUMNS", None)
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def tsv_scores(text: str) -> list[float]:
    return [float(line.rsplit("\t", 1)[1]) for line in text.splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------
# One check per README command line: (expected exit code, check(result, workspace))
# ---------------------------------------------------------------------------------------------

Check = Callable[[subprocess.CompletedProcess, Path], None]


def check_demo(result, ws):
    assert (ws / "runs" / "demo" / "model" / "model.safetensors").is_file()
    assert (ws / "runs" / "demo" / "checkpoints" / "step-00000015").is_dir()
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [cells[4] for cells in lines[:3]] == ["1", "2", "3"]  # ranked, piped: TSV
    best = {cells[0]: cells[2] for cells in lines if cells[4] == "1"}
    assert best == {"q1": "p1", "q2": "p4"}  # the trained model ranks the relevant passage first
    for path in (ws / "runs" / "demo" / "model").iterdir():  # readable by the group and others
        assert mode(path) == 0o644, path


def check_score_piped(result, ws):
    assert len(tsv_scores(result.stdout)) == 2
    assert "the final model of training run runs/demo" in result.stderr


def check_score_output(result, ws):
    assert result.stdout == ""
    assert len(tsv_scores((ws / "scores.tsv").read_text())) == 2
    assert mode(ws / "scores.tsv") == 0o644


def check_score_stdin(result, ws):
    assert tsv_scores(result.stdout) == tsv_scores((ws / "scores.tsv").read_text())


def check_rank_top_k(result, ws):
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(r[0], r[4]) for r in rows] == [("q1", "1"), ("q1", "2"), ("q2", "1"), ("q2", "2")]


def check_trec(result, ws):
    rows = [line.split() for line in (ws / "run.trec").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r) == 6 and r[1] == "Q0" for r in rows)


def check_two_processes(result, ws):
    assert "launching 2 process(es) x 1 machine(s) on CPU" in result.stderr
    assert "6 pairs make 1 window(s) of up to 4096: 1 of 2 processes have nothing" in result.stderr
    assert re.search(
        r"each cpu \((bf16, \w+|fp32, no native bf16 on this CPU: \w+)\)", result.stderr
    )
    rows = [line.split("\t") for line in (ws / "scores-2.tsv").read_text().splitlines()]
    inputs = [line.split("\t") for line in (ws / "run.tsv").read_text().splitlines()]
    assert [r[:4] for r in rows] == inputs  # merged back in input order
    exact = {
        (r[0], r[2]): float(r[4])
        for r in map(str.split, (ws / "run.trec").read_text().splitlines())
    }
    for qid, _, pid, _, score in rows:
        assert abs(float(score) - exact[qid, pid]) < 2e-2  # bf16 where native: close to fp32


def check_json_quiet(result, ws):
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6 and {"qid", "pid", "score"} <= set(records[0])
    assert result.stderr == ""


def check_fresh_head(result, ws):
    assert "attached a fresh head 384 -> 128" in result.stderr
    assert len(tsv_scores(result.stdout)) == 2


def check_quick(result, ws):
    run = ws / "runs" / "quick"
    assert (run / "model" / "model.safetensors").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]


def check_resume(result, ws):
    assert "resuming from" in result.stderr and "step 4" in result.stderr


def check_more(result, ws):
    assert "training checkpoint step 15 of run" in result.stderr
    assert (ws / "runs" / "more" / "model").is_dir()


def check_overwrite(result, ws):
    assert "colbertkit:" not in result.stderr and "launching:" not in result.stderr  # --quiet
    run = ws / "runs" / "quick"
    metadata = json.loads((run / "model" / "colbertkit.json").read_text())
    assert metadata["source"]["steps"] == 2  # a new run of 2 steps, not the resumed one of 4
    # The old run went as a whole: its checkpoints too (2 steps reach no save_steps=5 save).
    assert not (run / "checkpoints").exists() or list((run / "checkpoints").iterdir()) == []


def check_bge_dry_run(result, ws):
    assert "lr: 2e-06  # flag" in result.stdout
    assert "distributed.fsdp_layer_class" in result.stdout  # what it could not find offline
    assert "- would stop the launch here:" in result.stdout
    assert "world size 8" in result.stdout  # the rest of the plan is still there
    assert not (ws / "runs" / "bge").exists()


def check_plan_json(result, ws):
    plan = json.loads((ws / "plan.json").read_text())
    assert plan["plan"]["total_steps"] == 17  # 68 examples, 4 a step
    assert plan["run_directory"] == "refused"  # runs/demo holds the demo run
    assert "already holds a training run" in plan["problems"][0]


def check_two_nodes(rank: int) -> Check:
    def check(result, ws):
        assert "num_machines: 2" in result.stdout and f"machine_rank: {rank}" in result.stdout
        assert "world size 16" in result.stdout

    return check


def check_validate(result, ws):
    assert "OK: no problems found" in result.stdout


def check_validate_tokens(result, ws):
    assert "OK: no problems found" in result.stdout
    assert "steps per epoch: 17 at batch size 4" in result.stdout  # the plan's number
    assert "0 (0.0%) over 128" in result.stdout


def check_validate_mined(result, ws):
    # Rows that BM25 could give fewer than 4 negatives are warned about, not refused.
    assert "0 rows with errors" in result.stdout and "OK" in result.stdout.splitlines()[-1]


def check_report_json(result, ws):
    report = json.loads((ws / "report.json").read_text())
    assert report["ok"] is True


def check_export(result, ws):
    assert "verified on 8 pairs" in result.stdout
    assert (ws / "exported" / "colbertkit.json").is_file()


def check_export_bf16(result, ws):
    metadata = json.loads((ws / "exported-bf16" / "colbertkit.json").read_text())
    assert metadata["dtype"] == "bf16" and metadata["source"]["step"] == 15


def check_export_reference(result, ws):
    assert (ws / "exported-reference" / "colbert_linear.pt").is_file()


def check_export_json(result, ws):
    report = json.loads((ws / "export.json").read_text())
    assert report["verified"] is True and report["layout"] == "colbertkit"


def mined(ws: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (ws / name).read_text().splitlines()]


def check_mine(result, ws):
    rows = mined(ws, "mined.jsonl")
    # A tiny corpus: BM25 retrieves only passages sharing a word, so some rows get fewer.
    assert len(rows) >= 50 and all(1 <= len(row["neg"]) <= 4 for row in rows)
    assert all(not set(row["pos"]) & set(row["neg"]) for row in rows)
    assert f"wrote {len(rows)} rows" in result.stderr


def check_mine_model(result, ws):
    assert "false_negative" in result.stderr or "likely false negatives" in result.stderr
    assert all(1 <= len(row["neg"]) <= 4 for row in mined(ws, "mined.jsonl"))


def check_mine_teacher(result, ws):
    rows = mined(ws, "distill.jsonl")
    assert json.loads((ws / "mining.json").read_text())["rows_written"] == len(rows) >= 50
    assert all(len(row["neg_scores"]) == len(row["neg"]) for row in rows)
    assert all(len(row["pos_scores"]) == len(row["pos"]) for row in rows)


def check_validate_distill(result, ws):
    rows = mined(ws, "distill.jsonl")
    assert f"{len(rows)} valid rows, 0 rows with errors" in result.stdout
    assert "teacher scores" in result.stdout.lower()


def check_distill_train(result, ws):
    assert "loss contrastive+kl (teacher temperature 1" in result.stderr
    metadata = json.loads((ws / "runs" / "distill" / "model" / "colbertkit.json").read_text())
    assert metadata["source"]["steps"] == 3
    losses = [json.loads(line)["train/loss"] for line in
              (ws / "runs" / "distill" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]  # fmt: skip
    assert losses and all(0 < loss < 100 for loss in losses)  # logged, finite


def metric_rows(stdout: str) -> dict[str, list[str]]:
    """metric -> the cells after its name in evaluate's plain-text table."""
    rows = [line.split() for line in stdout.splitlines()]
    return {r[0]: r[1:] for r in rows if r and r[0] in ("mrr@10", "ndcg@10", "recall@5", "map")}


def check_evaluate_rows(result, ws):
    assert "queries: 20 counted (eval rows of example_data/eval.jsonl)" in result.stdout
    rows = metric_rows(result.stdout)
    assert set(rows) == {"mrr@10", "ndcg@10", "recall@5", "map"}
    assert all(0 < float(cells[0]) <= 1 for cells in rows.values())


def check_evaluate_baseline(result, ws):
    assert "attached a fresh head 384 -> 128" in result.stderr  # the baseline's
    assert "95% interval" in result.stdout
    won, lost, tied = map(int, metric_rows(result.stdout)["mrr@10"][-3:])
    assert won + lost + tied == 20


def per_query_means(ws: Path) -> dict[str, float]:
    header, *lines = [line.split("\t") for line in (ws / "per_query.tsv").read_text().splitlines()]
    columns = {name: header.index(name) for name in ("mrr@10", "ndcg@10", "recall@5", "map")}
    return {
        name: sum(float(cells[i]) for cells in lines) / len(lines) for name, i in columns.items()
    }


def check_evaluate_qrels(result, ws):
    assert "queries: 2 counted (judged by example_data/qrels.tsv)" in result.stdout
    lines = (ws / "per_query.tsv").read_text().splitlines()
    assert [line.split("\t")[:4] for line in lines[1:]] == [
        ["q1", "ranked", "3", "1"],
        ["q2", "ranked", "3", "1"],
    ]


def check_evaluate_scores(result, ws):
    assert "read run.trec as a TREC run file" in result.stdout
    # run.trec holds the scores of runs/demo: the numbers the model gave above
    shown = {name: float(cells[0]) for name, cells in metric_rows(result.stdout).items()}
    assert shown == pytest.approx(per_query_means(ws), abs=1e-4)


def check_evaluate_json(result, ws):
    report = json.loads((ws / "evaluation.json").read_text())
    assert report["system"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert report["baseline"]["name"] == "run.trec" and report["queries"] == 2
    assert set(report["comparison"]) == set(report["metrics"])


CHECKS: dict[str, tuple[int, Check]] = {
    "colbertkit train --profile demo --overwrite && colbertkit score runs/demo "
    "example_data/queries.tsv --rank": (0, check_demo),
    "colbertkit score runs/demo pairs.tsv": (0, check_score_piped),
    "colbertkit score runs/demo pairs.tsv --output scores.tsv": (0, check_score_output),
    "cat pairs.tsv | colbertkit score runs/demo -": (0, check_score_stdin),
    "colbertkit score runs/demo run.tsv --rank --top-k 2": (0, check_rank_top_k),
    "colbertkit score runs/demo run.tsv --format trec > run.trec": (0, check_trec),
    "colbertkit score runs/demo run.tsv --format json --quiet": (0, check_json_quiet),
    "colbertkit score runs/demo run.tsv --dtype auto --num-processes 2 --output scores-2.tsv": (
        0,
        check_two_processes,
    ),
    "colbertkit score sentence-transformers/all-MiniLM-L6-v2 pairs.tsv --fresh-head": (
        0,
        check_fresh_head,
    ),
    "colbertkit train --profile demo --output-dir runs/quick --set max_steps=4 "
    "--set save_steps=2": (0, check_quick),
    "colbertkit train --resume runs/quick --set logging_steps=1": (0, check_resume),
    "colbertkit train --profile demo --model runs/demo/checkpoints/step-00000015 "
    "--output-dir runs/more --set max_steps=2": (0, check_more),
    "colbertkit train --profile demo --output-dir runs/quick --overwrite --set max_steps=2 "
    "--quiet": (0, check_overwrite),
    "colbertkit train --profile bge-m3 --dataset my.jsonl --output-dir runs/bge --set lr=2e-6 "
    "--dry-run": (0, check_bge_dry_run),
    "colbertkit train --profile demo --dry-run --format json > plan.json": (0, check_plan_json),
    "colbertkit train --profile two-nodes.yaml --dry-run": (0, check_two_nodes(0)),
    "colbertkit train --profile two-nodes.yaml --set distributed.machine_rank=1 --dry-run": (
        0,
        check_two_nodes(1),
    ),
    "colbertkit validate-data example_data/train.jsonl": (0, check_validate),
    "colbertkit validate-data example_data/train.jsonl --eval example_data/eval.jsonl "
    "--neg-nums 4 --model sentence-transformers/all-MiniLM-L6-v2 --query-max-len 32 "
    "--passage-max-len 128 --batch-size 4": (0, check_validate_tokens),
    "colbertkit validate-data example_data/train.jsonl --format json > report.json": (
        0,
        check_report_json,
    ),
    "colbertkit export runs/demo exported": (0, check_export),
    "colbertkit export runs/demo/checkpoints/step-00000015 exported-bf16 --dtype bf16": (
        0,
        check_export_bf16,
    ),
    "colbertkit export runs/demo exported-reference --layout reference": (
        0,
        check_export_reference,
    ),
    "colbertkit export runs/demo exported --force --format json > export.json": (
        0,
        check_export_json,
    ),
    "colbertkit mine queries.jsonl corpus.jsonl mined.jsonl --range 1:30 --neg-nums 4": (
        0,
        check_mine,
    ),
    "colbertkit mine queries.jsonl corpus.jsonl mined.jsonl --force --range 1:30 --neg-nums 4 "
    "--model runs/demo --rerank-top 30 --max-relative 0.95": (0, check_mine_model),
    "colbertkit mine queries.jsonl corpus.jsonl distill.jsonl --range 1:30 --neg-nums 4 "
    "--teacher cross-encoder --format json > mining.json": (0, check_mine_teacher),
    "colbertkit validate-data mined.jsonl --neg-nums 4": (0, check_validate_mined),
    "colbertkit validate-data distill.jsonl --neg-nums 4 --loss contrastive+kl": (
        0,
        check_validate_distill,
    ),
    "colbertkit train --profile demo --dataset distill.jsonl --output-dir runs/distill --set "
    "loss=contrastive+kl --set teacher_temperature=1 --set max_steps=3": (0, check_distill_train),
    "colbertkit evaluate runs/demo example_data/eval.jsonl": (0, check_evaluate_rows),
    "colbertkit evaluate runs/demo example_data/eval.jsonl --baseline "
    "sentence-transformers/all-MiniLM-L6-v2 --baseline-fresh-head": (0, check_evaluate_baseline),
    "colbertkit evaluate runs/demo example_data/queries.tsv --qrels example_data/qrels.tsv "
    "--per-query per_query.tsv": (0, check_evaluate_qrels),
    "colbertkit evaluate --scores run.trec --qrels example_data/qrels.tsv": (
        0,
        check_evaluate_scores,
    ),
    "colbertkit evaluate sentence-transformers/all-MiniLM-L6-v2 example_data/queries.tsv --qrels "
    "example_data/qrels.tsv --fresh-head --baseline-scores run.trec --format json > "
    "evaluation.json": (0, check_evaluate_json),
}


def test_every_readme_command_line_has_a_check():
    assert readme_command_lines() == [line for line in CHECKS if line in readme_command_lines()]
    assert set(readme_command_lines()) == set(CHECKS)


@pytest.mark.parametrize("command", readme_command_lines())
def test_readme_command_line(command, workspace):
    expected_code, check = CHECKS[command]
    previous = os.umask(0o022)
    try:
        result = sh(command, workspace)
    finally:
        os.umask(previous)
    assert result.returncode == expected_code, (result.stdout[-2000:], result.stderr[-3000:])
    check(result, workspace)


def test_readme_python_block_runs(workspace):
    (block,) = [b for b in code_blocks("python") if "import colbertkit" in b]
    script = workspace / "api.py"
    script.write_text(block)
    result = sh(f"{sys.executable} api.py", workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workspace / "py-exported" / "model.safetensors").is_file()
