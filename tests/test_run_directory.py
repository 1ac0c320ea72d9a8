"""Nothing a user owns is ever lost: --overwrite and --force replace only colbertkit's files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from colbertkit.checkpoint import files, run
from colbertkit.checkpoint.run import prepare_run_directory
from colbertkit.cli.app import app
from colbertkit.errors import UsageError
from tests.test_cli_train import colbertkit, write_profile

runner = CliRunner()


def users_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work")
    (path / "sub" / "data.csv").write_text("1,2,3")
    return path


def assert_untouched(path: Path) -> None:
    assert (path / "thesis.txt").read_text() == "three years of work"
    assert (path / "sub" / "data.csv").read_text() == "1,2,3"
    assert sorted(p.name for p in path.iterdir()) == ["sub", "thesis.txt"]


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_train_refuses_a_folder_of_the_users(tmp_path, reference_dir, flags):
    folder = users_folder(tmp_path / "mine")
    profile = write_profile(tmp_path, reference_dir, output_dir=str(folder))
    result = runner.invoke(app, ["train", "--profile", str(profile), *flags])
    assert result.exit_code == 2, result.output
    assert "holds files colbertkit did not write (sub/, thesis.txt)" in result.stderr
    assert "choose a new or empty --output-dir" in result.stderr
    assert_untouched(folder)
    assert not list(tmp_path.glob(".mine*"))  # nothing made beside it either


def test_save_checkpoint_overwrite_refuses_a_folder_of_the_users(tmp_path, tiny_parts):
    from colbertkit.checkpoint import save_checkpoint
    from colbertkit.model import ColBERT

    encoder, tokenizer, head = tiny_parts
    folder = users_folder(tmp_path / "mine")
    with pytest.raises(UsageError, match="did not write"):
        save_checkpoint(ColBERT(encoder, head), tokenizer, folder, overwrite=True)
    assert_untouched(folder)


@pytest.mark.slow
def test_overwrite_replaces_a_previous_run(tmp_path, reference_dir):
    profile = write_profile(tmp_path, reference_dir, save_steps=1, max_steps=2)
    first = colbertkit("train", "--profile", str(profile), "-q")
    assert first.returncode == 0, first.stderr[-2000:]
    old = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in old.iterdir()) == ["step-00000001", "step-00000002"]
    again = colbertkit("train", "--profile", str(profile), "-q")
    assert again.returncode == 2 and "already holds a training run" in again.stderr
    profile = write_profile(tmp_path, reference_dir, max_steps=1)
    replaced = colbertkit("train", "--profile", str(profile), "--overwrite", "-q")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert not old.exists()  # the old run's checkpoints are gone with it
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".run.*"))


def old_run(path: Path) -> Path:
    prepare_run_directory(path)
    (path / "checkpoints" / "step-00000001").mkdir(parents=True)
    (path / "checkpoints" / "step-00000001" / "trainer_state.json").write_text('{"progress": {}}')
    (path / "train_config.json").write_text("{}")
    return path


def test_a_crash_before_the_swap_leaves_the_old_run(tmp_path, monkeypatch):
    target = old_run(tmp_path / "run")

    def crash(first, second):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "replace_directory", lambda *args: crash(*args))
    with pytest.raises(KeyboardInterrupt):
        prepare_run_directory(target, overwrite=True)
    assert (target / "checkpoints" / "step-00000001" / "trainer_state.json").is_file()


def test_a_crash_after_the_swap_leaves_the_new_run(tmp_path, monkeypatch):
    target = old_run(tmp_path / "run")
    real_rmtree = files.shutil.rmtree

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt  # killed while deleting the old run

    monkeypatch.setattr(files.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_run_directory(target, overwrite=True)
    monkeypatch.setattr(files.shutil, "rmtree", real_rmtree)
    # The target is the new, empty run; the old one waits aside and is cleaned up next time.
    assert sorted(p.name for p in target.iterdir()) == [".colbertkit-run"]
    leftovers = list(tmp_path.glob(".run.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "checkpoints").is_dir()
    prepare_run_directory(tmp_path / "run", overwrite=True)
    assert not list(tmp_path.glob(".run.*"))


def test_written_files_follow_the_umask(tmp_path, tiny_parts):
    from colbertkit.checkpoint import save_checkpoint
    from colbertkit.model import ColBERT

    encoder, tokenizer, head = tiny_parts
    previous = os.umask(0o022)
    try:
        out = save_checkpoint(ColBERT(encoder, head), tokenizer, tmp_path / "model")
        run_dir = prepare_run_directory(tmp_path / "run")
    finally:
        os.umask(previous)
    for path in [out, *out.iterdir(), run_dir, *run_dir.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
