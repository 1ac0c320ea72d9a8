"""Time and peak memory of ``export_model`` on MiniLM and on a synthetic ~1 GB checkpoint.

    python benchmarks/bench_export.py [--size-gb 1.0] [--skip-synthetic] [--keep] [--work DIR]

Checkpoints (written under a temporary directory, deleted afterwards unless ``--keep``):

* ``minilm``: the packaged all-MiniLM-L6-v2 (90 MB of fp32 safetensors) in the reference
  layout, with a seeded 384 -> 128 head in ``colbert_linear.pt``;
* ``synthetic``: a BERT with hidden size 1024 and as many layers as make ``--size-gb`` of fp32
  safetensors (18 layers for 1 GB), random weights, the MiniLM tokenizer, a 1024 -> 128 head.
  Written with colbertkit's own streaming writer, so building it needs no 1 GB of memory;
* ``synthetic-bin``: the same weights as a ``pytorch_model.bin`` (BGE-M3 ships this format).

Each export runs in a fresh Python process and reports its peak RSS from /proc/self/status
``VmHWM`` (not ``ru_maxrss``, which Linux carries over fork + exec from the parent). Printed per
case: seconds to write and to verify, peak RSS, the peak over the checkpoint size, and the same
after subtracting the RSS of a process that has only imported torch, transformers and
colbertkit (the interpreter's fixed cost). The target is peak / size <= ~1.5 for the 1 GB
checkpoint (verification included: it holds one fp32 model at a time).

Times depend on the machine's load (other processes compete for the cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000


def child(spec: dict) -> None:
    """Run one export (or only the imports) and print one JSON line of measurements."""
    import torch  # noqa: F401  (the baseline includes what every export imports)
    import transformers  # noqa: F401
    from transformers import AutoModel, AutoTokenizer  # noqa: F401

    from colbertkit.export import export_model

    baseline_kib = _status("VmRSS")
    result: dict = {"baseline_kib": baseline_kib}
    if spec.get("export"):
        start = time.perf_counter()
        report = export_model(
            spec["source"],
            spec["out"],
            dtype=spec["dtype"],
            format=spec.get("format", "colbertkit"),
            verify=spec["verify"],
            force=True,
        )
        result.update(
            seconds=time.perf_counter() - start,
            write_seconds=report.write_seconds,
            verify_seconds=report.verify_seconds,
            source_bytes=report.source_bytes,
            written_bytes=report.written_bytes,
            max_difference=report.max_difference,
        )
    result["peak_kib"] = _status("VmHWM")
    print("RESULT " + json.dumps(result), flush=True)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def build_minilm(work: Path) -> Path:
    import torch

    from colbertkit.checkpoint import resolve_checkpoint
    from colbertkit.model import fresh_head

    source = resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2")
    path = work / "minilm"
    shutil.copytree(source, path)
    torch.save(fresh_head(384, 128, seed=0).state_dict(), path / "colbert_linear.pt")
    return path


def build_synthetic(work: Path, size_gb: float) -> tuple[Path, Path]:
    """(safetensors dir, pytorch_model.bin dir) of a random BERT of about ``size_gb`` GB."""
    import torch
    from transformers import AutoModel, BertConfig

    from colbertkit.checkpoint import resolve_checkpoint
    from colbertkit.checkpoint.layouts import TOKENIZER_FILES
    from colbertkit.checkpoint.tensors import TensorEntry, write_safetensors
    from colbertkit.model import fresh_head

    hidden, intermediate, vocab = 1024, 4096, 30522
    per_layer = (
        4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + 5 * hidden
    )
    fixed = (vocab + 512 + 2) * hidden + 2 * hidden + hidden * hidden + hidden
    layers = max(1, round((size_gb * 1e9 / 4 - fixed) / per_layer))
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        intermediate_size=intermediate,
    )
    with torch.device("meta"):
        shapes = {
            name: tuple(t.shape) for name, t in AutoModel.from_config(config).state_dict().items()
        }

    def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash(name) % (2**31))
        if name.endswith("LayerNorm.weight"):
            return torch.ones(shape)
        return torch.randn(shape, generator=generator) * 0.02

    path = work / "synthetic"
    path.mkdir()
    config.save_pretrained(str(path))
    minilm = resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2")
    for name in TOKENIZER_FILES:
        if (minilm / name).is_file():
            shutil.copyfile(minilm / name, path / name)
    entries = [
        TensorEntry(name, shape, torch.float32, lambda n=name, s=shape: random_tensor(n, s))
        for name, shape in shapes.items()
    ]
    write_safetensors(entries, path / "model.safetensors")
    torch.save(fresh_head(hidden, 128, seed=0).state_dict(), path / "colbert_linear.pt")

    # The same weights as pytorch_model.bin, written one tensor at a time into a zip-format
    # torch.save would need them all in memory: build it from the safetensors file instead.
    bin_path = work / "synthetic-bin"
    shutil.copytree(path, bin_path, ignore=shutil.ignore_patterns("model.safetensors"))
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    torch.save(state, bin_path / "pytorch_model.bin")
    del state
    return path, bin_path


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints and exports.")
    parser.add_argument("--work", type=Path, default=None, help="Work directory (default: temp).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(json.loads(args.child))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        sources = {"minilm": build_minilm(work)}
        if not args.skip_synthetic:
            sources["synthetic"], sources["synthetic-bin"] = build_synthetic(work, args.size_gb)
        print(f"built checkpoints in {time.perf_counter() - start:.0f}s under {work}")
        baseline = run_child({})["peak_kib"] * 1024
        print(f"import-only process: peak RSS {baseline / MB:.0f} MB (subtracted in 'above base')")
        cases = [
            ("minilm", "fp32", True),
            ("minilm", "bf16", True),
            ("synthetic", "fp32", False),
            ("synthetic", "fp32", True),
            ("synthetic", "bf16", True),
            ("synthetic", "fp16", True),
            ("synthetic-bin", "fp32", True),
        ]
        header = (
            f"{'checkpoint':<14} {'dtype':<5} {'verify':<6} {'size MB':>8} {'write s':>8} "
            f"{'verify s':>8} {'peak MB':>8} {'peak/size':>9} {'above base':>10} {'max diff':>9}"
        )
        print(header)
        print("-" * len(header))
        for name, dtype, verify in cases:
            if name not in sources:
                continue
            spec = {
                "export": True,
                "source": str(sources[name]),
                "out": str(work / f"out-{name}-{dtype}-{verify}"),
                "dtype": dtype,
                "verify": verify,
            }
            result = run_child(spec)
            size = result["source_bytes"]
            peak = result["peak_kib"] * 1024
            difference = result["max_difference"]
            print(
                f"{name:<14} {dtype:<5} {'yes' if verify else 'no':<6} {size / MB:>8.0f} "
                f"{result['write_seconds']:>8.1f} {result['verify_seconds']:>8.1f} "
                f"{peak / MB:>8.0f} {peak / size:>9.2f} {(peak - baseline) / size:>10.2f} "
                f"{'-' if difference is None else f'{difference:.1e}':>9}",
                flush=True,
            )
            shutil.rmtree(spec["out"], ignore_errors=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
