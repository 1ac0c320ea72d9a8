"""Speed and memory of ``colbertkit score`` against the reference way and the encoder limit.

    python benchmarks/bench_score.py [--queries 200] [--passages-per-query 10] [--rounds 1]

Data: 200 queries x 10 passages of 60-250 words (2,000 pairs), English words drawn from the
MiniLM vocabulary with a fixed seed. Model: the packaged all-MiniLM-L6-v2 encoder + a 128-d
head, CPU, 2 threads. Three contenders:

* colbertkit - the scorer behind the CLI (``PairScorer.score``: dedup, length-sorted dynamic
  batches, MaxSim);
* reference  - what the reference does: every pair encoded as is, queries padded to 128 and
  passages to 512, batches of 32, zeros of padding in the max;
* limit      - one encoder forward over exactly the distinct texts' real tokens: texts grouped by
  exact token length (no padding at all), batches of up to 32, encoder only.

Speed: the three run one after the other in one process, ``--rounds`` times, and each keeps its
best rate (this machine is shared and its speed wanders: run with the machine otherwise idle,
and raise ``--rounds`` when it is not). The reference way costs the same for every batch (all
padded to one shape), so its rate is measured on the first ``--reference-pairs`` pairs.

Memory: each contender also runs once over all pairs in a fresh subprocess, colbertkit through
the real CLI (``colbertkit score CKPT PAIRS --output FILE``), and its peak RSS (VmHWM) is read.
Also printed: the start-up time of ``colbertkit --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
COLBERT_DIM = 128


def make_pairs(path: Path, queries: int, per_query: int, seed: int = 0) -> None:
    from colbertkit.checkpoint import resolve_checkpoint

    vocab_file = resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2") / "vocab.txt"
    words = [w for w in vocab_file.read_text().split() if w.isalpha() and len(w) >= 3]
    rng = random.Random(seed)
    with open(path, "w") as out:
        for q in range(queries):
            query = " ".join(rng.choices(words, k=rng.randint(5, 15)))
            for p in range(per_query):
                passage = " ".join(rng.choices(words, k=rng.randint(60, 250)))
                out.write(f"q{q}\t{query}\tq{q}p{p}\t{passage}\n")


def make_checkpoint(path: Path) -> None:
    from colbertkit.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(
        "sentence-transformers/all-MiniLM-L6-v2", fresh_head=True, colbert_dim=COLBERT_DIM
    )
    save_checkpoint(loaded.model, loaded.tokenizer, path)


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(qid, query, passage) of each line."""
    with open(path) as lines:
        rows = [line.rstrip("\n").split("\t") for line in lines]
    return [(row[0], row[1], row[3]) for row in rows]


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak over fork/exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reference_way(model, tokenizer, pairs: list[tuple[str, str]]) -> None:
    """The reference: pad to max length, every pair encoded, zeros of padding in the max."""
    import torch

    with torch.inference_mode():
        for i in range(0, len(pairs), 32):
            batch = pairs[i : i + 32]

            def encode(texts, max_len):
                encoded = tokenizer(
                    texts, truncation=True, max_length=max_len, padding="max_length",
                    return_tensors="pt",
                )  # fmt: skip
                return model(encoded["input_ids"], encoded["attention_mask"])

            q, q_mask = encode([p[0] for p in batch], 128)
            d, _ = encode([p[1] for p in batch], 512)
            token_scores = torch.einsum("bid,bjd->bij", q, d)
            _ = token_scores.max(-1).values.sum(-1) / q_mask.sum(-1)


