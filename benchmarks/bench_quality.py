"""Does fine-tuning help? NDCG@10 of the untrained start and of three recipes, in one run.

    python benchmarks/bench_quality.py                         # ../shared/data/clapnq_small
    python benchmarks/bench_quality.py --data DIR --workdir runs/quality
    python benchmarks/bench_quality.py --sweep                 # + the recipe options, one at a time

Data (not part of the project; ``--data``, default ``../shared/data/clapnq_small``): a BEIR
folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``). ClapNQ-small holds 1,292
English Wikipedia passages and 300 Natural Questions with one relevant passage each. Its queries
are split once (seeded) into ``--train-queries`` training and ``--eval-queries`` held-out queries;
the held-out ones are never trained on.

* **Held-out task**: each eval query reranks its relevant passage among BM25's top
  ``--rerank-top`` other passages of the corpus (``colbertkit.mining.mine_negatives`` with ranks
  1..k), scored by ``colbertkit.evaluation.evaluate``; every system is compared with (a), per
  query, by ``colbertkit.evaluation.compare`` (mean difference and 95% paired bootstrap interval).
* **Systems**, all the packaged all-MiniLM-L6-v2 with a fresh 128-d ColBERT head (seeded):
  (a) untrained; (b) contrastive with given negatives: what a dataset without mining holds,
  random passages of the corpus; (c) contrastive with BM25-mined hard negatives
  (``mine_negatives``, ranks 11-100, the defaults); (d) (c)'s rows with teacher scores,
  ``loss: contrastive+kl``. The teacher is the same MiniLM used the way it was pretrained: a
  bi-encoder (mean-pooled, normalised embeddings, cosine): a strong dense retriever on Natural
  Questions, which its pretraining data includes. (b), (c), (d) train with the recipe of the
  bundled ``minilm`` profile (the settings in ``RECIPE``), one epoch.
* ``--task t2rank`` (``--data`` holding ``t2rank_100.jsonl`` and its distillation file; Chinese,
  where the English MiniLM is weak): (b) trains on the rows' given negatives, (c) on BM25
  negatives mined from the training rows' passages, (d) on (b)'s rows with the real teacher's
  scores of the distillation file; each eval query reranks its own ``pos + neg``
  (:func:`build_t2rank`).
* ``--sweep`` trains (c) again with one recipe option changed at a time, including the settings
  that were the defaults before the recipe was measured (``lr`` 2e-5 everywhere, no head
  warm-up), and reports each against the recipe and against (a).

CPU-sized by default (2 shared cores): short lengths (query 32 / passage 64 tokens), 3
negatives, batches of 8, the top 10 BM25 candidates; each system takes a few minutes to train and
as long to evaluate. Larger settings (``--rerank-top 100 --neg-nums 15 --passage-max-len 256``)
separate recipes better where compute allows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clapnq_small"
SEED = 42  # the fresh head's seed, in training and for (a)

# The recipe of configs/minilm.yaml (what the sweep supports; see the README's numbers).
RECIPE: dict[str, Any] = {
    "lr": 1e-3,  # the fresh head's rate
    "encoder_lr": 2e-5,
    "head_warmup_steps": 0,  # measured: a 5-step head warm-up did not help (README)
    "temperature": 0.02,
    "other_positives_as_negatives": True,
    "warmup_proportion": 0.1,
}
# Before this benchmark: one rate for everything (the reference's), no head warm-up.
PREVIOUS_DEFAULTS: dict[str, Any] = {
    "lr": 2e-5,
    "encoder_lr": None,
    "head_warmup_steps": 0,
    "temperature": 0.02,
    "other_positives_as_negatives": False,
}
FILE_NAMES = {
    "eval": "eval.jsonl",
    "mined": "train_mined.jsonl",
    "random": "train_random.jsonl",
    "distill": "train_distill.jsonl",
}
SWEEP: dict[str, dict[str, Any]] = {
    "the previous defaults": PREVIOUS_DEFAULTS,
    "a 5-step head warm-up": {"head_warmup_steps": 5},
    "one lr (2e-5) for all": {"lr": 2e-5, "encoder_lr": None},
    "temperature 0.05": {"temperature": 0.05},
    "no in-batch negatives": {"other_positives_as_negatives": False},
}


def log(text: str) -> None:
    print(f"[bench_quality] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def load_beir(data: Path) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """(corpus pid -> text, queries qid -> text, qrels qid -> relevant pids)."""
    corpus = {row["_id"]: row["text"] for row in read_jsonl(data / "corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in read_jsonl(data / "queries.jsonl")}
    qrels: dict[str, list[str]] = {}
    lines = (data / "qrels" / "test.tsv").read_text().splitlines()
    for line in lines[1:]:
        qid, pid, grade = line.split("\t")
        if int(grade) > 0 and pid in corpus:
            qrels.setdefault(qid, []).append(pid)
    return corpus, queries, qrels


def build_data(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The split, the eval rows and the three training files (b, c, d)."""
    from colbertkit.mining import mine_negatives

    corpus, queries, qrels = load_beir(args.data)
    qids = sorted(qid for qid in qrels if qid in queries)
    random.Random(args.seed).shuffle(qids)
    eval_ids = qids[: args.eval_queries]
    train_ids = qids[args.eval_queries : args.eval_queries + args.train_queries]
    if len(train_ids) < args.train_queries:
        raise SystemExit(f"{args.data} has {len(qids)} judged queries; fewer than asked for")

    def query_rows(ids: list[str]) -> list[dict[str, Any]]:
        return [{"query": queries[q], "pos": [corpus[p] for p in qrels[q]]} for q in ids]

    files = {
        "train_queries": write_jsonl(work / "train_queries.jsonl", query_rows(train_ids)),
        "eval_queries": write_jsonl(work / "eval_queries.jsonl", query_rows(eval_ids)),
    }
    corpus_file = args.data / "corpus.jsonl"
    started = time.perf_counter()
    # Held-out: the relevant passage among BM25's top k others (ranks 1..k, positives dropped).
    files["eval"] = work / FILE_NAMES["eval"]
    mine_negatives(
        files["eval_queries"], corpus_file, files["eval"], neg_nums=args.rerank_top,
        rank_range=(0, args.rerank_top), force=True,
    )  # fmt: skip
    # (c): BM25 hard negatives, mine's default ranks 11-100.
    files["mined"] = work / FILE_NAMES["mined"]
    mine_negatives(
        files["train_queries"], corpus_file, files["mined"], neg_nums=args.neg_nums,
        seed=args.seed, force=True,
    )  # fmt: skip
    log(f"mined eval and training negatives with BM25 in {time.perf_counter() - started:.0f} s")
    # (b): random passages of the corpus, as a dataset without mining would hold.
    generator = random.Random(args.seed)
    pids = sorted(corpus)
    random_rows = []
    for row, qid in zip(query_rows(train_ids), train_ids, strict=True):
        others = [p for p in generator.sample(pids, args.neg_nums + 5) if p not in qrels[qid]]
        random_rows.append({**row, "neg": [corpus[p] for p in others[: args.neg_nums]]})
    files["random"] = write_jsonl(work / FILE_NAMES["random"], random_rows)
    # (d): (c)'s rows with the teacher's scores.
    started = time.perf_counter()
    mined = read_jsonl(files["mined"])
    teacher = dense_scores(
        [(row["query"], text) for row in mined for text in (*row["pos"], *row["neg"])],
        args.passage_max_len,
    )
    position = 0
    for row in mined:
        row["pos_scores"] = teacher[position : position + len(row["pos"])]
        position += len(row["pos"])
        row["neg_scores"] = teacher[position : position + len(row["neg"])]
        position += len(row["neg"])
    files["distill"] = write_jsonl(work / FILE_NAMES["distill"], mined)
    log(f"teacher scored {position} pairs in {time.perf_counter() - started:.0f} s")
    return files


