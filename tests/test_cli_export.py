"""``colbertkit export`` as a user runs it: exit codes, one-line errors, what it prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from colbertkit.checkpoint import detect_layout
from colbertkit.cli.app import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def export(*args):
    return runner.invoke(app, ["export", *map(str, args)])


def error_line(result) -> str:
    """The error as the user sees it: one line, the last on stderr, and no traceback."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def test_export_prints_what_it_found_wrote_and_verified(reference_dir, tmp_path):
    out = tmp_path / "out"
    result = export(reference_dir, out)
    assert result.exit_code == 0, result.output
    assert "found reference layout (model.safetensors + colbert_linear.pt)" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} (colbertkit layout, fp32): 41 tensors,")
    assert lines[1].startswith("verified on 8 pairs: largest score difference 0.00e+00")
    assert detect_layout(out).kind == "colbertkit"


def test_reference_format_and_dtype(colbertkit_dir, tmp_path):
    result = export(colbertkit_dir, tmp_path / "out", "--layout", "reference", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "(reference layout, fp16)" in result.stdout
    assert "fp16 weights upcast to fp32" in result.stdout  # what the check really ran
    head = torch.load(tmp_path / "out" / "colbert_linear.pt", weights_only=True)
    assert head["weight"].dtype == torch.float16


def test_existing_output_exits_2_unless_force(reference_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = export(reference_dir, out)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {out} already exists; choose another directory or pass --force"
    )
    assert list(out.iterdir()) == []
    result = export(reference_dir, out, "--force", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""
    assert (out / "model.safetensors").is_file()


def test_verification_failure_exits_1_and_places_nothing(reference_dir, tmp_path):
    out = tmp_path / "out"
    result = export(reference_dir, out, "--dtype", "bf16", "--tolerance", "0")
    assert result.exit_code == 1
    line = error_line(result)
    assert "verification failed" in line and "over the bf16 tolerance 0" in line
    assert "--no-verify" in line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_no_verify_and_verify_file(reference_dir, tmp_path):
    result = export(reference_dir, tmp_path / "a", "--no-verify")
    assert result.exit_code == 0 and "not verified (--no-verify)" in result.stdout
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("cat\tthe cat eats fish\n")
    result = export(reference_dir, tmp_path / "b", "--verify", pairs)
    assert result.exit_code == 0 and "verified on 1 pairs" in result.stdout
    result = export(reference_dir, tmp_path / "c", "--verify", pairs, "--no-verify")
    assert result.exit_code == 2
    assert "--verify and --no-verify contradict" in error_line(result)
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one column\n")
    result = export(reference_dir, tmp_path / "d", "--verify", bad)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {bad}:1: expected 2 or 4 tab-separated")
    assert not (tmp_path / "d").exists()


def test_missing_head_exits_1_with_one_line(encoder_dir, tmp_path):
    result = export(encoder_dir, tmp_path / "out")
    assert result.exit_code == 1
    assert "has no ColBERT head" in error_line(result)


def test_truncated_safetensors_exits_1_with_one_line(reference_dir, tmp_path):
    source = tmp_path / "cut"
    shutil.copytree(reference_dir, source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = export(source, tmp_path / "out")
    assert result.exit_code == 1
    line = error_line(result)
    assert f"{weights}: not a valid safetensors file: truncated" in line
    assert not (tmp_path / "out").exists()


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_exits_1_and_never_runs(reference_dir, tmp_path):
    source = tmp_path / "evil"
    shutil.copytree(reference_dir, source)
    marker = tmp_path / "pwned"
    torch.save({"weight": _Exploit(marker)}, source / "colbert_linear.pt")
    result = export(source, tmp_path / "out")
    assert result.exit_code == 1
    assert "refused to unpickle" in error_line(result)
    assert not marker.exists()


def test_not_a_checkpoint_and_bad_choices(tmp_path):
    result = export(tmp_path / "nothing" / "here", tmp_path / "out")
    assert result.exit_code == 1
    assert "no such directory" in error_line(result)
    result = export(tmp_path, tmp_path / "out", "--dtype", "fp8")
    assert result.exit_code == 2  # typer rejects the choice before anything runs
    assert "fp8" in result.stderr


def test_training_checkpoint_through_the_cli(training_checkpoint, tmp_path):
    result = export(training_checkpoint, tmp_path / "out", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "found training checkpoint (step 2, model.safetensors)" in result.stderr
    assert "not exported: optimizer.bin (training state)" in result.stderr
    assert "(colbertkit layout, bf16)" in result.stdout


def test_help_is_instant_and_imports_no_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from colbertkit.cli.app import app\n"
        "result = CliRunner().invoke(app, ['export', '--help'])\n"
        "assert result.exit_code == 0 and '--no-verify' in result.stdout, result.output\n"
        "assert 'torch' not in sys.modules, 'export --help imported torch'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
