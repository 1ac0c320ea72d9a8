"""benchmarks/gpu_check.py: its CPU-reachable checks pass here, the GPU ones say why they skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_parts_and_explains_its_skips(tmp_path):
    import torch

    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--models", "xlmr", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    table = done.stdout[done.stdout.rindex("figures / reason") :]
    rows = {}
    for line in table.splitlines()[1:]:
        for status in (" PASS ", " FAIL ", " SKIP "):
            if status in line:
                check, rest = line.split(status, 1)
                rows[check.strip()] = (status.strip(), rest.strip())
    # What a CPU can run, runs (a tiny XLM-R with its own SentencePiece tokenizer, DDP, bf16).
    for check in (
        "validate-data example_data/train.jsonl",
        "validate-data broken copy",
        "train xlmr ddp bf16",
        "resume xlmr ddp bf16",
        "score the model of xlmr ddp bf16",
        "score on CPU, fp32",
    ):
        assert rows[check][0] == "PASS", (check, rows[check])
    assert "loss" in rows["train xlmr ddp bf16"][1]
    gpu_rows = [
        "train xlmr fsdp bf16",
        "train xlmr fsdp fp16",
        "train xlmr ddp fp16",
        "export FSDP sharded checkpoint of xlmr",
        "score on CUDA, bf16, vs CPU fp32",
        "score speed on CUDA vs the GPU encoder limit",
    ]
    if torch.cuda.is_available():
        assert all(rows[check][0] == "PASS" for check in gpu_rows), rows
        return
    # What needs a GPU is skipped, each with its reason, never silently.
    assert all(rows[check][0] == "SKIP" for check in gpu_rows), rows
    assert "colbertkit refuses FSDP on CPU" in rows["train xlmr fsdp bf16"][1]
    assert "fp16 mixed precision is GPU-only" in rows["train xlmr ddp fp16"][1]
    assert "needs CUDA" in rows["score on CUDA, bf16, vs CPU fp32"][1]
    assert "0 failed" in done.stdout