def build_t2rank(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """T2Ranking (Chinese): given negatives, mined ones, and a real teacher's scores.

    ``t2rank_100.jsonl`` (query, pos, 15 given negatives) and ``t2rank_100.distill.standard.jsonl``
    (the same queries, every passage graded 0..1 by a large teacher) in ``args.data``. The queries
    are split (seeded); each eval query reranks its own pos + neg. (c) mines BM25 negatives from a
    corpus of the training rows' passages (ranks 1..30, positives dropped); (d) is (b)'s rows with
    the teacher's scores of the same passages.
    """
    from colbertkit.mining import mine_negatives

    rows = read_jsonl(args.data / "t2rank_100.jsonl")
    graded = read_jsonl(args.data / "t2rank_100.distill.standard.jsonl")
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    eval_rows = [rows[i] for i in order[: args.eval_queries]]
    train_ids = order[args.eval_queries : args.eval_queries + args.train_queries]
    train_rows = [rows[i] for i in train_ids]
    files = {
        "eval": write_jsonl(work / FILE_NAMES["eval"], eval_rows),
        "random": write_jsonl(work / FILE_NAMES["random"], train_rows),  # the given negatives
        "train_queries": write_jsonl(
            work / "train_queries.jsonl",
            [{"query": r["query"], "pos": r["pos"]} for r in train_rows],
        ),
    }
    corpus = sorted({text for row in train_rows for text in (*row["pos"], *row["neg"])})
    files["mined"] = work / FILE_NAMES["mined"]
    mine_negatives(
        files["train_queries"], corpus, files["mined"], neg_nums=15, rank_range=(0, 30),
        seed=args.seed, force=True,
    )  # fmt: skip
    distill = []
    for index in train_ids:
        row, teacher = rows[index], graded[index]
        if teacher["query"] != row["query"]:
            raise SystemExit("the distillation file's queries are not in t2rank_100.jsonl's order")
        score = dict(zip(teacher["pos"], teacher["pos_scores"], strict=True))
        distill.append(
            {**row, "pos_scores": [score[t] for t in row["pos"]],
             "neg_scores": [score[t] for t in row["neg"]]}
        )  # fmt: skip
    files["distill"] = write_jsonl(work / FILE_NAMES["distill"], distill)
    return files


def dense_scores(pairs: list[tuple[str, str]], max_len: int, batch_size: int = 32) -> list[float]:
    """The teacher: MiniLM as the bi-encoder it was trained to be (mean pooling, cosine)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from colbertkit.checkpoint import resolve_checkpoint

    path = str(resolve_checkpoint(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()
    texts = sorted({text for pair in pairs for text in pair}, key=len)
    embeddings: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            encoded = tokenizer(
                batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            hidden = encoder(**encoded).last_hidden_state  # (B, L, H)
            mask = encoded["attention_mask"][..., None].float()  # (B, L, 1)
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (B, H)
            embeddings.update(zip(batch, pooled, strict=True))
    return [round(float(embeddings[q] @ embeddings[p]), 6) for q, p in pairs]


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def train_config(args: argparse.Namespace, dataset: Path, output: Path, **recipe: Any) -> dict:
    settings = {**RECIPE, **recipe}
    if settings.get("encoder_lr") is None:
        settings.pop("encoder_lr", None)
    return {
        "model": MODEL,
        "dataset": str(dataset),
        "output_dir": str(output),
        "colbert_dim": 128,
        "query_max_len": args.query_max_len,
        "passage_max_len": args.passage_max_len,
        "neg_nums": args.neg_nums,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "seed": SEED,
        "progress_bar": False,
        "save_each_epoch": False,
        "best_metric": None,
        **settings,
    }


def run_training(config: Mapping[str, Any]) -> tuple[Path, float]:
    import shutil

    from colbertkit.training import train

    shutil.rmtree(config["output_dir"], ignore_errors=True)
    started = time.perf_counter()
    result = train(dict(config))
    return result.model_dir, time.perf_counter() - started


def evaluate_system(args: argparse.Namespace, eval_file: Path, checkpoint: str, **options: Any):
    from colbertkit.evaluation import evaluate

    report = evaluate(
        checkpoint,
        eval_file,
        options={
            "query_max_len": args.query_max_len,
            "passage_max_len": args.passage_max_len,
            "encode_batch_size": 64,
            **options,
        },
    )
    return report.system


def difference(system: Any, baseline: Any) -> Any:
    from colbertkit.evaluation import compare

    return compare(system, baseline, samples=2000, seed=0)["ndcg@10"]


def interval(diff: Any) -> str:
    mark = " *" if diff.excludes_zero else ""
    return (
        f"{diff.difference:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]{mark} "
        f"({diff.won}/{diff.lost}/{diff.tied})"
    )


def save_results(path: Path, results: Mapping[str, Any], seconds: Mapping[str, float]) -> None:
    """Every system's per-query metrics so far: an interrupted run keeps what it measured."""
    from dataclasses import asdict

    data = {name: {"seconds": seconds.get(name), **asdict(r)} for name, r in results.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def load_results(path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    from colbertkit.evaluation import QueryResult, SystemResult

    results, seconds = {}, {}
    for name, data in json.loads(path.read_text()).items():
        seconds[name] = data.pop("seconds")
        data["queries"] = [QueryResult(**query) for query in data["queries"]]
        results[name] = SystemResult(**data)
    return results, seconds


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder")
    parser.add_argument(
        "--task",
        choices=["clapnq", "t2rank"],
        default="clapnq",
        help="clapnq: --data is a BEIR folder; t2rank: --data holds t2rank_100*.jsonl",
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_quality"))
    parser.add_argument("--train-queries", type=int, default=200)
    parser.add_argument("--eval-queries", type=int, default=100)
    # 39 others + the relevant one: 100 queries x 40 candidates fit one scoring window of the
    # scorer (4,096 pairs), so each distinct passage is encoded once.
    parser.add_argument("--rerank-top", type=int, default=39, help="BM25 candidates per query")
    parser.add_argument("--neg-nums", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--query-max-len", type=int, default=32)
    parser.add_argument("--passage-max-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the split and the negatives")
    parser.add_argument("--sweep", action="store_true", help="also the recipe options")
    parser.add_argument("--only-sweep", action="store_true", help="(a) and the sweep only")
    parser.add_argument(
        "--systems", default="bcd", help="which of (b), (c), (d) to train, e.g. 'cd'"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the data and the systems already measured in --workdir (results.json)",
    )
    args = parser.parse_args()
    if args.task == "t2rank" and args.data == DEFAULT_DATA:
        args.data = DEFAULT_DATA.parent
    needed = "corpus.jsonl" if args.task == "clapnq" else "t2rank_100.distill.standard.jsonl"
    if not (args.data / needed).is_file():
        raise SystemExit(f"{args.data}: no {needed}; pass --data DIR")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    saved = work / "results.json"
    names = ("eval", "mined", "random", "distill")
    if args.resume and all((work / f"{FILE_NAMES[name]}").is_file() for name in names):
        files = {name: work / FILE_NAMES[name] for name in names}
    elif args.task == "t2rank":
        files = build_t2rank(args, work)
    else:
        files = build_data(args, work)
    results, seconds = load_results(saved) if args.resume and saved.is_file() else ({}, {})

    untrained = "(a) untrained (fresh head)"
    if untrained not in results:
        clock = time.perf_counter()
        results[untrained] = evaluate_system(
            args, files["eval"], MODEL, fresh_head=True, colbert_dim=128, seed=SEED
        )
        seconds[untrained] = time.perf_counter() - clock
        save_results(saved, results, seconds)
    log(f"{untrained}: NDCG@10 {results[untrained].means['ndcg@10']:.4f}")
    systems = {  # the most telling first: the log shows each result as it comes
        "(c) contrastive, mined negatives": (files["mined"], {}),
        "(b) contrastive, given negatives": (files["random"], {}),
        "(d) contrastive+kl, teacher scores": (
            files["distill"],
            {"loss": "contrastive+kl", "teacher_temperature": 0.05},
        ),
    }
    systems = {name: value for name, value in systems.items() if name[1] in args.systems}
    if args.only_sweep:
        systems = {}
    if args.sweep or args.only_sweep:
        for name, change in SWEEP.items():
            systems[f"sweep: (c) with {name}"] = (files["mined"], change)
    for index, (name, (dataset, change)) in enumerate(systems.items()):
        if name in results:
            continue
        config = train_config(args, dataset, work / f"run-{index}", **change)
        model_dir, train_seconds = run_training(config)
        clock = time.perf_counter()
        results[name] = evaluate_system(args, files["eval"], str(model_dir))
        seconds[name] = train_seconds + time.perf_counter() - clock
        save_results(saved, results, seconds)
        log(
            f"{name}: NDCG@10 {results[name].means['ndcg@10']:.4f}, vs (a) "
            f"{interval(difference(results[name], results[untrained]))} ({seconds[name]:.0f} s)"
        )

    base = results[untrained]
    reference = "(b) contrastive, given negatives"
    recipe = "(c) contrastive, mined negatives"
    task = (
        f"its relevant passage among BM25's top {args.rerank_top}"
        if args.task == "clapnq"
        else "its own pos + neg (T2Ranking)"
    )
    print(
        f"\nheld-out: {len(base.counted())} queries, each reranking {task}; "
        f"{args.train_queries} training queries x "
        f"{args.neg_nums} negatives, {args.epochs} epoch(s), "
        f"q{args.query_max_len}/d{args.passage_max_len}, "
        f"batch {args.batch_size}; recipe {RECIPE}"
    )
    print("NDCG@10 differences: mean [95% paired bootstrap interval] (won/lost/tied queries);")
    print("* = the interval excludes 0\n")
    header = f"{'system':<58} {'NDCG@10':>7} {'MRR@10':>7}  {'vs (a)':<40} {'vs (b) / vs (c)'}"
    print(header)
    print("-" * len(header))
    order = [untrained, reference, recipe, *(n for n in results if n.startswith(("(d)", "sweep")))]
    for name in (n for n in order if n in results):
        result = results[name]
        versus_a = "" if name == untrained else interval(difference(result, base))
        second = ""
        if name.startswith(("(c)", "(d)")) and reference in results:
            second = "vs (b) " + interval(difference(result, results[reference]))
        elif name.startswith("sweep") and recipe in results:
            second = "vs (c) " + interval(difference(result, results[recipe]))
        print(
            f"{name:<58} {result.means['ndcg@10']:>7.4f} {result.means['mrr@10']:>7.4f}  "
            f"{versus_a:<40} {second}"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s; per system (train + eval): " + ", ".join(
        f"{name.split(' ')[0]} {value:.0f} s" for name, value in seconds.items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()
