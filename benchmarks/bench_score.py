"""Speed and accuracy of ``colbertkit score``: fp32 and ``--dtype auto`` against the fp32 encoder
limit and the reference way, and what bf16 does to the scores and rankings.

    python benchmarks/bench_score.py [--queries 100] [--passages-per-query 10] [--rounds 1]
    python benchmarks/bench_score.py --beir /path/to/beir_dataset   # real text for accuracy
    python benchmarks/bench_score.py --compile                      # also measure torch.compile

Model: the packaged all-MiniLM-L6-v2 encoder + a 128-d head, CPU, 2 threads.

**Speed** (100 queries x 10 passages of 60-250 words, 1,000 pairs, English words drawn from the
MiniLM vocabulary with a fixed seed; ``--queries 200`` is the 2,000-pair run of earlier
issues). Contenders:

* fp32       - the scorer behind the CLI (``PairScorer.score``: dedup, length-sorted dynamic
  batches, background tokenization, MaxSim), in fp32 (the default);
* auto       - the same with ``--dtype auto`` (bf16 where this CPU computes it natively: AMX or
  AVX512-BF16; fp32 otherwise, and then it is the fp32 run again);
* bf16       - bf16 forced, on the first ``--bf16-pairs`` pairs, when auto is not bf16 here:
  what bf16 would cost on this CPU (it is emulated without AMX / AVX512-BF16);
* limit      - one fp32 encoder forward over exactly the distinct texts' real tokens: texts
  grouped by exact token length (no padding at all), batches of up to 32, encoder only;
* reference  - what the reference does: every pair encoded as is, queries padded to 128 and
  passages to 512, batches of 32, zeros of padding in the max (on ``--reference-pairs``).
* compiled   - with ``--compile``: fp32 with ``torch.compile`` (dynamic shapes); its start-up is
  timed separately and the input size where it pays is printed.

Targets (issue 12): auto >= 1.8x the fp32 limit on a CPU with native bf16; fp32 >= 0.9 of it.

The contenders run one after the other in one process, ``--rounds`` times, each keeping its best
rate (this machine is shared and its speed wanders: run with the machine otherwise idle, and
raise ``--rounds`` when it is not).

**Accuracy** (200 queries x 50 candidate passages): every query reranks its relevant passage and
the 49 passages of a pool that share the most words with it (hard candidates, as a first-stage
retriever would give), scored in fp32 and in bf16 (what auto runs on hardware with native bf16;
the numbers are the same wherever bf16 is computed). Reported: the largest and mean score
difference, the share of queries whose top-10 order is unchanged, the mean top-10 overlap and
the mean Kendall tau of the 50 candidates' orders. Synthetic text by default; ``--beir DIR``
takes real queries and passages from a BEIR-layout dataset (``corpus.jsonl``,
``queries.jsonl``, ``qrels/test.tsv``). Target: top-10 overlap >= 0.95 on average.

**Memory**: each of fp32, reference and limit also runs once over all pairs in a fresh
subprocess, fp32 through the real CLI (``colbertkit score CKPT PAIRS --output FILE``), and its
peak RSS (VmHWM) is read. Also printed: the start-up time of ``colbertkit --help``.
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
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def vocabulary_words() -> list[str]:
    from colbertkit.checkpoint import resolve_checkpoint

    vocab_file = resolve_checkpoint(MODEL) / "vocab.txt"
    return [w for w in vocab_file.read_text().split() if w.isalpha() and len(w) >= 3]


def make_pairs(path: Path, queries: int, per_query: int, seed: int = 0) -> None:
    words = vocabulary_words()
    rng = random.Random(seed)
    with open(path, "w") as out:
        for q in range(queries):
            query = " ".join(rng.choices(words, k=rng.randint(5, 15)))
            for p in range(per_query):
                passage = " ".join(rng.choices(words, k=rng.randint(60, 250)))
                out.write(f"q{q}\t{query}\tq{q}p{p}\t{passage}\n")


def make_checkpoint(path: Path) -> None:
    from colbertkit.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(MODEL, fresh_head=True, colbert_dim=COLBERT_DIM)
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


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


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


def limit_way(encoder, tokenizer, pairs: list[tuple[str, str]], device: str = "cpu") -> None:
    """Encoder only, over the distinct texts' real tokens, grouped by exact length (the encoder
    limit; ``benchmarks/gpu_check.py`` runs it on CUDA)."""
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
                input_ids = torch.tensor(group[i : i + 32], device=device)
                encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def best_rates(checkpoint: Path, pairs_file: Path, args: argparse.Namespace) -> dict:
    """Pairs/s of each contender: best of ``rounds`` rounds, contenders interleaved."""
    from colbertkit.scorer import load_scorer

    fp32 = load_scorer(str(checkpoint), device="cpu", dtype="fp32", query_max_len=128,
                       passage_max_len=512)  # fmt: skip
    auto = load_scorer(str(checkpoint), device="cpu", dtype="auto", query_max_len=128,
                       passage_max_len=512)  # fmt: skip
    pairs = [(q, p) for _, q, p in read_pairs(pairs_file)]
    model, tokenizer = fp32.loaded.model, fp32.loaded.tokenizer
    contenders = {
        "fp32": (lambda: list(fp32.scorer.score(pairs)), len(pairs)),
        "auto": (lambda: list(auto.scorer.score(pairs)), len(pairs)),
        "limit": (lambda: limit_way(model.encoder, tokenizer, pairs), len(pairs)),
        "reference": (
            lambda: reference_way(model, tokenizer, pairs[: args.reference_pairs]),
            min(args.reference_pairs, len(pairs)),
        ),
    }
    if auto.dtype != "bf16" and args.bf16_pairs:
        bf16 = load_scorer(str(checkpoint), device="cpu", dtype="bf16", query_max_len=128,
                           passage_max_len=512)  # fmt: skip
        subset = pairs[: args.bf16_pairs]
        contenders["bf16"] = (lambda: list(bf16.scorer.score(subset)), len(subset))
        contenders["fp32 (bf16's pairs)"] = (lambda: list(fp32.scorer.score(subset)), len(subset))
    # Warm-up: first calls allocate and pick kernels.
    reference_way(model, tokenizer, pairs[:2])
    for scorer in (fp32, auto):
        list(scorer.scorer.score(pairs[:2]))
    best = dict.fromkeys(contenders, 0.0)
    for _ in range(args.rounds):
        for name, (run, count) in contenders.items():
            start = time.perf_counter()
            run()
            best[name] = max(best[name], count / (time.perf_counter() - start))
    result = {"rates": best, "auto": f"{auto.dtype}, {auto.dtype_reason}"}
    if args.compile:
        result["compile"] = compiled_rates(checkpoint, pairs, args.rounds)
    return result


def compiled_rates(checkpoint: Path, pairs: list[tuple[str, str]], rounds: int) -> dict:
    """fp32 with torch.compile: the first pass (compiling as it meets new shapes) and the best
    later pass, on the same pairs."""
    from colbertkit.scorer import load_scorer

    compiled = load_scorer(str(checkpoint), device="cpu", dtype="fp32", query_max_len=128,
                           passage_max_len=512, compile_encoder=True)  # fmt: skip
    start = time.perf_counter()
    list(compiled.scorer.score(pairs))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(max(rounds, 1)):
        start = time.perf_counter()
        list(compiled.scorer.score(pairs))
        best = min(best, time.perf_counter() - start)
    return {"first_seconds": first, "rate": len(pairs) / best, "pairs": len(pairs)}


# --------------------------------------------------------------------------------------------
# Accuracy of bf16 against fp32
# --------------------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return {word for word in text.lower().split() if word.isalpha()}


def accuracy_workload(args: argparse.Namespace) -> tuple[list[tuple[str, str, str, str]], str]:
    """(qid, query, pid, passage) rows: each query with its relevant passage and the 49 pool
    passages sharing most words with it; and a description of the data."""
    rng = random.Random(1)
    if args.beir:
        root = Path(args.beir)
        corpus = {}
        with open(root / "corpus.jsonl") as lines:
            for line in lines:
                row = json.loads(line)
                corpus[row["_id"]] = f"{row.get('title', '')} {row['text']}".strip()
        with open(root / "queries.jsonl") as lines:
            query_text = {row["_id"]: row["text"] for row in map(json.loads, lines)}
        relevant: dict[str, str] = {}
        with open(root / "qrels" / "test.tsv") as lines:
            for line in lines:
                qid, pid, *rest = line.rstrip("\n").split("\t")
                if qid in query_text and pid in corpus and rest and rest[-1] != "0":
                    relevant.setdefault(qid, pid)
        qids = list(relevant)[: args.accuracy_queries]
        queries = {qid: query_text[qid] for qid in qids}
        pool = list(dict.fromkeys(relevant[qid] for qid in qids))
        others = [pid for pid in corpus if pid not in set(pool)]
        rng.shuffle(others)
        pool += others[: max(0, args.pool - len(pool))]
        passages = {pid: corpus[pid] for pid in pool}
        source = f"{root.name} (real queries and passages)"
    else:
        words = vocabulary_words()
        passages = {
            f"p{i}": " ".join(rng.choices(words, k=rng.randint(20, 80))) for i in range(args.pool)
        }
        pids = list(passages)
        queries, relevant = {}, {}
        for q in range(args.accuracy_queries):
            target = pids[q % len(pids)]
            own = passages[target].split()
            queries[f"q{q}"] = " ".join(
                rng.sample(own, min(len(own), rng.randint(4, 8))) + rng.choices(words, k=2)
            )
            relevant[f"q{q}"] = target
        source = "synthetic (MiniLM vocabulary words)"
    pool_words = {pid: _words(text) for pid, text in passages.items()}
    rows = []
    for qid, query in queries.items():
        query_words = _words(query)
        others = [pid for pid in passages if pid != relevant[qid]]
        rng.shuffle(others)  # ties in overlap broken at random, reproducibly
        others.sort(key=lambda pid: -len(query_words & pool_words[pid]))
        for pid in [relevant[qid], *others[: args.accuracy_passages - 1]]:
            rows.append((qid, query, pid, passages[pid]))
    described = (
        f"{len(queries)} queries x {args.accuracy_passages} passages from a pool of "
        f"{len(passages)}, {source}"
    )
    return rows, described


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two score lists over the same items."""
    n, agree = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            agree += 1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1
    return agree / (n * (n - 1) / 2)


