"""Speed and memory of ``colbertkit mine`` (BM25 only) on a generated English-like corpus.

    python benchmarks/bench_mine.py [--passages 200000] [--queries 2000] [--keep]

The corpus is BEIR-shaped jsonl (``_id``, ``text``): passages of 40 to 120 words drawn from a
Zipf-distributed vocabulary of 50,000 made-up words (built from syllables, so the stemmer has
real work). Each query is 5 words of one passage, which is its positive. Files go under
``benchmarks/_data/`` (git-ignored) and are deleted afterwards unless ``--keep``.

The installed ``colbertkit mine`` runs in a fresh process, as a user runs it. Printed, in one
run: passages indexed per second and queries mined per second (from the command's JSON report),
the peak RSS of that process next to an import-only baseline, and the memory per passage and
per corpus byte above that baseline. Default: about a minute on 2 cores; ``--passages 1000000``
for the million-passage case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "_data"
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "te",
    "su",
    "no",
    "vi",
    "der",
    "pa",
    "gu",
    "zen",
    "tor",
    "el",
    "an",
    "is",
    "ol",
    "um",
    "bri",
    "cha",
    "fo",
    "nek",
]


def make_data(directory: Path, passages: int, queries: int, seed: int) -> tuple[Path, Path]:
    import numpy as np

    generator = random.Random(seed)
    words: set[str] = set()
    while len(words) < 50_000:
        words.add("".join(generator.choices(SYLLABLES, k=generator.randint(1, 4))))
    vocabulary = np.array(sorted(words))
    ranks = np.arange(1, len(vocabulary) + 1)
    probabilities = (1 / ranks) / (1 / ranks).sum()  # Zipf: a few words are everywhere
    numbers = np.random.default_rng(seed)
    lengths = numbers.integers(40, 121, size=passages)
    drawn = vocabulary[numbers.choice(len(vocabulary), size=int(lengths.sum()), p=probabilities)]
    ends = np.cumsum(lengths)
    corpus_path, queries_path = directory / "corpus.jsonl", directory / "queries.jsonl"
    texts = []
    with corpus_path.open("w", encoding="utf-8") as corpus:
        for i, (start, end) in enumerate(zip(ends - lengths, ends, strict=True)):
            text = " ".join(drawn[start:end])
            corpus.write(json.dumps({"_id": f"d{i}", "text": text}) + "\n")
            if i < queries * 50:
                texts.append(text)
    with queries_path.open("w", encoding="utf-8") as out:
        for position in generator.sample(range(len(texts)), queries):
            text = texts[position]
            query = " ".join(generator.sample(text.split(), 5))
            out.write(json.dumps({"query": query, "pos": [text]}) + "\n")
    return corpus_path, queries_path


def peak_rss_mb(command: list[str]) -> tuple[float, str]:
    """Run ``command`` in a fresh process; (its peak RSS in MB, its stdout)."""
    code = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(done.stderr)\n"
        "if done.returncode: sys.exit(done.returncode)\n"
        "sys.stdout.write(done.stdout)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *command], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr}")
    *output, rss = done.stdout.splitlines()
    return float(rss), "\n".join(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    if args.queries * 50 > args.passages:
        args.queries = max(1, args.passages // 50)

    directory = DATA_DIR / f"mine-{args.passages}"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus, queries = make_data(directory, args.passages, args.queries, args.seed)
    corpus_mb = corpus.stat().st_size / 1e6
    print(
        f"generated {args.passages:,} passages ({corpus_mb:.0f} MB) and {args.queries:,} "
        f"queries in {time.perf_counter() - started:.0f} s"
    )
    colbertkit = str(Path(sys.executable).parent / "colbertkit")
    try:
        baseline, _ = peak_rss_mb(
            [sys.executable, "-c", "import bm25s, Stemmer, numpy, colbertkit.mining"]
        )
        out = directory / "mined.jsonl"
        command = [colbertkit, "mine", str(queries), str(corpus), str(out)]
        command += ["--force", "--format", "json", "--no-progress", "--language", "en"]
        peak, output = peak_rss_mb(command)
        report = json.loads(output)
    finally:
        if not args.keep:
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()

    above = peak - baseline
    print(
        f"indexed {report['corpus_passages']:,} passages in {report['index_seconds']:.1f} s: "
        f"{report['passages_per_second']:,.0f} passages/s ({report['vocabulary']:,} terms, "
        f"BM25 index {report['index_bytes'] / 1e6:.0f} MB)"
    )
    print(
        f"mined {report['queries']:,} queries in {report['mine_seconds']:.1f} s: "
        f"{report['queries_per_second']:,.0f} queries/s "
        f"({report['negatives_written']:,} negatives, {report['removed']['positive']:,} "
        "positives removed)"
    )
    print(
        f"peak RSS {peak:,.0f} MB (imports alone {baseline:,.0f} MB): "
        f"{above * 1e6 / report['corpus_passages']:,.0f} bytes per passage, "
        f"{above / corpus_mb:.2f}x the corpus file ({corpus_mb:.0f} MB)"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"({cores} cores; times wander on shared machines, the ratios less)")


if __name__ == "__main__":
    main()
