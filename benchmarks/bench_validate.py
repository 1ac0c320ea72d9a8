"""Speed and memory of ``validate_dataset`` on generated data in the reference shape.

    python benchmarks/bench_validate.py [--size-mb 200] [--scale 4] [--token-mb 10] [--keep]

Rows look like the T2Ranking rows of the reference project: a short Chinese query, 2 positives
and 15 negatives of ~500 characters each (about 25 KB a row as UTF-8). Texts are slices of a
random CJK string, so rows and texts do not repeat the way a tiny pool would. Files are written
under ``benchmarks/_data/`` (git-ignored) and deleted afterwards unless ``--keep``.

Printed, in one run:

* MB/s without a tokenizer over the whole file (target >= 50 MB/s on 2 cores). The file was
  just written, so it is read from the page cache: this measures the validator, not the disk.
* MB/s with the packaged all-MiniLM-L6-v2 tokenizer, on the first ``--token-mb`` MB only
  (tokenizing every text is far slower than checking it; the slice is said in the output).
* Peak RSS of a fresh process validating the file and one ``--scale`` times larger, and their
  ratio (target: the larger file costs < 1.2x the memory), next to an import-only baseline.
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
MB = 1_000_000

CJK = [chr(code) for code in range(0x4E00, 0x4E00 + 3500)]
# Full-width CJK comma, full stop, enumeration comma, semicolon, colon, ? ! ( ) and some ASCII.
PUNCTUATION = [*"\uff0c\u3002\u3001\uff1b\uff1a\uff1f\uff01\uff08\uff09", " ", "0", "1", "a"]


def make_file(path: Path, size_bytes: int, seed: int) -> int:
    """Write rows until ``size_bytes``; returns the number of rows."""
    generator = random.Random(seed)
    alphabet = CJK * 4 + PUNCTUATION  # mostly CJK, some punctuation and ASCII
    corpus = "".join(generator.choices(alphabet, k=2_000_000))

    def text(low: int, high: int) -> str:
        length = generator.randint(low, high)
        start = generator.randrange(0, len(corpus) - length)
        return corpus[start : start + length]

    rows = written = 0
    with path.open("w", encoding="utf-8", newline="\n") as out:
        while written < size_bytes:
            record = {
                "query": text(6, 24) + str(rows),  # unique queries, as in T2Ranking
                "pos": [text(350, 650) for _ in range(2)],
                "neg": [text(350, 650) for _ in range(15)],
            }
            line = json.dumps(record, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            rows += 1
    return rows


def slice_file(source: Path, target: Path, size_bytes: int) -> None:
    with source.open("rb") as src, target.open("wb") as out:
        copied = 0
        for line in src:
            if copied >= size_bytes:
                break
            out.write(line)
            copied += len(line)


def throughput(path: Path, **options) -> tuple[float, float]:
    from colbertkit.validation import validate_dataset

    start = time.perf_counter()
    report = validate_dataset(path, **options)
    seconds = time.perf_counter() - start
    assert report.ok, report.summary_line()
    return path.stat().st_size / MB / seconds, seconds


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child started by a
# process that has loaded transformers would report the parent's peak.
_RSS_CODE = """
import re, sys
from colbertkit.validation import validate_dataset
if sys.argv[1] != "-":
    report = validate_dataset(sys.argv[1], neg_nums=15, batch_size=32)
    assert report.ok
with open("/proc/self/status") as status:
    print(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
"""


def peak_rss_mib(path: Path | None) -> float:
    """Peak RSS (MiB) of a fresh interpreter that validates ``path`` (None: imports only)."""
    output = subprocess.run(
        [sys.executable, "-c", _RSS_CODE, str(path) if path else "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(output.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200, help="size of the base file")
    parser.add_argument("--scale", type=int, default=4, help="the larger file is this many times")
    parser.add_argument("--token-mb", type=float, default=10, help="slice for the tokenizer run")
    parser.add_argument("--tokenizer", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    DATA_DIR.mkdir(exist_ok=True)
    base = DATA_DIR / f"bench_{args.size_mb:g}mb.jsonl"
    large = DATA_DIR / f"bench_{args.size_mb * args.scale:g}mb.jsonl"
    token_slice = DATA_DIR / f"bench_{args.token_mb:g}mb_slice.jsonl"
    try:
        start = time.perf_counter()
        rows = make_file(base, int(args.size_mb * MB), seed=1)
        large_rows = make_file(large, int(args.size_mb * args.scale * MB), seed=2)
        slice_file(base, token_slice, int(args.token_mb * MB))
        print(
            f"generated {base.name}: {base.stat().st_size / MB:.1f} MB, {rows:,} rows; "
            f"{large.name}: {large.stat().st_size / MB:.1f} MB, {large_rows:,} rows "
            f"({time.perf_counter() - start:.1f} s)"
        )
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        print(f"cpus: {os.cpu_count()}, load average {load}, python {sys.version.split()[0]}")

        throughput(token_slice, neg_nums=15)  # warm-up: imports, page cache
        # Best of three: other work on a shared machine only ever slows a run down.
        runs = [throughput(base, neg_nums=15, batch_size=32) for _ in range(3)]
        speed, seconds = max(runs)
        print(
            f"no tokenizer:   {speed:7.1f} MB/s  (best of 3 over {base.stat().st_size / MB:.0f} "
            f"MB: {seconds:.2f} s; all {', '.join(f'{r[0]:.0f}' for r in runs)} MB/s; "
            f"target >= 50 MB/s: {'met' if speed >= 50 else 'MISSED'})"
        )
        speed, seconds = throughput(
            token_slice,
            neg_nums=15,
            tokenizer=args.tokenizer,
            query_max_len=128,
            passage_max_len=512,
        )
        print(
            f"with tokenizer: {speed:7.1f} MB/s  (first {token_slice.stat().st_size / MB:.1f} MB "
            f"only, {args.tokenizer}, every text tokenized; {seconds:.2f} s)"
        )
        baseline = peak_rss_mib(None)
        small_rss = peak_rss_mib(base)
        large_rss = peak_rss_mib(large)
        ratio = large_rss / small_rss
        print(
            f"peak RSS: imports only {baseline:.1f} MiB; {base.stat().st_size / MB:.0f} MB file "
            f"{small_rss:.1f} MiB; {large.stat().st_size / MB:.0f} MB file {large_rss:.1f} MiB"
        )
        print(
            f"ratio {args.scale}x file / 1x file: {ratio:.3f} "
            f"(target < 1.2: {'met' if ratio < 1.2 else 'MISSED'}); above imports: "
            f"{small_rss - baseline:.1f} MiB vs {large_rss - baseline:.1f} MiB"
        )
    finally:
        if not args.keep:
            for path in (base, large, token_slice):
                path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
