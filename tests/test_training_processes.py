"""Training across real processes: a 2-process CPU run through ``accelerate launch`` and a run
stopped by SIGKILL then resumed. Both start Python subprocesses, hence ``slow``."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.test_training import (
    assert_same_weights,
    base_config,
    final_weights,
    read_metrics,
    toy_rows,
    write_rows,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    from colbertkit.training import train

    config = json.loads(open(sys.argv[1]).read())
    result = train(config)
    print("RESULT", result.global_step, flush=True)
    """
)


@pytest.fixture(scope="module")
def no_dropout_dir(tmp_path_factory, tiny_parts) -> Path:
    """The tiny model without dropout: a 1-process and a 2-process run see the same function."""
    from colbertkit.checkpoint import save_checkpoint
    from colbertkit.model import ColBERT

    encoder, tokenizer, head = tiny_parts
    encoder = copy.deepcopy(encoder)
    encoder.config.hidden_dropout_prob = 0.0
    encoder.config.attention_probs_dropout_prob = 0.0
    path = tmp_path_factory.mktemp("nodrop") / "model"
    save_checkpoint(ColBERT(encoder, copy.deepcopy(head)), tokenizer, path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(threads: int | None = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    # Same thread count as this process unless asked: float sums depend on it.
    env["OMP_NUM_THREADS"] = str(threads or torch.get_num_threads())
    return env


def _launch_two_processes(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (torchrun underneath, gloo DDP inside)."""
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "config.json").write_text(json.dumps(config))
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(
        textwrap.dedent(
            f"""
            compute_environment: LOCAL_MACHINE
            distributed_type: MULTI_GPU
            use_cpu: true
            num_processes: 2
            num_machines: 1
            machine_rank: 0
            main_process_ip: 127.0.0.1
            main_process_port: {_free_port()}
            mixed_precision: 'no'
            dynamo_config: {{}}
            """
        )
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
        str(tmp_path / "worker.py"), str(tmp_path / "config.json"),
    ]  # fmt: skip
    return subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300)


def distillation_rows(count: int, seed: int) -> list[dict]:
    """Toy rows with teacher scores; some queries have a second positive (two examples of one
    query in a global batch: the in-batch mask must hold across processes too)."""
    rows = toy_rows(count, seed=seed)
    for index, row in enumerate(rows):
        if index % 3 == 0:
            row["pos"].append(rows[(index + 1) % count]["neg"][0])
        row["pos_scores"] = [1.0 - 0.1 * i for i in range(len(row["pos"]))]
        row["neg_scores"] = [0.05 * i for i in range(len(row["neg"]))]
    return rows


@pytest.mark.parametrize("variant", ["plain", "grad_cache", "distillation"])
def test_two_processes_with_gathering_equal_one_process_on_the_global_batch(
    tmp_path, no_dropout_dir, variant
):
    """2 processes x 2 queries with gathered passages == 1 process x 4 queries: same loss at
    every step and the same final weights (so gradients really are shared, and exact)."""
    rows = distillation_rows(12, seed=3) if variant == "distillation" else toy_rows(16, seed=3)
    dataset = write_rows(tmp_path / "train.jsonl", rows)
    common = dict(max_steps=3, lr=5e-3, neg_nums=3, warmup_proportion=0.0, save_each_epoch=False)
    if variant == "grad_cache":
        common.update(grad_cache=True, encode_chunk_size=3)
    if variant == "distillation":
        common.update(
            loss="contrastive+kl", teacher_temperature=0.1, other_positives_as_negatives=True,
            grad_cache=True, encode_chunk_size=3,
        )  # fmt: skip
    single = base_config(tmp_path / "single", no_dropout_dir, dataset, batch_size=4, **common)
    double = base_config(
        tmp_path / "double", no_dropout_dir, dataset, batch_size=2, gather_across_processes=True,
        expected_num_processes=2, **common,
    )  # fmt: skip
    from colbertkit.training import train

    train(single)
    launched = _launch_two_processes(tmp_path, double)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 process(es)" in launched.stderr
    single_losses = [m["train/loss"] for m in read_metrics(Path(single["output_dir"]))]
    double_losses = [m["train/loss"] for m in read_metrics(Path(double["output_dir"]))]
    assert double_losses == pytest.approx(single_losses, rel=1e-5)
    a = final_weights(Path(single["output_dir"]) / "model")
    b = final_weights(Path(double["output_dir"]) / "model")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_without_gathering_see_only_local_negatives(tmp_path, no_dropout_dir):
    dataset = write_rows(tmp_path / "train.jsonl", toy_rows(16, seed=3))
    common = dict(max_steps=1, neg_nums=3, save_each_epoch=False)
    single = base_config(tmp_path / "single", no_dropout_dir, dataset, batch_size=4, **common)
    double = base_config(
        tmp_path / "double",
        no_dropout_dir,
        dataset,
        batch_size=2,
        expected_num_processes=2,
        **common,
    )
    from colbertkit.training import train

    train(single)
    launched = _launch_two_processes(tmp_path, double)
    assert launched.returncode == 0, launched.stderr[-3000:]
    single_loss = read_metrics(Path(single["output_dir"]))[0]["train/loss"]
    double_loss = read_metrics(Path(double["output_dir"]))[0]["train/loss"]
    assert double_loss < single_loss  # fewer negatives per query: an easier loss


def test_sigkill_between_checkpoints_then_resume_gives_the_same_weights(tmp_path, colbertkit_dir):
    dataset = write_rows(tmp_path / "train.jsonl", toy_rows(24, seed=0))
    config = base_config(tmp_path / "killed", colbertkit_dir, dataset, epochs=2, save_steps=4)
    # The child trains and blocks right after step 5 is logged (checkpoint 4 written, 6 not yet).
    blocking_worker = textwrap.dedent(
        """
        import json, sys, time
        from colbertkit import trackers
        from colbertkit.training import train

        original_log = trackers.JsonlTracker.log

        def log(self, metrics, step):
            original_log(self, metrics, step)
            if step == 5:
                print("AT STEP 5", flush=True)
                time.sleep(600)

        trackers.JsonlTracker.log = log
        train(json.loads(open(sys.argv[1]).read()))
        """
    )
    (tmp_path / "worker.py").write_text(blocking_worker)
    (tmp_path / "config.json").write_text(json.dumps(config))
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "config.json")],
        env=_environment(threads=None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = child.stdout.readline()
        assert line.strip() == "AT STEP 5", child.stderr.read()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    out = Path(config["output_dir"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert not (out / "model").exists()

    from colbertkit.training import train

    resumed = train({**config, "resume_from": "latest"})
    uninterrupted = train(
        base_config(tmp_path / "whole", colbertkit_dir, dataset, epochs=2, save_steps=4)
    )
    assert resumed.global_step == uninterrupted.global_step == 12
    assert_same_weights(final_weights(resumed.model_dir), final_weights(uninterrupted.model_dir))
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 13))
