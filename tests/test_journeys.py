"""The paths users walk through the CLI, end to end, through the installed ``colbertkit`` command
in subprocesses (and a pseudo-terminal where a terminal matters).

What the README shows is run by tests/test_readme.py; here are the journeys around it: being
interrupted and resuming, changing settings on resume, a dry run over an existing run, the score
table in narrow and wide terminals, and the one-line errors.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli_train import write_profile

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def environment(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    env.pop("COLUMNS", None)
    return env


def colbertkit(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["colbertkit", *map(str, args)],
        capture_output=True, text=True, env=environment(**env), cwd=cwd, timeout=600,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    model = run / "model"
    return {
        **load_file(model / "model.safetensors"),
        **load_file(model / "colbert_linear.safetensors"),
    }


TRAINING = {"max_steps": 30, "save_steps": 5, "num_max_checkpoints": 2, "logging_steps": 1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, reference_dir) -> Path:
    root = tmp_path_factory.mktemp("straight")
    profile = write_profile(root, reference_dir, **TRAINING)
    result = colbertkit("train", "--profile", profile, "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def start_training(root: Path, reference_dir: Path) -> subprocess.Popen:
    profile = write_profile(root, reference_dir, **TRAINING)
    return subprocess.Popen(
        ["colbertkit", "train", "--profile", str(profile)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment(), start_new_session=True,
    )  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def processes_running(run: Path, within: float) -> list[str]:
    """Command lines of the processes that mention ``run``, once they have had ``within`` s to end."""
    deadline = time.monotonic() + within
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if str(run) in cmdline:
                    found.append(cmdline)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_run(
    how, tmp_path, reference_dir, uninterrupted
):
    process = start_training(tmp_path, reference_dir)
    wait_for(tmp_path / "run" / "checkpoints" / "step-00000005", process)
    if how == "ctrl-c":
        os.kill(process.pid, signal.SIGINT)  # what Ctrl-C sends to the command
        process.wait(timeout=120)
        assert process.returncode == 130, process.stderr.read()[-2000:]
    else:
        os.killpg(process.pid, signal.SIGKILL)  # the command was killed: nothing cleans up
        process.wait(timeout=120)
        # ... and the launch it started (its own process group) does not train on in the
        # background, writing checkpoints into the run the resume below reads.
        assert processes_running(tmp_path / "run", within=30) == []
    assert not (tmp_path / "run" / "model").exists()

    # Resuming with a setting that would change the result is refused by name, before launching.
    refused = colbertkit("train", "--resume", tmp_path / "run", "--set", "lr=0.5")
    assert refused.returncode == 2
    assert "lr: 0.001 -> 0.5" in one_error_line(refused)

    resumed = colbertkit("train", "--resume", tmp_path / "run", "--set", "logging_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    expected, got = final_weights(uninterrupted), final_weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # The metrics read as one run: each step once.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_dry_run_over_an_existing_run_says_what_the_launch_would_do(tmp_path, reference_dir):
    profile = write_profile(tmp_path, reference_dir, max_steps=1, save_steps=1)
    assert colbertkit("train", "--profile", profile, "-q").returncode == 0
    dry = colbertkit("train", "--profile", profile, "--dry-run")
    assert dry.returncode == 0
    assert "already holds a training run; continue it with --resume" in dry.stdout
    replace = colbertkit("train", "--profile", profile, "--dry-run", "--overwrite")
    assert "holds a previous run, which --overwrite replaces" in replace.stdout
    resume = colbertkit("train", "--resume", tmp_path / "run", "--dry-run", "--format", "json")
    assert json.loads(resume.stdout)["run_directory"] == "resume"


def run_in_terminal(args: list[str], columns: int) -> str:
    """What the user sees: the command's output in a pseudo-terminal ``columns`` wide."""
    main, secondary = pty.openpty()
    # The terminal's own size, as a real terminal of that width reports it.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        ["colbertkit", *args],
        stdout=secondary, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        env=environment(COLUMNS=str(columns), TERM="xterm"),
    )  # fmt: skip
    os.close(secondary)
    chunks = []
    while True:
        ready, _, _ = select.select([main], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=300)
    os.close(main)
    assert process.returncode == 0
    # What is shown, without the terminal's colour and style codes.
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())


@pytest.mark.parametrize("columns", [80, 200])
def test_the_score_table_shows_every_id_rank_and_score(columns, tmp_path, colbertkit_dir):
    pairs = tmp_path / "run.tsv"
    pairs.write_text(
        "query-0001\twhat is the capital of france\tpassage-0001\t"
        + "paris is the capital of france and its largest city " * 4
        + "\nquery-0001\twhat is the capital of france\tpassage-0002\tthe cat eats fish\n"
        "query-0002\thow do fish swim\tpassage-0003\tfish swim in the sea with their fins\n"
    )
    piped = colbertkit("score", colbertkit_dir, pairs, "--rank", "-q")
    rows = [line.split("\t") for line in piped.stdout.splitlines()]
    screen = run_in_terminal(["score", str(colbertkit_dir), str(pairs), "--rank", "-q"], columns)
    lines = screen.splitlines()
    assert max(len(line) for line in lines) <= columns
    for qid, _, pid, _, rank, score in rows:
        (line,) = [line for line in lines if f" {pid} " in line]
        assert qid in line and f" {rank} " in line
        assert f"{float(score):.4f}" in line  # never cut to "0.75…"
    if columns == 200:
        assert "what is the capital of france" in screen  # room for the whole query
    else:
        assert "…" in screen  # the long passage ends in an ellipsis


def test_a_terminal_too_narrow_for_a_table_gets_tsv(tmp_path, colbertkit_dir):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("what is the capital of france\tparis is the capital of france\n")
    screen = run_in_terminal(["score", str(colbertkit_dir), str(pairs), "-q"], 40)
    assert "\t" in screen and "┃" not in screen


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "--bogus", "a", "b"], "Error: No such option: --bogus; see 'colbertkit score"),
        (["validate-data", "/tmp"], "is a directory; see 'colbertkit validate-data --help'"),
        (["score", "a", "b", "--format", "xml"], "'xml' is not one of"),
        (["train", "--num-processes", "0", "--profile", "demo"], "--num-processes"),
        (["export", "a"], "Missing argument 'OUT'"),
    ],
)
def test_usage_errors_are_one_line_with_the_fix_and_exit_2(args, message):
    result = colbertkit(*args)
    assert result.returncode == 2
    line = one_error_line(result)
    assert message in line and "Value error" not in line


def test_core_errors_are_one_line_naming_the_flag(tmp_path, encoder_dir):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a\tb\n")
    result = colbertkit("score", encoder_dir, pairs)
    assert result.returncode == 1
    assert "attach a new head with --fresh-head" in one_error_line(result)
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02\n")
    data = colbertkit("validate-data", binary)
    assert data.returncode == 1 and "binary file" in data.stdout  # the report names it


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a\tb\n")
    plain = colbertkit("score", tmp_path / "missing", pairs)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    debugged = colbertkit("score", tmp_path / "missing", pairs, "--debug")
    assert "Traceback" in debugged.stderr


def test_best_and_model_follow_the_umask(tmp_path, reference_dir):
    rows = tmp_path / "train.jsonl"
    profile = write_profile(tmp_path, reference_dir, max_steps=2)
    settings = json.loads(profile.read_text())
    settings["eval_dataset"] = str(rows)
    profile.write_text(json.dumps(settings))
    previous = os.umask(0o022)
    try:
        result = colbertkit("train", "--profile", profile, "-q")
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr[-2000:]
    for folder in ("model", "best"):
        for path in (tmp_path / "run" / folder).iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