def limit_way(encoder, tokenizer, pairs: list[tuple[str, str]]) -> None:
    """Encoder only, over the distinct texts' real tokens, grouped by exact length."""
    import torch

    by_length: dict[int, list[list[int]]] = {}
    for texts, max_len in (
        (list(dict.fromkeys(q for q, _ in pairs)), 128),
        (list(dict.fromkeys(p for _, p in pairs)), 512),
    ):
        for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]:
            by_length.setdefault(len(ids), []).append(ids)
    with torch.inference_mode():
        for group in by_length.values():
            for i in range(0, len(group), 32):
                input_ids = torch.tensor(group[i : i + 32])
                encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def best_rates(checkpoint: Path, pairs_file: Path, rounds: int, reference_pairs: int) -> dict:
    """Pairs/s of each contender: best of ``rounds`` rounds, contenders interleaved."""
    from colbertkit.checkpoint import load_checkpoint
    from colbertkit.scorer import PairScorer

    loaded = load_checkpoint(checkpoint)
    scorer = PairScorer(loaded.model, loaded.tokenizer, query_max_len=128, passage_max_len=512)
    pairs = [(q, p) for _, q, p in read_pairs(pairs_file)]
    contenders = {
        "colbertkit": (lambda: list(scorer.score(pairs)), len(pairs)),
        "reference": (
            lambda: reference_way(loaded.model, loaded.tokenizer, pairs[:reference_pairs]),
            min(reference_pairs, len(pairs)),
        ),
        "limit": (lambda: limit_way(loaded.model.encoder, loaded.tokenizer, pairs), len(pairs)),
    }
    # Warm-up: first calls allocate and pick kernels.
    reference_way(loaded.model, loaded.tokenizer, pairs[:2])
    list(scorer.score(pairs[:2]))
    best = dict.fromkeys(contenders, 0.0)
    for _ in range(rounds):
        for name, (run, count) in contenders.items():
            start = time.perf_counter()
            run()
            best[name] = max(best[name], count / (time.perf_counter() - start))
    return best


def child(mode: str, work: Path) -> None:
    """One full run of ``mode`` in this fresh process; prints its peak RSS as JSON."""
    import torch

    torch.set_num_threads(THREADS)
    checkpoint, pairs_file = work / "ckpt", work / "pairs.tsv"
    if mode == "speed":
        rounds, reference_pairs = int(os.environ["BENCH_ROUNDS"]), int(os.environ["BENCH_REF"])
        print(json.dumps(best_rates(checkpoint, pairs_file, rounds, reference_pairs)))
        return
    if mode == "colbertkit":
        from colbertkit.cli.app import app

        args = ["score", str(checkpoint), str(pairs_file), "--output", str(work / "s.tsv"), "-q"]
        try:
            app(args, standalone_mode=False)
        except SystemExit as exit:
            assert not exit.code, exit.code
    else:
        from colbertkit.checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint)
        pairs = [(q, p) for _, q, p in read_pairs(pairs_file)]
        if mode == "reference":  # every batch has the same shape: the peak is reached at once
            reference_way(loaded.model, loaded.tokenizer, pairs[:64])
        else:
            limit_way(loaded.model.encoder, loaded.tokenizer, pairs)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def startup_seconds(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(["colbertkit", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--passages-per-query", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="best of N (noisy machines)")
    parser.add_argument("--reference-pairs", type=int, default=256)
    parser.add_argument("--child", choices=["speed", "colbertkit", "reference", "limit"])
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.work))
        return

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "HF_HUB_OFFLINE": "1",
        "BENCH_ROUNDS": str(args.rounds),
        "BENCH_REF": str(args.reference_pairs),
    }
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        make_pairs(work / "pairs.tsv", args.queries, args.passages_per_query)
        make_checkpoint(work / "ckpt")

        def run(mode: str) -> dict:
            command = [sys.executable, __file__, "--child", mode, "--work", str(work)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

        n_pairs = args.queries * args.passages_per_query
        print(
            f"{n_pairs} pairs ({args.queries} queries x {args.passages_per_query} passages of "
            f"60-250 words), MiniLM + {COLBERT_DIM}-d head, CPU, {THREADS} threads"
        )
        rates = run("speed")
        rss = {mode: run(mode)["peak_rss_mb"] for mode in ("colbertkit", "reference", "limit")}
    for mode in ("colbertkit", "reference", "limit"):
        print(f"  {mode:<10} {rates[mode]:7.2f} pairs/s   peak RSS {rss[mode]:6.0f} MB")
    ours, ref, lim = rates["colbertkit"], rates["reference"], rates["limit"]
    print(f"colbertkit / reference: {ours / ref:5.2f}x   (target >= 5)")
    print(f"colbertkit / limit:     {ours / lim:5.2f}    (target >= 0.8)")
    print(f"limit / reference:      {lim / ref:5.2f}x")
    print(f"peak RSS colbertkit / reference: {rss['colbertkit'] / rss['reference']:5.2f}")
    print(f"colbertkit --help: {startup_seconds():.3f} s, median of 5 (target < 0.5 s)")


if __name__ == "__main__":
    main()
