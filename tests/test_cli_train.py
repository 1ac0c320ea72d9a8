"""``colbertkit train`` as users run it: real ``accelerate launch`` subprocesses on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from colbertkit.cli.app import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def write_dataset(path: Path, rows: int = 12) -> Path:
    topics = ["cat", "dog", "fish", "bird", "paris", "london", "python", "music"]
    with open(path, "w") as out:
        for i in range(rows):
            topic = topics[i % len(topics)]
            others = [t for t in topics if t != topic]
            out.write(
                json.dumps(
                    {
                        "query": f"what about the {topic}",
                        "pos": [f"the {topic} is here and the {topic} is good"],
                        "neg": [f"the {other} is there" for other in others[:3]],
                    }
                )
                + "\n"
            )
    return path


def write_profile(tmp_path: Path, model: Path, **settings) -> Path:
    profile = {
        "model": str(model),
        "dataset": str(write_dataset(tmp_path / "train.jsonl")),
        "output_dir": str(tmp_path / "run"),
        "query_max_len": 16,
        "passage_max_len": 24,
        "neg_nums": 2,
        "batch_size": 2,
        "max_steps": 2,
        "lr": 1e-3,
        "progress_bar": False,
        "logging_steps": 1,
        "save_each_epoch": False,
        "distributed": {"strategy": "none", "device": "cpu"},
    }
    for key, value in settings.items():
        if key == "distributed":
            profile["distributed"].update(value)
        else:
            profile[key] = value
    path = tmp_path / "profile.yaml"
    path.write_text(json.dumps(profile))  # JSON is YAML
    return path


def colbertkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "colbertkit", *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def test_dry_run_prints_profile_config_command_and_plan_and_writes_nothing(tmp_path, reference_dir):
    profile = write_profile(
        tmp_path, reference_dir, distributed={"strategy": "ddp", "num_processes": 2}
    )
    result = runner.invoke(
        app, ["train", "--profile", str(profile), "--dry-run", "--set", "lr=2e-6"]
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "lr: 2e-06  # flag" in out and "neg_nums: 2  # profile" in out
    assert "temperature: 0.02  # default" in out
    assert "distributed_type: MULTI_GPU" in out and "use_cpu: true" in out
    assert "-m colbertkit.worker" in out
    assert "world size 2: 2 process(es) x 1 machine(s) on CPU, strategy ddp" in out
    assert (
        "each query sees 4 negatives per step (2 hard negatives x 2 queries); gradient accumulation adds none"
        in out
    )
    assert "12 examples (one per positive)" in out
    assert "no sharding: each of the 2 processes holds the whole model (DDP)" in out
    assert "memory per device (rough)" in out
    assert not (tmp_path / "run").exists()


def test_invalid_data_stops_the_launch_and_points_at_validate_data(tmp_path, reference_dir):
    profile = write_profile(tmp_path, reference_dir)
    (tmp_path / "train.jsonl").write_text('{"query": "q", "pos": "not a list", "neg": ["n"]}\n')
    result = runner.invoke(app, ["train", "--profile", str(profile)])
    assert result.exit_code == 1
    assert "colbertkit validate-data" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_profile_and_unknown_flags(tmp_path):
    result = runner.invoke(app, ["train", "--profile", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "not a bundled profile" in result.stderr
    result = runner.invoke(app, ["train", "--dataset", "x.jsonl"])
    assert result.exit_code == 2
    assert "no profile: pass --profile" in result.stderr


@pytest.mark.slow
def test_two_cpu_processes_train_together_and_the_model_scores(tmp_path, reference_dir):
    profile = write_profile(
        tmp_path, reference_dir, distributed={"strategy": "ddp", "num_processes": 2}
    )
    result = colbertkit("train", "--profile", str(profile))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    run = tmp_path / "run"
    assert (run / "accelerate_config.yaml").is_file() and (run / "profile.yaml").is_file()
    launched = json.loads((run / "launch_profile.json").read_text())
    # The launcher validated the data once; the workers do not read it again to check it.
    assert launched["validate_data"] is False and launched["expected_num_processes"] == 2
    # Written once by the main process: one metrics line per step, one model, no leftovers.
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2]
    # No temporaries left; the only hidden entry is the marker that says colbertkit owns it.
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".colbertkit-run"]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("what about the cat\tthe cat is here\n")
    scored = colbertkit("score", str(run / "model"), str(pairs), "--format", "jsonl", "-q")
    assert scored.returncode == 0, scored.stderr
    assert "found colbertkit layout" not in scored.stderr  # -q
    assert -1 <= json.loads(scored.stdout)["score"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_failing_worker_fails_train_with_its_message(tmp_path, processes):
    strategy = "ddp" if processes > 1 else "none"
    profile = write_profile(
        tmp_path,
        tmp_path / "no-such-model",
        distributed={"strategy": strategy, "num_processes": processes},
    )
    result = colbertkit("train", "--profile", str(profile))
    assert result.returncode == 1
    assert "Error: " in result.stderr and "no-such-model" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_every_worker(tmp_path, reference_dir):
    profile = write_profile(
        tmp_path,
        reference_dir,
        max_steps=100_000,
        distributed={"strategy": "ddp", "num_processes": 2},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "colbertkit", "train", "--profile", str(profile)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        descendants: list[psutil.Process] = []
        workers = 0
        while time.monotonic() < deadline and workers < 2:
            time.sleep(0.5)
            descendants = psutil.Process(process.pid).children(recursive=True)
            workers = sum("colbertkit.worker" in " ".join(c.cmdline()) for c in descendants)
        assert workers >= 2, "the two workers never started"
        # Let them reach the training loop, then press Ctrl-C (SIGINT to the command only).
        time.sleep(3)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
        assert code != 0
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_an_existing_run_is_not_touched_without_overwrite(tmp_path, reference_dir):
    profile = write_profile(tmp_path, reference_dir)
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "profile.yaml").write_text("the old run's profile\n")
    result = runner.invoke(app, ["train", "--profile", str(profile)])
    assert result.exit_code == 2
    assert "already holds a training run; continue it with --resume" in result.stderr
    assert (run / "profile.yaml").read_text() == "the old run's profile\n"
    assert sorted(p.name for p in run.iterdir()) == ["model", "profile.yaml"]


def test_settings_that_contradict_the_checkpoint_metadata_are_reported(tmp_path, colbertkit_dir):
    # colbertkit_dir was saved with query_max_len 32 and passage_max_len 64.
    profile = write_profile(tmp_path, colbertkit_dir, query_max_len=16, passage_max_len=64)
    result = runner.invoke(app, ["train", "--profile", str(profile), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "- note: query_max_len is 16 here but 32 in" in result.stdout
    assert "passage_max_len is" not in result.stdout  # agrees: nothing to say
