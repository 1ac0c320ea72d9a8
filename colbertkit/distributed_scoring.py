"""Scoring past one device: the input split across processes by whole windows, merged in order.

``colbertkit score --num-processes N`` (and :func:`colbertkit.score_pairs` with
``num_processes``) starts ``accelerate launch`` exactly as ``colbertkit train`` does (the
launcher's accelerate config and supervised :func:`~colbertkit.launcher.run_launch`), with
:mod:`colbertkit.score_worker` as the worker:

* the input is cut into the scorer's windows (``window`` pairs each, in input order); window
  ``w`` goes to process ``w % world_size``, so every process gets whole windows and an equal
  share;
* each process loads the model on its own device and scores its windows. A window is scored on
  its own (no state crosses windows), so its scores are the same bits on any process;
* after each round of ``world_size`` windows, process 0 gathers their scores (a collective) and
  appends them, in input order, to one binary file (float64, little-endian), written
  atomically;
* the launching command then reads that file and writes the output with the same code as a
  one-process run: the output is byte-identical.

Several machines: the same command on every machine, with ``machine_rank`` 0, 1, ... and the
address of machine 0; each needs the checkpoint and the input at the same paths. Machine 0
gathers the scores and writes the output; the others only score their share.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from colbertkit.errors import ColbertkitError, UsageError

SCORES_FILE = "scores.f64"
JOB_FILE = "score_job.json"
ACCELERATE_FILE = "accelerate_config.yaml"
PROGRESS_EVERY_SECONDS = 30.0


class LaunchSettings(BaseModel):
    """Where a scoring runs: processes per machine, machines, and how they meet (as in train)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_processes: int = Field(default=1, ge=1, description="Processes per machine.")
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Default: a free port on one machine, 29500 across machines.",
    )
    device: str = Field(default="auto", description="auto (GPUs if CUDA), cpu or cuda.")

    @model_validator(mode="after")
    def _check(self) -> LaunchSettings:
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError(
                f"`num_machines` {self.num_machines} needs `main_process_ip` (the address of "
                "machine 0, where the output is written)"
            )
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"`machine_rank` {self.machine_rank} must be below `num_machines` "
                f"{self.num_machines} (machines count from 0)"
            )
        if self.world_size > 1 and self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(
                f"`device` {self.device}: several processes each take their own GPU (cuda) or "
                "share the CPU (cpu); use auto, cpu or cuda"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


class ScoreJob(BaseModel):
    """What every scoring process is told (``score_job.json``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    pairs_path: Path
    pairs_format: Literal["tsv", "jsonl"]  # a checked pairs file, or [query, passage] lines
    count: int
    scores_path: Path  # written by process 0 only (machine 0)
    window: int
    batch_size: int
    query_max_len: int | None = None
    passage_max_len: int | None = None
    dtype: str = "fp32"
    pad_floor: bool = False
    load_options: dict[str, Any] = Field(default_factory=dict)
    quiet: bool = False
    description: str = ""  # what the launcher prints before the model loads
    gpu: bool = False  # the launch's choice: CPU processes stay on the CPU on a GPU machine


def window_sizes(count: int, window: int) -> list[int]:
    """Sizes of the input's windows, in order."""
    return [min(window, count - start) for start in range(0, count, window)]


def windows_of_rank(count: int, window: int, world_size: int, rank: int) -> list[int]:
    """The windows (indices) process ``rank`` scores: every ``world_size``-th from ``rank``."""
    return list(range(rank, math.ceil(count / window), world_size))


def _distributed_config(launch: LaunchSettings) -> tuple[Any, bool]:
    """The launcher's ``distributed:`` section for ``launch``, and whether it uses GPUs."""
    from pydantic import ValidationError

    from colbertkit.errors import describe_validation_error
    from colbertkit.launcher import gpu_available
    from colbertkit.profile import DistributedConfig

    gpu = gpu_available() if launch.device == "auto" else launch.device == "cuda"
    if gpu and not gpu_available():
        raise UsageError("`device` cuda: CUDA is not available here; use `device=cpu`")
    if gpu:
        import torch

        gpus = torch.cuda.device_count()
        if launch.num_processes > gpus:
            raise UsageError(
                f"`num_processes` {launch.num_processes}: each process takes its own GPU and "
                f"this machine has {gpus}; use `num_processes={gpus}` or `device=cpu`"
            )
    try:
        dist = DistributedConfig(
            strategy="ddp" if launch.world_size > 1 else "none",
            device="gpu" if gpu else "cpu",
            num_processes=launch.num_processes,
            num_machines=launch.num_machines,
            machine_rank=launch.machine_rank,
            main_process_ip=launch.main_process_ip,
            main_process_port=launch.main_process_port,
        )
    except ValidationError as error:
        raise UsageError(describe_validation_error(error)) from None
    return dist, gpu


@dataclass
class MergedScores:
    """The scores of every pair in input order, as process 0 wrote them (on machine 0)."""

    path: Path
    count: int

    def __iter__(self) -> Iterator[float]:
        import array

        with open(self.path, "rb") as handle:
            while chunk := handle.read(8 * 65536):
                values = array.array("d")
                values.frombytes(chunk)
                if sys.byteorder != "little":
                    values.byteswap()
                yield from values


@contextlib.contextmanager
def scoring_launch(
    checkpoint: str,
    pairs_path: Path,
    *,
    count: int,
    launch: LaunchSettings,
    pairs_format: Literal["tsv", "jsonl"] = "tsv",
    batch_size: int,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    dtype: str = "fp32",
    pad_floor: bool = False,
    window: int | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
    **load_options: Any,
) -> Iterator[MergedScores | None]:
    """Score ``pairs_path`` (``count`` checked pairs) on the processes ``launch`` asks for.

    Yields the merged scores (on machine 0; None on the others) and removes its temporary
    files afterwards. ``log(line)`` is told what happens. Raises
    :class:`~colbertkit.errors.ColbertkitError` when a worker fails (its own message is printed
    by the worker).
    """
    from colbertkit.checkpoint.files import atomic_write_text
    from colbertkit.launcher import (
        accelerate_config_for,
        cpu_threads_for,
        launch_command,
        run_launch,
    )
    from colbertkit.scorer import DEFAULT_WINDOW

    dist, gpu = _distributed_config(launch)
    work = Path(tempfile.mkdtemp(prefix="colbertkit-score-"))
    try:
        import yaml

        description = (
            f"{launch.num_processes} process(es) x {launch.num_machines} machine(s) "
            f"on {'GPU' if gpu else 'CPU'}"
        )
        job = ScoreJob(
            checkpoint=str(checkpoint),
            pairs_path=Path(pairs_path).absolute(),
            pairs_format=pairs_format,
            count=count,
            scores_path=work / SCORES_FILE,
            window=window or DEFAULT_WINDOW,
            batch_size=batch_size,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            dtype=dtype,
            pad_floor=pad_floor,
            load_options=load_options,
            quiet=quiet,
            description=description,
            gpu=gpu,
        )
        accelerate = accelerate_config_for(dist, mixed_precision="no", gpu=gpu, layer_class=None)
        accelerate_file, job_file = work / ACCELERATE_FILE, work / JOB_FILE
        atomic_write_text(accelerate_file, yaml.safe_dump(accelerate, sort_keys=False))
        atomic_write_text(job_file, job.model_dump_json(indent=2))
        command = launch_command(
            accelerate_file,
            job_file,
            cpu_threads=cpu_threads_for(launch.num_processes, gpu),
            module="colbertkit.score_worker",
        )
        if log is not None:
            windows = len(window_sizes(count, job.window))
            if windows < launch.world_size:
                log(
                    f"{count} pairs make {windows} window(s) of up to {job.window}: "
                    f"{launch.world_size - windows} of {launch.world_size} processes have "
                    "nothing to score (a smaller --window shares them out)"
                )
            log(f"launching {description}: {' '.join(command)}")
        code = run_launch(command)
        if code != 0:
            error = ColbertkitError(
                f"scoring failed in a worker process (exit code {code}); its message is above"
            )
            error.exit_code = code  # passed on, as colbertkit train does
            raise error
        if launch.machine_rank != 0:
            yield None
        else:
            yield MergedScores(job.scores_path, count)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def score_pairs_distributed(
    checkpoint: str,
    pairs: Iterable[tuple[str, str]],
    *,
    launch: LaunchSettings,
    batch_size: int,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    dtype: str = "fp32",
    pad_floor: bool = False,
    window: int | None = None,
    **load_options: Any,
) -> list[float]:
    """:func:`colbertkit.score_pairs` on several processes; an empty list off machine 0."""
    handle, name = tempfile.mkstemp(prefix="colbertkit-pairs-", suffix=".jsonl")
    spool = Path(name)
    count = 0
    try:
        with open(handle, "w", encoding="utf-8") as out:
            for query, passage in pairs:
                out.write(json.dumps([query, passage], ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            return []
        with scoring_launch(
            checkpoint,
            spool,
            count=count,
            launch=launch,
            pairs_format="jsonl",
            batch_size=batch_size,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            dtype=dtype,
            pad_floor=pad_floor,
            window=window,
            quiet=True,
            **load_options,
        ) as merged:
            return [] if merged is None else list(merged)
    finally:
        spool.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The worker side (each process under accelerate launch; see colbertkit.score_worker)
# --------------------------------------------------------------------------------------------


def read_job_pairs(job: ScoreJob) -> Iterator[tuple[str, str]]:
    """The job's (query, passage) pairs in input order."""
    if job.pairs_format == "jsonl":
        with open(job.pairs_path, encoding="utf-8") as lines:
            for line in lines:
                query, passage = json.loads(line)
                yield query, passage
        return
    from colbertkit.pairs import parse_pairs

    with open(job.pairs_path, "rb") as handle:
        for pair in parse_pairs(handle, str(job.pairs_path)):
            yield pair.query, pair.passage


def _pairs_of_windows(
    pairs: Iterable[tuple[str, str]], window: int, chosen: set[int]
) -> Iterator[tuple[str, str]]:
    """The pairs of the ``chosen`` windows, in order (the others are read and skipped)."""
    for index, pair in enumerate(pairs):
        if index // window in chosen:
            yield pair


def run_score_worker(job: ScoreJob) -> None:
    """Score this process's windows; process 0 gathers every round and writes the scores."""
    import array

    import torch
    import torch.distributed as torch_dist
    from accelerate import PartialState

    from colbertkit.checkpoint.files import atomic_file
    from colbertkit.precision import auto_hint
    from colbertkit.scorer import load_scorer

    # Without CUDA several processes must join one gloo group (MULTI_CPU); see training.py.
    # PartialState does not read accelerate's use_cpu (only AcceleratorState does): say it.
    state = PartialState(cpu=not job.gpu or not torch.cuda.is_available())
    rank, world_size = state.process_index, state.num_processes
    main = state.is_main_process
    loaded = load_scorer(
        job.checkpoint,
        batch_size=job.batch_size,
        query_max_len=job.query_max_len,
        passage_max_len=job.passage_max_len,
        device="cpu" if state.device.type == "cpu" else str(state.device),
        dtype=job.dtype,
        pad_floor=job.pad_floor,
        window=job.window,
        **job.load_options,
    )
    scorer = loaded.scorer

    def say(line: str) -> None:
        if main and not job.quiet:
            print(f"colbertkit: {line}", file=sys.stderr, flush=True)

    for note in loaded.loaded.notes:
        say(note)
    say(
        f"scoring {job.count} pairs on {job.description}, each {loaded.describe()}, "
        f"query/passage max len {scorer.query_max_len}/{scorer.passage_max_len}"
        f"{', pad floor' if job.pad_floor else ''}"
    )
    hint = auto_hint(state.device) if job.dtype == "fp32" else None
    if hint:
        say(hint)

    sizes = window_sizes(job.count, job.window)
    mine = windows_of_rank(job.count, job.window, world_size, rank)
    scores = scorer.score(_pairs_of_windows(read_job_pairs(job), job.window, set(mine)))
    rounds = math.ceil(len(sizes) / world_size)
    started, reported, done = time.perf_counter(), time.perf_counter(), 0
    with atomic_file(job.scores_path, "wb") if main else contextlib.nullcontext() as out:
        for round_index in range(rounds):
            window_index = round_index * world_size + rank
            share = (
                [next(scores) for _ in range(sizes[window_index])]
                if window_index < len(sizes)
                else []
            )
            gathered: list[Any] | None = [None] * world_size if main else None
            if world_size > 1:
                torch_dist.gather_object(share, gathered, dst=0)
            elif gathered is not None:
                gathered[0] = share
            if out is None or gathered is None:
                continue
            for window_scores in gathered:  # ranks in order = windows in input order
                values = array.array("d", window_scores)
                if sys.byteorder != "little":
                    values.byteswap()
                out.write(values.tobytes())
                done += len(window_scores)
            now = time.perf_counter()
            if now - reported >= PROGRESS_EVERY_SECONDS:
                reported = now
                say(f"scored {done} of {job.count} pairs ({done / (now - started):.1f} pairs/s)")
    scores.close()  # stops its reader thread
    if world_size > 1:
        state.wait_for_everyone()