def ranking_agreement(rows, exact: list[float], approximate: list[float]) -> dict:
    by_query: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_query.setdefault(row[0], []).append(index)
    unchanged, overlaps, taus = 0, [], []
    for indices in by_query.values():
        top_exact = sorted(indices, key=lambda i: -exact[i])[:10]
        top_approximate = sorted(indices, key=lambda i: -approximate[i])[:10]
        unchanged += top_exact == top_approximate
        overlaps.append(len(set(top_exact) & set(top_approximate)) / len(top_exact))
        taus.append(kendall_tau([exact[i] for i in indices], [approximate[i] for i in indices]))
    differences = [abs(x - y) for x, y in zip(exact, approximate, strict=True)]
    return {
        "max_difference": max(differences),
        "mean_difference": statistics.fmean(differences),
        "top10_unchanged": unchanged / len(by_query),
        "top10_overlap": statistics.fmean(overlaps),
        "kendall_tau": statistics.fmean(taus),
        "min_kendall_tau": min(taus),
    }


def accuracy(checkpoint: Path, args: argparse.Namespace) -> dict:
    from colbertkit.scorer import load_scorer

    rows, described = accuracy_workload(args)
    pairs = [(query, passage) for _, query, _, passage in rows]
    scores = {}
    for dtype in ("fp32", "bf16"):
        loaded = load_scorer(str(checkpoint), device="cpu", dtype=dtype, query_max_len=128,
                             passage_max_len=512)  # fmt: skip
        scores[dtype] = list(loaded.scorer.score(pairs))
    return {"workload": described, **ranking_agreement(rows, scores["fp32"], scores["bf16"])}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def child(mode: str, work: Path, args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints its result as JSON."""
    import torch

    torch.set_num_threads(THREADS)
    checkpoint, pairs_file = work / "ckpt", work / "pairs.tsv"
    if mode == "speed":
        print(json.dumps(best_rates(checkpoint, pairs_file, args)))
        return
    if mode == "accuracy":
        print(json.dumps(accuracy(checkpoint, args)))
        return
    if mode == "colbertkit":
        from colbertkit.cli.app import app

        cli = ["score", str(checkpoint), str(pairs_file), "--output", str(work / "s.tsv"), "-q"]
        try:
            app(cli, standalone_mode=False)
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
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--passages-per-query", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="best of N (noisy machines)")
    parser.add_argument("--reference-pairs", type=int, default=128)
    parser.add_argument(
        "--bf16-pairs", type=int, default=50, help="bf16 forced on these (0: not measured)"
    )
    parser.add_argument("--accuracy-queries", type=int, default=200)
    parser.add_argument("--accuracy-passages", type=int, default=50)
    parser.add_argument("--pool", type=int, default=300, help="distinct passages (accuracy)")
    parser.add_argument("--beir", help="BEIR dataset directory for the accuracy part")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--skip", default="", help="comma-separated: speed,accuracy,memory")
    parser.add_argument(
        "--child", choices=["speed", "accuracy", "colbertkit", "reference", "limit"]
    )
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.work), args)
        return
    skip = set(filter(None, args.skip.split(",")))

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    forwarded = [arg for arg in sys.argv[1:]]
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        make_pairs(work / "pairs.tsv", args.queries, args.passages_per_query)
        make_checkpoint(work / "ckpt")

        def run(mode: str) -> dict:
            command = [sys.executable, __file__, *forwarded, "--child", mode, "--work", str(work)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        n_pairs = args.queries * args.passages_per_query
        print(f"MiniLM + {COLBERT_DIM}-d head, CPU, {THREADS} threads")
        if "speed" not in skip:
            print(
                f"speed: {n_pairs} pairs ({args.queries} queries x {args.passages_per_query} "
                "passages of 60-250 words)"
            )
            speed = run("speed")
            print_speed(speed, args)
        if "accuracy" not in skip:
            report = run("accuracy")
            print_accuracy(report)
        if "memory" not in skip:
            rss = {mode: run(mode)["peak_rss_mb"] for mode in ("colbertkit", "reference", "limit")}
            print("peak RSS over all pairs, one fresh process each:")
            for mode, value in rss.items():
                print(f"  {mode:<10} {value:6.0f} MB")
            print(f"peak RSS colbertkit / reference: {rss['colbertkit'] / rss['reference']:5.2f}")
    print(f"colbertkit --help: {startup_seconds():.3f} s, median of 5 (target < 0.5 s)")


def print_speed(speed: dict, args: argparse.Namespace) -> None:
    rates = speed["rates"]
    print(f"  auto runs here as: {speed['auto']}")
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:8.2f} pairs/s")
    limit = rates["limit"]
    print(f"fp32 / fp32 limit:      {rates['fp32'] / limit:5.2f}    (target >= 0.9)")
    print(f"auto / fp32 limit:      {rates['auto'] / limit:5.2f}    (target >= 1.8, native bf16)")
    print(f"auto / fp32:            {rates['auto'] / rates['fp32']:5.2f}")
    print(f"fp32 / reference:       {rates['fp32'] / rates['reference']:5.2f}x")
    if "bf16" in rates:
        ratio = rates["bf16"] / rates["fp32 (bf16's pairs)"]
        print(
            f"bf16 forced / fp32 on the first {args.bf16_pairs} pairs: {ratio:5.2f} "
            "(this CPU has no native bf16: auto keeps fp32)"
        )
    if "compile" in speed:
        compiled = speed["compile"]
        gain = compiled["rate"] / rates["fp32"]
        eager_seconds = compiled["pairs"] / rates["fp32"]
        start_up = compiled["first_seconds"] - compiled["pairs"] / compiled["rate"]
        print(
            f"torch.compile: {gain:.2f}x fp32 once compiled; start-up {start_up:.0f} s "
            f"(first pass {compiled['first_seconds']:.0f} s vs {eager_seconds:.0f} s eager)"
        )
        if gain > 1:
            break_even = start_up / (1 / rates["fp32"] - 1 / compiled["rate"])
            print(f"  pays for its start-up past about {break_even:,.0f} pairs of this kind")
        else:
            print("  never pays here")


def print_accuracy(report: dict) -> None:
    print(f"accuracy of bf16 against fp32: {report['workload']}")
    print(f"  largest score difference    {report['max_difference']:.2e}")
    print(f"  mean score difference       {report['mean_difference']:.2e}")
    print(f"  top-10 order unchanged      {report['top10_unchanged']:.1%} of queries")
    print(f"  top-10 overlap (mean)       {report['top10_overlap']:.4f}   (target >= 0.95)")
    print(
        f"  Kendall tau, 50 candidates  {report['kendall_tau']:.4f} mean, "
        f"{report['min_kendall_tau']:.4f} lowest"
    )


if __name__ == "__main__":
    main()
