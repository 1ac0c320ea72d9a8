"""Every command takes every checkpoint form, and says which form it found.

The forms: a training run directory (its final ``model/``), ``best/``, ``checkpoints/step-N``,
colbertkit's layout, the reference layout, a bare encoder (with a fresh head).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from colbertkit.checkpoint import load_checkpoint
from colbertkit.cli.app import app
from colbertkit.errors import CheckpointError
from colbertkit.export import export_model
from colbertkit.scorer import PairScorer
from tests.conftest import write_training_rows

runner = CliRunner()
PAIRS = [("what is the capital of france", "paris is the capital of france"), ("cat", "dog fish")]


@pytest.fixture(scope="module")
def run_with_best(tmp_path_factory, colbertkit_dir) -> Path:
    """A real training run with a checkpoint at step 2, best/ and model/."""
    from colbertkit.training import train

    root = tmp_path_factory.mktemp("forms")
    rows = write_training_rows(root / "train.jsonl", 8)
    result = train(
        {
            "model": str(colbertkit_dir),
            "dataset": str(rows),
            "eval_dataset": str(rows),
            "output_dir": str(root / "run"),
            "batch_size": 4,
            "neg_nums": 2,
            "max_steps": 2,
            "save_steps": 2,
            "query_max_len": 16,
            "passage_max_len": 24,
            "progress_bar": False,
        }
    )
    assert (result.output_dir / "best").is_dir()
    return result.output_dir


def scores_of(spec) -> list[float]:
    loaded = load_checkpoint(spec)
    scorer = PairScorer(
        loaded.model,
        loaded.tokenizer,
        query_max_len=loaded.query_max_len,
        passage_max_len=loaded.passage_max_len,
    )
    return list(scorer.score(PAIRS))


def test_a_run_directory_means_its_final_model(run_with_best):
    by_run = load_checkpoint(run_with_best)
    assert by_run.source.path == run_with_best / "model"
    assert f"the final model of training run {run_with_best}" in by_run.notes[0]
    assert scores_of(run_with_best) == scores_of(run_with_best / "model")


def test_a_step_checkpoint_loads_with_the_weights_of_that_step(run_with_best):
    (step,) = sorted((run_with_best / "checkpoints").iterdir())
    loaded = load_checkpoint(step)
    assert loaded.source.kind == "training"
    assert f"training checkpoint step 2 of run {run_with_best}" in loaded.notes[0]
    # The run ended at step 2, so the step-2 checkpoint holds the final weights.
    final = load_checkpoint(run_with_best / "model")
    for name, value in final.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    assert (loaded.query_max_len, loaded.passage_max_len) == (16, 24)


def test_best_is_named_as_the_best_model_of_its_run(run_with_best):
    loaded = load_checkpoint(run_with_best / "best")
    assert f"the best model of training run {run_with_best}" in loaded.notes[0]


def test_a_run_without_a_final_model_points_at_its_newest_checkpoint(run_with_best, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(run_with_best, partial)
    shutil.rmtree(partial / "model")
    with pytest.raises(CheckpointError, match=r"without a final model/.*step-00000002"):
        load_checkpoint(partial)


@pytest.mark.parametrize("form", ["run", "best", "step", "colbertkit", "reference"])
def test_score_cli_takes_every_form_and_says_which(
    form, run_with_best, colbertkit_dir, reference_dir, tmp_path
):
    spec = {
        "run": run_with_best,
        "best": run_with_best / "best",
        "step": next((run_with_best / "checkpoints").iterdir()),
        "colbertkit": colbertkit_dir,
        "reference": reference_dir,
    }[form]
    said = {
        "run": "the final model of training run",
        "best": "the best model of training run",
        "step": "training checkpoint step 2",
        "colbertkit": "colbertkit layout",
        "reference": "reference layout",
    }[form]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{q}\t{p}\n" for q, p in PAIRS))
    result = runner.invoke(app, ["score", str(spec), str(pairs), "--format", "tsv"])
    assert result.exit_code == 0, result.output
    assert said in result.stderr
    scores = [float(line.split("\t")[-1]) for line in result.stdout.splitlines()]
    assert scores == pytest.approx(scores_of(spec), abs=1e-6)


@pytest.mark.parametrize("form", ["run", "best", "step"])
def test_export_takes_every_run_form(form, run_with_best, tmp_path):
    spec = {
        "run": run_with_best,
        "best": run_with_best / "best",
        "step": next((run_with_best / "checkpoints").iterdir()),
    }[form]
    lines = []
    report = export_model(spec, tmp_path / "out", log=lines.append)
    assert report.verified
    assert scores_of(tmp_path / "out") == pytest.approx(scores_of(spec), abs=1e-6)
    assert "training run" in lines[0] or "training checkpoint" in lines[0]


def test_train_continues_fine_tuning_from_a_step_checkpoint(run_with_best, tmp_path):
    from colbertkit.training import train

    (step,) = sorted((run_with_best / "checkpoints").iterdir())
    rows = write_training_rows(tmp_path / "train.jsonl", 4)
    result = train(
        {
            "model": str(step),
            "dataset": str(rows),
            "output_dir": str(tmp_path / "again"),
            "batch_size": 4,
            "neg_nums": 2,
            "max_steps": 1,
            "lr": 1e-12,  # a step that cannot move the weights measurably
            "max_grad_norm": None,
            "query_max_len": 16,
            "passage_max_len": 24,
            "progress_bar": False,
        }
    )
    started = load_checkpoint(step).model.state_dict()
    continued = load_checkpoint(result.model_dir).model.state_dict()
    # It started from the step's trained weights (its head included), not from the base model.
    assert torch.allclose(continued["head.weight"], started["head.weight"], atol=1e-6)
    metadata = json.loads((result.model_dir / "colbertkit.json").read_text())
    assert metadata["source"]["base_model"] == str(step)


def test_train_cli_plans_from_a_step_checkpoint_and_names_it(run_with_best, tmp_path):
    (step,) = sorted((run_with_best / "checkpoints").iterdir())
    rows = write_training_rows(tmp_path / "train.jsonl", 4)
    result = runner.invoke(
        app,
        [
            "train", "--profile", "demo", "--model", str(step), "--dataset", str(rows),
            "--output-dir", str(tmp_path / "run"), "--set", "colbert_dim=null", "--dry-run",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"starting from training checkpoint step 2 of run {run_with_best}" in result.stdout
