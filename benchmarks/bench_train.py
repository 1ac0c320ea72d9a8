"""Training step speed and memory: colbertkit vs pad-to-max (the reference) vs the real-token limit.

    python benchmarks/bench_train.py                       # synthetic data with a realistic spread
    python benchmarks/bench_train.py --dataset my.jsonl    # your data (same jsonl format)
    python benchmarks/bench_train.py --precision           # bf16 vs fp32: examples/s, loss curves

CPU, the packaged all-MiniLM-L6-v2 encoder (fresh 128-d head), batch 4 queries x (1 + 15
negatives), query 64 / passage 256 tokens. Each mode runs in its own process (peak RSS is per
process) on the same batches:

* ``colbertkit``: ``colbertkit.train`` itself (tokenize, length-sorted chunks with dynamic
  padding, exact MaxSim loss, backward, clip, AdamW, schedule), examples/s from its
  metrics.jsonl;
* ``baseline``: what the reference does: pad every query to 64 and every passage to 256, one
  forward per side, the same loss and optimizer;
* ``limit``: forward + backward of the encoder alone over exactly the batch's real tokens,
  re-cut into equal rows of the mean length (one forward for the queries, one for the
  passages, not one padding token): the work no padding scheme can avoid, done at full
  batch efficiency. Equal rows make attention slightly cheaper than the real spread of
  lengths, so the limit is optimistic.

Targets (issue 4): colbertkit >= 1.5x baseline, >= 0.8x limit, peak RSS <= baseline's.

``--precision`` (issue 12) runs ``colbertkit.train`` twice on the same batches, with
``mixed_precision: no`` (fp32) and ``bf16`` (autocast), for ``--steps`` steps (default 30, every
step logged; batch 4 x (1 + 7), passage 128 tokens unless given): examples/s of each (steps after
the first two) and the two loss curves side by side. Whether bf16 is native here (AMX,
AVX512-BF16) is printed: without it, bf16 is emulated and slower.

On a shared machine, wall-clock speed is noisy (and multi-threaded BLAS suffers most when other
processes compete for the cores), so the modes run in ``--rounds`` interleaved rounds and the
best round of each counts; ``--threads 1`` (the default) keeps one thread per worker, which makes
the ratios stable; ``--threads 0`` uses torch's default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODES = ("colbertkit", "baseline", "limit")
PRECISION_MODES = ("fp32", "bf16")

_WORD_TEXT = """
the of and to in is was for on that with as by at from his her an which are this be had not were
but one all they their there been has have who more when will would time river city music science
water history model language system data people world year government national research company
market energy family health school country population development university information program
period building species production computer network children education village district church
station
"""
WORDS = _WORD_TEXT.split()


def synthetic_rows(count: int, negatives: int, seed: int) -> list[dict]:
    """Web-search-like lengths: queries ~9 words, passages lognormal around ~90 words
    (10 to 400), so some passages hit the 256-token cut and most do not."""
    rng = random.Random(seed)

    def text(median: float, sigma: float, low: int, high: int) -> str:
        words = int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))
        return " ".join(rng.choice(WORDS) for _ in range(words))

    return [
        {
            "query": text(9, 0.4, 3, 40),
            "pos": [text(90, 0.6, 10, 400)],
            "neg": [text(90, 0.6, 10, 400) for _ in range(negatives)],
        }
        for _ in range(count)
    ]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# Workers (one mode per process)
# --------------------------------------------------------------------------------------------


def run_colbertkit(args: argparse.Namespace, work: Path, mixed_precision: str = "no") -> dict:
    from colbertkit.training import train

    output_dir = work / "colbertkit-run"
    train(
        {
            "model": MODEL,
            "dataset": str(args.dataset_file),
            "output_dir": str(output_dir),
            "batch_size": args.batch_size,
            "neg_nums": args.neg_nums,
            "query_max_len": args.query_len,
            "passage_max_len": args.passage_len,
            "colbert_dim": 128,
            "max_steps": args.warmup + args.steps,
            "encode_chunk_size": args.chunk_size,
            "lr": 2e-5,
            "logging_steps": 1,
            "save_each_epoch": False,
            "progress_bar": False,
            "seed": args.seed,
            "mixed_precision": mixed_precision,
        }
    )
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "train/loss" in m]
    timed = [m for m in metrics if m["step"] > args.warmup]
    seconds = sum(args.batch_size / m["train/examples_per_second"] for m in timed)
    return {
        "examples_per_second": args.batch_size * len(timed) / seconds,
        "losses": [m["train/loss"] for m in metrics],
    }


def _batches(args: argparse.Namespace, tokenizer):
    """The same batches colbertkit.train sees (same seed, same order)."""
    from colbertkit.collate import Collator, epoch_examples
    from colbertkit.data import process_batches, read_training_rows

    rows = [row for _, row in read_training_rows(args.dataset_file)]
    examples = epoch_examples(rows, neg_nums=args.neg_nums, seed=args.seed, epoch=0)
    collator = Collator(tokenizer, args.query_len, args.passage_len)
    for indices in process_batches(len(examples), args.batch_size, 1, 0)[
        : args.warmup + args.steps
    ]:
        chosen = [examples[i] for i in indices]
        yield chosen, collator(chosen)


def _load(args: argparse.Namespace):
    import torch

    from colbertkit.checkpoint import load_checkpoint

    torch.manual_seed(args.seed)
    loaded = load_checkpoint(MODEL, fresh_head=True, colbert_dim=128, seed=args.seed)
    model = loaded.model.train()
    model.encoder.pooler.requires_grad_(False)
    return model, loaded.tokenizer


def run_baseline(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from colbertkit.losses import contrastive_loss, grouped_positive_columns

    model, tokenizer = _load(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    times = []
    for step, (examples, _) in enumerate(_batches(args, tokenizer)):
        start = time.perf_counter()
        queries = tokenizer(
            [ex.query for ex in examples], max_length=args.query_len, truncation=True,
            padding="max_length", return_tensors="pt",
        )  # fmt: skip
        passages = tokenizer(
            [t for ex in examples for t in (ex.positive, *ex.negatives)],
            max_length=args.passage_len, truncation=True, padding="max_length", return_tensors="pt",
        )  # fmt: skip
        q, q_mask = model(queries["input_ids"], queries["attention_mask"])
        p, p_mask = model(passages["input_ids"], passages["attention_mask"])
        columns, is_positive = grouped_positive_columns(len(examples), 1 + args.neg_nums)
        loss = contrastive_loss(q, q_mask, p, p_mask, columns, is_positive, temperature=0.02)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"examples_per_second": args.batch_size * len(times) / sum(times)}


def _dense_rows(sequences: list[list[int]]) -> torch.Tensor:  # noqa: F821
    """The sequences' real tokens re-cut into equal rows of their mean length: the same
    tokens, not one of them padding. Returns (len(sequences), mean length) ids."""
    import torch

    tokens = [token for ids in sequences for token in ids]
    width = len(tokens) // len(sequences)
    return torch.tensor(tokens[: width * len(sequences)]).view(len(sequences), width)


def run_limit(args: argparse.Namespace, work: Path) -> dict:
    import torch

    model, tokenizer = _load(args)
    encoder = model.encoder
    times, real_tokens = [], 0
    for step, (_, batch) in enumerate(_batches(args, tokenizer)):
        start = time.perf_counter()
        for sequences in (batch.queries, batch.passages):
            input_ids = _dense_rows(sequences)
            hidden = encoder(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids)
            ).last_hidden_state
            hidden.sum().backward()
        encoder.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            real_tokens += batch.real_tokens()
    return {
        "examples_per_second": args.batch_size * len(times) / sum(times),
        "real_tokens_per_batch": real_tokens / len(times),
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _run_worker(mode: str, args: argparse.Namespace, dataset_file: Path, work: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", mode, "--dataset-file", str(dataset_file),
        "--work", str(work / mode), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch-size", str(args.batch_size), "--neg-nums", str(args.neg_nums),
        "--query-len", str(args.query_len), "--passage-len", str(args.passage_len),
        "--chunk-size", str(args.chunk_size), "--seed", str(args.seed),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    shutil.rmtree(work / mode, ignore_errors=True)
    (work / mode).mkdir(parents=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", type=Path, help="jsonl to draw batches from (default: synthetic)"
    )
    parser.add_argument("--steps", type=int, help="timed steps per mode (6; --precision: 28)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--neg-nums", type=int, help="default 15 (--precision: 7)")
    parser.add_argument("--query-len", type=int, default=64)
    parser.add_argument("--passage-len", type=int, help="default 256 (--precision: 128)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="colbertkit's encode_chunk_size (its default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds; best counts (3; --precision: 1)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--precision", action="store_true", help="bf16 vs fp32 (examples/s and loss curves)"
    )
    parser.add_argument("--worker", choices=MODES + PRECISION_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dataset-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    precision = args.precision or args.worker in PRECISION_MODES
    for name, default, precision_default in (
        ("steps", 6, 28),  # + 2 warm-up steps: a 30-step loss curve
        ("neg_nums", 15, 7),
        ("passage_len", 256, 128),
        ("rounds", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, precision_default if precision else default)
    if args.precision:
        args.modes = ",".join(PRECISION_MODES)
    if args.chunk_size is None:
        from colbertkit.train_config import TrainConfig

        args.chunk_size = TrainConfig.model_fields["encode_chunk_size"].default

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        runner = {
            "colbertkit": run_colbertkit,
            "baseline": run_baseline,
            "limit": run_limit,
            "fp32": lambda args, work: run_colbertkit(args, work, "no"),
            "bf16": lambda args, work: run_colbertkit(args, work, "bf16"),
        }[args.worker]
        result = runner(args, args.work)
        result["peak_rss_mib"] = peak_rss_mib()
        print("RESULT " + json.dumps(result), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        dataset_file = work / "train.jsonl"
        if args.dataset:
            rows = [
                json.loads(line) for line in args.dataset.read_text().splitlines() if line.strip()
            ]
            source = str(args.dataset)
        else:
            rows = synthetic_rows(
                args.batch_size * (args.warmup + args.steps), args.neg_nums, args.seed
            )
            source = "synthetic (lognormal lengths)"
        needed = args.batch_size * (args.warmup + args.steps)
        rows = [{**row, "pos": row["pos"][:1]} for row in rows][:needed]
        if len(rows) < needed:
            sys.exit(
                f"need {needed} rows for {args.warmup}+{args.steps} steps, "
                f"the dataset has {len(rows)}"
            )
        dataset_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

        results: dict[str, dict] = {}
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                result = _run_worker(mode, args, dataset_file, work)
                best = results.get(mode)
                if best is None or result["examples_per_second"] > best["examples_per_second"]:
                    results[mode] = result

    if args.precision:
        print_precision(results, args, source)
        return
    print(
        f"data: {source}; batch {args.batch_size} x (1 + {args.neg_nums}); "
        f"query {args.query_len} / passage {args.passage_len} tokens; "
        f"{args.steps} timed steps after {args.warmup}, best of {args.rounds} rounds; "
        f"encode_chunk_size {args.chunk_size}; torch threads {args.threads or 'default'}"
    )
    if "limit" in results:
        real = results["limit"]["real_tokens_per_batch"]
        padded = args.batch_size * (args.query_len + (1 + args.neg_nums) * args.passage_len)
        print(f"real tokens per batch: {real:.0f} of {padded} padded to max ({real / padded:.0%})")
    print(f"{'mode':<12}{'examples/s':>12}{'peak RSS MiB':>15}")
    for mode, result in results.items():
        print(f"{mode:<12}{result['examples_per_second']:>12.2f}{result['peak_rss_mib']:>15.0f}")
    if {"colbertkit", "baseline"} <= results.keys():
        ours, base = results["colbertkit"], results["baseline"]
        speed = ours["examples_per_second"] / base["examples_per_second"]
        print(
            f"colbertkit / baseline: {speed:.2f}x speed (target >= 1.5), "
            f"{ours['peak_rss_mib'] / base['peak_rss_mib']:.2f}x peak RSS "
            "(target <= 1.0)"
        )
    if {"colbertkit", "limit"} <= results.keys():
        ratio = (
            results["colbertkit"]["examples_per_second"] / results["limit"]["examples_per_second"]
        )
        print(f"colbertkit / limit: {ratio:.2f} (target >= 0.8)")


def print_precision(results: dict[str, dict], args: argparse.Namespace, source: str) -> None:
    from colbertkit.precision import native_cpu_bf16, resolve_mixed_precision

    native = native_cpu_bf16()
    print(
        f"data: {source}; batch {args.batch_size} x (1 + {args.neg_nums}); query "
        f"{args.query_len} / passage {args.passage_len} tokens; {args.warmup + args.steps} steps, "
        f"examples/s over the last {args.steps}; torch threads {args.threads or 'default'}"
    )
    print(
        f"this CPU: {'native bf16 (' + native + ')' if native else 'no native bf16 (emulated)'}; "
        f"mixed_precision auto would run: {resolve_mixed_precision('auto', 'cpu')[0]}"
    )
    fp32, bf16 = results["fp32"], results["bf16"]
    print(f"{'':<6}{'examples/s':>12}{'peak RSS MiB':>15}")
    for mode in PRECISION_MODES:
        print(
            f"{mode:<6}{results[mode]['examples_per_second']:>12.2f}"
            f"{results[mode]['peak_rss_mib']:>15.0f}"
        )
    ratio = bf16["examples_per_second"] / fp32["examples_per_second"]
    print(f"bf16 / fp32: {ratio:.2f}x examples/s")
    print(f"{'step':>4}{'fp32 loss':>12}{'bf16 loss':>12}{'difference':>12}")
    pairs = list(zip(fp32["losses"], bf16["losses"], strict=True))
    for step, (exact, approximate) in enumerate(pairs, start=1):
        print(f"{step:>4}{exact:>12.4f}{approximate:>12.4f}{approximate - exact:>+12.4f}")
    differences = [abs(b - a) for a, b in pairs]
    first = [sum(losses[:5]) / 5 for losses in (fp32["losses"], bf16["losses"])]
    last = [sum(losses[-5:]) / 5 for losses in (fp32["losses"], bf16["losses"])]
    print(
        f"mean |difference| {sum(differences) / len(differences):.4f}, largest "
        f"{max(differences):.4f}; mean of the first 5 steps -> last 5: fp32 {first[0]:.3f} -> "
        f"{last[0]:.3f}, bf16 {first[1]:.3f} -> {last[1]:.3f}"
    )


if __name__ == "__main__":
    main()
