"""The training engine: ColBERT fine-tuning (contrastive and/or distillation) on accelerate.

``train(config)`` runs one training, on one process or under ``accelerate launch`` (DDP over
NCCL or gloo, FSDP on GPUs). The loop reads top to bottom:

1. set-up: accelerator, output directory, data, model, optimizer and schedule, resumption;
2. for each optimizer step: micro-batches (gradient accumulation), each encoded in
   length-sorted chunks, the loss from embeddings (plain or GradCache), then clip, step, log,
   evaluate, checkpoint (during a head warm-up the encoder's gradients are dropped first);
3. the final model in colbertkit's layout (and the reference layout on request).

Who does what across processes: every process encodes its own shard of each global batch;
collectives (DDP gradient reduction, passage gathering, loss averaging for the log, FSDP
state-dict gathering) run on every process at the same points; only the main process writes
files, prints and logs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from colbertkit.checkpoint.layouts import library_versions
from colbertkit.checkpoint.run import (
    BEST_MODEL_DIR,
    CONFIG_FILE,
    FINAL_MODEL_DIR,
    REFERENCE_MODEL_DIR,
    STATE_DICT_PREFIX,
    prepare_run_directory,
    read_trainer_state,
    resume_checkpoint,
    save_training_state,
    write_json,
)
from colbertkit.collate import (
    Collator,
    TokenizedBatch,
    count_examples,
    epoch_examples,
    length_sorted_chunks,
)
from colbertkit.data import RowRules, process_batches, steps_per_epoch
from colbertkit.errors import QUIET_ENV, UsageError, first_line
from colbertkit.losses import (
    contrastive_loss,
    gather_passages,
    grad_cache_backward,
    grouped_positive_columns,
    kl_distillation_loss,
    plain_backward,
    query_positive_mask,
)
from colbertkit.progress import ProgressBar
from colbertkit.train_config import TrainConfig, load_train_config, resume_conflicts

# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished run produced (the same on every process)."""

    output_dir: Path
    model_dir: Path
    global_step: int
    last_loss: float | None
    eval_history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None


@dataclass
class Progress:
    """The data position and counters; saved as ``trainer_state.json`` in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch: int = 0  # next batch of that epoch (index into this process's batch list)
    best_value: float | None = None
    best_step: int | None = None


class ChunkEncoder(nn.Module):
    """The module given to accelerate: one forward encodes a list of padded chunks.

    Plain steps encode queries and passages in a single forward, which is what DDP and FSDP
    expect (one forward, one backward per step). ``colbert`` is the :class:`ColBERT` model.
    """

    def __init__(self, colbert: nn.Module) -> None:
        super().__init__()
        self.colbert = colbert

    def forward(
        self, chunks: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.colbert(input_ids, attention_mask) for input_ids, attention_mask in chunks]


def train(config: TrainConfig | Mapping[str, Any]) -> TrainResult:
    """Fine-tune a ColBERT model as ``config`` says; returns where the final model is.

    Call it from Python, or run it under ``accelerate launch`` (one call per process). Known
    failures raise :class:`colbertkit.errors.ColbertkitError` with a one-line message.
    """
    config = load_train_config(config)
    accelerator = _make_accelerator(config)
    main = accelerator.is_main_process
    world_size = accelerator.num_processes
    quiet = os.environ.get(QUIET_ENV, "") == "1"  # colbertkit train --quiet
    console = _Console(main and not quiet)
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp_asked and world_size > 1 and accelerator.distributed_type != "FSDP":
        console.print(
            f"FSDP was asked for but runs as {accelerator.distributed_type} (DDP): accelerate "
            "has no FSDP on CPU; every process holds the whole model"
        )

    # -- output directory and resumption -------------------------------------------------------
    output_dir = Path(config.output_dir)
    resume_dir = resume_checkpoint(output_dir, config.resume_from)
    progress = Progress()
    if resume_dir is not None:
        progress = _resumed_progress(resume_dir, config, world_size)
    accelerator.wait_for_everyone()  # every process checked the directory before anyone writes
    if main:
        prepare_run_directory(output_dir, resume=resume_dir is not None)

    # -- data ----------------------------------------------------------------------------------
    if config.validate_data:
        _validate_data(config, console)
    rows = _read_rows(config.dataset, RowRules.for_training(config.loss, config.neg_nums))
    eval_rows = (
        _read_rows(config.eval_dataset, RowRules(require_negatives=False))
        if config.eval_dataset
        else None
    )
    data_notes: list[str] = []
    if eval_rows is not None:
        # A row without negatives (a graded row included) would score 1 whatever the model
        # does: left out, as `colbertkit evaluate` leaves it out.
        ranked = [row for row in eval_rows if row.neg]
        if not ranked:
            raise UsageError(
                f"{config.eval_dataset}: no eval row has negatives to rank its positives "
                "against; give each row a non-empty neg list"
            )
        if len(ranked) < len(eval_rows):
            data_notes.append(
                f"{config.eval_dataset}: {len(eval_rows) - len(ranked)} of {len(eval_rows)} "
                "eval rows have no negatives and are left out of evaluation"
            )
        eval_rows = ranked
    plan = plan_training(
        config, world_size, num_examples=count_examples(rows, graded_rows=config.distils)
    )
    total_steps = plan["total_steps"]

    # -- model, optimizer, schedule ------------------------------------------------------------
    colbert, tokenizer, model_notes = _load_model(config)
    model_notes += _freeze_unused_parameters(colbert)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(colbert.encoder)
    if config.train_head_only:
        colbert.encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        _parameter_groups(colbert, config.weight_decay, config.lr, config.encoder_lr),
        lr=config.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    scheduler = learning_rate_schedule(
        optimizer, plan["warmup_steps"], total_steps, plan["head_warmup_steps"],
        plan["encoder_warmup_steps"],
    )  # fmt: skip
    model, optimizer, scheduler = accelerator.prepare(ChunkEncoder(colbert), optimizer, scheduler)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    model.train()

    if main:
        write_json(
            output_dir / CONFIG_FILE,
            {
                "config": config.model_dump(mode="json"),
                "plan": plan,
                "versions": library_versions(),
            },
        )
    for note in [*data_notes, *model_notes]:
        console.print(note)
    console.print(_describe_plan(plan, resume_dir, progress))

    from colbertkit.trackers import make_tracker

    tracker = make_tracker(
        accelerator=accelerator,
        log_with=config.log_with,
        output_dir=output_dir,
        project=config.tracker_project,
        run_name=config.run_name,
        config={**config.model_dump(mode="json"), **plan},
        resume_step=progress.step if resume_dir is not None else None,
    )
    collator = Collator(tokenizer, config.query_max_len, config.passage_max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple_of = config.pad_to_multiple_of or (8 if accelerator.device.type == "cuda" else 1)
    evaluator = (
        _Evaluator(eval_rows, tokenizer, config, accelerator, multiple_of) if eval_rows else None
    )
    if evaluator is not None and config.eval_dtype is not None:
        console.print(f"evaluation runs in {evaluator.describe()}")
    eval_history: list[dict[str, float]] = []

    def evaluate_and_keep_best() -> None:
        assert evaluator is not None
        metrics = evaluator(model)
        eval_history.append({"step": progress.step, **metrics})
        tracker.log({f"eval/{name}": value for name, value in metrics.items()}, progress.step)
        console.print(
            f"eval at step {progress.step}: "
            + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        )
        if config.best_metric is None:
            return
        value = metrics[config.best_metric]
        if progress.best_value is None or value > progress.best_value:
            progress.best_value, progress.best_step = value, progress.step
            _save_final_model(
                accelerator, model, tokenizer, config, output_dir / BEST_MODEL_DIR,
                source={"step": progress.step, config.best_metric: value},
            )  # fmt: skip

    if evaluator is not None and config.eval_at_start and progress.step == 0:
        evaluate_and_keep_best()

    # -- the loop ------------------------------------------------------------------------------
    bar = ProgressBar(
        "train",
        total_steps,
        enabled=main and config.progress_bar and not quiet,
        completed=progress.step,
        stats=True,
        transient=False,
    )
    window_losses: list[float] = []
    window_start, window_examples = time.perf_counter(), 0
    last_loss: float | None = None
    accumulation = config.gradient_accumulation_steps

    while progress.step < total_steps:
        examples = epoch_examples(
            rows,
            neg_nums=config.neg_nums,
            seed=config.seed,
            epoch=progress.epoch,
            sampling=config.negatives_sampling,
            graded_rows=config.distils,
        )
        batches = process_batches(
            len(examples), config.batch_size, world_size, accelerator.process_index
        )
        while progress.batch < len(batches) and progress.step < total_steps:
            # One optimizer step = a window of up to `accumulation` micro-batches. The window at
            # the end of an epoch may be shorter; each micro-batch's loss is divided by the
            # window's real size so the step's gradient is the mean over its micro-batches.
            window = range(progress.batch, min(progress.batch + accumulation, len(batches)))
            step_loss = 0.0
            for micro_index, batch_index in enumerate(window):
                batch = collator([examples[i] for i in batches[batch_index]])
                sync = micro_index == len(window) - 1
                step_loss += _micro_batch(
                    batch, model, accelerator, config, _loss_function(config, batch),
                    pad_id=pad_id, multiple_of=multiple_of, sync=sync, scale=1.0 / len(window),
                ) / len(window)  # fmt: skip
                window_examples += batch.num_queries * world_size
            if progress.step < config.head_warmup_steps:
                _drop_encoder_gradients(model)
            if config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            step_lr = scheduler.get_last_lr()[0]  # the rate this step uses (the head's)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batch = window.stop
            window_losses.append(step_loss)

            if progress.step % config.logging_steps == 0 or progress.step == total_steps:
                # A collective: every process reaches it at the same step.
                mean_loss = float(
                    accelerator.reduce(
                        torch.tensor(window_losses, device=accelerator.device), "mean"
                    ).mean()
                )
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": mean_loss,
                    "train/lr": step_lr,
                    "train/epoch": progress.epoch + progress.batch / len(batches),
                    "train/examples_per_second": window_examples / max(elapsed, 1e-9),
                }
                tracker.log(metrics, progress.step)
                bar.update(
                    completed=progress.step,
                    stats=f"loss {mean_loss:.4f}  lr {step_lr:.2e}  "
                    f"{metrics['train/examples_per_second']:.1f} ex/s",
                )
                last_loss = mean_loss
                window_losses, window_start, window_examples = [], time.perf_counter(), 0
            else:
                bar.update(completed=progress.step)

            end_of_epoch = progress.batch >= len(batches)
            if evaluator is not None and (
                (config.eval_steps and progress.step % config.eval_steps == 0)
                or (end_of_epoch and config.eval_each_epoch)
            ):
                evaluate_and_keep_best()
            if end_of_epoch:  # the saved data position points at the next epoch's start
                progress.epoch, progress.batch = progress.epoch + 1, 0
            if (config.save_steps and progress.step % config.save_steps == 0) or (
                end_of_epoch and config.save_each_epoch and progress.step < total_steps
            ):
                _save_checkpoint(accelerator, model, progress, config, tokenizer)
            if end_of_epoch:
                break

    bar.close()
    if evaluator is not None and (not eval_history or eval_history[-1]["step"] != progress.step):
        evaluate_and_keep_best()

    # -- the final model -----------------------------------------------------------------------
    model_dir = output_dir / FINAL_MODEL_DIR
    _save_final_model(
        accelerator, model, tokenizer, config, model_dir,
        source={"base_model": config.model, "steps": progress.step, "dataset": str(config.dataset)},
        reference_dir=output_dir / REFERENCE_MODEL_DIR if config.save_reference_layout else None,
    )  # fmt: skip
    console.print(f"final model written to {model_dir}")
    tracker.finish()
    accelerator.wait_for_everyone()
    return TrainResult(
        output_dir=output_dir,
        model_dir=model_dir,
        global_step=progress.step,
        last_loss=last_loss,
        eval_history=eval_history,
        best_metric=progress.best_value,
    )


# --------------------------------------------------------------------------------------------
# One micro-batch
# --------------------------------------------------------------------------------------------


def _loss_function(config: TrainConfig, batch: TokenizedBatch) -> Any:
    """``loss(queries_embeddings, queries_mask, passages_embeddings, passages_mask)`` of one
    batch laid out as groups of (positive, negatives...), with the configured loss and options.

    The contrastive term sees the passages of every process when gathering; the KL term needs
    only each query's own group, which is always on its own process (teacher scores grade a
    query's own passages only), so it is computed before gathering and its scores never travel.
    """
    group_size = batch.group_size
    teacher_scores = batch.teacher_scores
    if config.loss != "contrastive" and teacher_scores is None:
        raise UsageError(f"loss {config.loss} needs teacher scores, and a batch has none")

    def loss_from_embeddings(
        queries_embeddings: torch.Tensor,
        queries_mask: torch.Tensor,
        passages_embeddings: torch.Tensor,
        passages_mask: torch.Tensor,
    ) -> torch.Tensor:
        device = queries_embeddings.device
        total = queries_embeddings.new_zeros((), dtype=torch.float32)
        if config.loss != "contrastive":
            assert teacher_scores is not None
            distillation = kl_distillation_loss(
                queries_embeddings, queries_mask, passages_embeddings, passages_mask,
                teacher_scores, temperature=config.temperature,
                teacher_temperature=config.teacher_softmax_temperature,
            )  # fmt: skip
            total = total + config.kl_weight * distillation
        if config.loss == "kl":
            return total
        positive_columns, is_positive = grouped_positive_columns(
            queries_embeddings.shape[0], group_size, device=device
        )
        fingerprints = batch.passage_fingerprints
        if fingerprints is not None:
            fingerprints = fingerprints.to(device)
        if config.gather_across_processes:
            passages_embeddings, passages_mask, positive_columns, is_positive, fingerprints = (
                gather_passages(
                    passages_embeddings, passages_mask, positive_columns, is_positive, fingerprints
                )
            )
        query_positives = None
        if fingerprints is not None and batch.positive_fingerprints is not None:
            query_positives = query_positive_mask(
                fingerprints, batch.positive_fingerprints.to(device)
            )  # (Q, P): passages that are positives of each query, by text
        return total + contrastive_loss(
            queries_embeddings,
            queries_mask,
            passages_embeddings,
            passages_mask,
            positive_columns,
            is_positive,
            temperature=config.temperature,
            other_positives_as_negatives=config.other_positives_as_negatives,
            query_positives=query_positives,
        )

    return loss_from_embeddings


def _drop_encoder_gradients(model: nn.Module) -> None:
    """Head warm-up: the encoder keeps its weights and optimizer state this step.

    Its gradients are still computed (DDP and FSDP expect every parameter's gradient in every
    step), then dropped: AdamW skips a parameter without a gradient entirely (no update, no
    weight decay, no moment estimates), so the encoder's optimizer starts when the warm-up ends.
    """
    for parameter in _unwrapped_colbert(model).encoder.parameters():
        parameter.grad = None


def _unwrapped_colbert(model: nn.Module) -> nn.Module:
    while not isinstance(model, ChunkEncoder):
        model = model.module  # DDP / FSDP wrappers hold the module they wrap
    return model.colbert


def _micro_batch(
    batch: TokenizedBatch,
    model: nn.Module,
    accelerator: Any,
    config: TrainConfig,
    loss_from_embeddings: Any,
    *,
    pad_id: int,
    multiple_of: int,
    sync: bool,
    scale: float,
) -> float:
    """Forward and backward of one micro-batch; gradients accumulate in the parameters.

    ``sync=False`` keeps DDP from reducing gradients (an accumulation window continues);
    ``scale`` divides the loss by the number of micro-batches in the window. Returns the
    (unscaled) loss of this process's queries.
    """
    device = accelerator.device
    query_chunks, passage_chunks = (
        [
            chunk.to(device)
            for chunk in length_sorted_chunks(
                sequences,
                chunk_size=config.encode_chunk_size,
                pad_id=pad_id,
                multiple_of=multiple_of,
            )
        ]
        for sequences in (batch.queries, batch.passages)
    )

    def encode(chunks):
        return model([(chunk.input_ids, chunk.attention_mask) for chunk in chunks])

    def backward(loss: torch.Tensor) -> None:
        accelerator.backward(loss * scale)

    if config.grad_cache:
        loss = grad_cache_backward(
            encode,
            query_chunks,
            passage_chunks,
            loss_from_embeddings,
            backward,
            defer_sync=lambda: accelerator.no_sync(model),
            sync=sync,
        )
    else:
        with nullcontext() if sync else accelerator.no_sync(model):
            loss = plain_backward(
                encode, query_chunks, passage_chunks, loss_from_embeddings, backward
            )
    return float(loss)


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def _make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    from colbertkit.precision import resolve_mixed_precision

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError(
            "mixed_precision 'fp16' needs a CUDA GPU and none is available; "
            "use mixed_precision 'bf16' or 'no' on CPU"
        )
    output_dir = Path(config.output_dir)
    # accelerate keeps its settings in process-wide singletons; forget the previous train()'s
    # (a notebook or a test may call train() again with another mixed precision). The process
    # group and launch environment (PartialState) stay as they are.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # A launcher (torchrun, `accelerate launch`) that starts several processes on a machine
    # without CUDA must get gloo DDP (MULTI_CPU). Left alone, accelerate reports
    # DistributedType.NO in each process: N independent trainings that never share a gradient.
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = not torch.cuda.is_available() and launched_processes > 1
    mixed_precision = config.mixed_precision
    if mixed_precision == "auto":  # decided by the device this process computes on
        forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        device = PartialState(cpu=use_cpu or forced_cpu).device
        mixed_precision, _ = resolve_mixed_precision("auto", device)
    try:
        accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=mixed_precision,
            # The loop accumulates and steps the schedule itself (see the loop): accelerate's
            # counting assumes its own dataloader, which this engine does not use.
            gradient_accumulation_steps=1,
            step_scheduler_with_optimizer=False,
            log_with=None if config.log_with == "none" else config.log_with,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
            ),
        )
    except (ValueError, ImportError) as error:
        raise UsageError(f"cannot set up accelerate: {first_line(error)}") from error
    if accelerator.num_processes != launched_processes:
        raise UsageError(
            f"the launcher started {launched_processes} processes but accelerate set up "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); each would train "
            "alone. On CPU use DDP (MULTI_CPU over gloo), not FSDP"
        )
    if (
        config.expected_num_processes is not None
        and accelerator.num_processes != config.expected_num_processes
    ):
        raise UsageError(
            f"this run has {accelerator.num_processes} process(es) but expected_num_processes is "
            f"{config.expected_num_processes} (distributed type {accelerator.distributed_type}); "
            "on CPU several processes need accelerate's MULTI_CPU, not FSDP"
        )
    set_seed(config.seed)
    return accelerator


def validate_training_data(config: TrainConfig) -> Any:
    """The `validate-data` checks of a run's files; raises on errors, returns the report."""
    from colbertkit.validation import validate_dataset

    report = validate_dataset(
        config.dataset,
        neg_nums=config.neg_nums,
        loss=config.loss,
        eval_path=config.eval_dataset,
        batch_size=config.batch_size,
    )
    report.raise_for_errors()
    return report


def _validate_data(config: TrainConfig, console: _Console) -> None:
    """Every problem of the files, before any model loads; warnings are counted, not listed."""
    report = validate_training_data(config)
    if report.warning_count:
        console.print(
            f"data: {report.warning_count} warning(s); "
            f"`colbertkit validate-data {config.dataset}` lists them"
        )


def _read_rows(path: Path, rules: RowRules) -> list[Any]:
    from colbertkit.data import read_training_rows

    rows = [row for _, row in read_training_rows(path, rules=rules)]
    if not rows:
        raise UsageError(f"{path}: no rows; a training file needs at least one query")
    return rows


def _load_model(config: TrainConfig) -> tuple[nn.Module, Any, list[str]]:
    """The model to fine-tune, from any checkpoint form; a bare encoder gets a fresh head."""
    from colbertkit.checkpoint.build import colbert_from_source
    from colbertkit.checkpoint.sources import open_checkpoint

    source = open_checkpoint(config.model, trust_remote_code=config.trust_remote_code)
    colbert, tokenizer, notes = colbert_from_source(
        source,
        fresh_head=config.fresh_head or source.head is None,
        colbert_dim=config.colbert_dim,
        seed=config.seed,
    )
    return colbert, tokenizer, [f"found {source.description}: {source.form}", *notes]


def _freeze_unused_parameters(colbert: nn.Module) -> list[str]:
    """Freeze parameters that get no gradient from ColBERT's output (e.g. BERT's pooler).

    Found with one tiny forward and backward, so it holds for any encoder. Why: DDP waits for
    a gradient of every trainable parameter and fails on the first step otherwise, and AdamW
    would still decay them.
    """
    was_training = colbert.training
    colbert.eval()
    input_ids = torch.tensor([[101, 102, 103]]) % colbert.encoder.config.vocab_size
    embeddings, _ = colbert(input_ids, torch.ones_like(input_ids))
    embeddings.sum().backward()
    unused = [name for name, p in colbert.named_parameters() if p.requires_grad and p.grad is None]
    for name, parameter in colbert.named_parameters():
        parameter.grad = None
        if name in unused:
            parameter.requires_grad_(False)
    colbert.train(was_training)
    if not unused:
        return []
    prefixes = sorted({name.rsplit(".", 1)[0] for name in unused})
    return [f"frozen (no gradient reaches them from ColBERT's output): {', '.join(prefixes)}"]


def _enable_gradient_checkpointing(encoder: nn.Module) -> None:
    # transformers >= 5.x names it activation checkpointing; earlier 5.x only has the old name.
    enable = getattr(encoder, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            encoder.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    except ValueError as error:
        raise UsageError(
            f"gradient_checkpointing: {error}; turn gradient_checkpointing off for this model"
        ) from error


def _cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The rate's factor at ``step``: transformers' ``get_cosine_schedule_with_warmup``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    head_warmup_steps: int = 0,
    encoder_warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 0 at ``total_steps``, for every group; with a head
    warm-up, the encoder's groups start at ``head_warmup_steps`` with a warm-up of their own
    (``encoder_warmup_steps``) and decay to 0 at the same end."""

    def head(step: int) -> float:
        return _cosine(step, warmup_steps, total_steps)

    def encoder(step: int) -> float:
        if step < head_warmup_steps:
            return 0.0
        return _cosine(
            step - head_warmup_steps, encoder_warmup_steps, total_steps - head_warmup_steps
        )

    factors = [
        encoder if head_warmup_steps and group.get("name", "").startswith("encoder") else head
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _parameter_groups(
    model: nn.Module, weight_decay: float, lr: float, encoder_lr: float | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and normalisation weights; the encoder at
    ``encoder_lr`` (when given) and everything else (the ColBERT head) at ``lr``.

    Found by module type and real parameter name (``encoder.embeddings.LayerNorm.weight``,
    ``head.bias``), not by guessing from a list of substrings; frozen parameters are left out.
    Groups are named (``head``, ``head_no_decay``, ``encoder``, ``encoder_no_decay``); empty ones
    are left out.
    """
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = (
            isinstance(module, nn.LayerNorm | nn.GroupNorm)
            or "norm" in type(module).__name__.lower()
        )
        for parameter_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            if is_norm or parameter_name == "bias":
                no_decay.add(full_name)
    groups: dict[str, dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "encoder" if encoder_lr is not None and name.startswith("encoder.") else "head"
        decays = name not in no_decay
        key = part if decays else f"{part}_no_decay"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr": encoder_lr if part == "encoder" else lr,
            },
        )
        group["params"].append(parameter)
    order = ["head", "head_no_decay", "encoder", "encoder_no_decay"]
    return [groups[key] for key in order if key in groups]


def plan_training(
    config: TrainConfig | Mapping[str, Any], world_size: int = 1, *, num_examples: int | None = None
) -> dict[str, Any]:
    """The numbers to check before spending GPU time; written with the config as ``plan``.

    World size, examples, per-process / global / effective batch, the negatives each query
    really sees per step (gradient accumulation adds none; gathering multiplies them by the
    world size), steps per epoch, total and warm-up steps. Counts the examples by reading the
    dataset unless ``num_examples`` is given; loads no model (a launcher's dry run can call it).
    """
    config = load_train_config(config)
    if num_examples is None:
        rows = _read_rows(config.dataset, RowRules(require_negatives=False))
        num_examples = count_examples(rows, graded_rows=config.distils)
    steps = steps_per_epoch(
        num_examples, config.batch_size, world_size, config.gradient_accumulation_steps
    )
    if steps == 0:
        raise UsageError(
            f"{config.dataset}: {num_examples} examples cannot fill one batch of "
            f"{config.batch_size} x {world_size} processes; lower batch_size or add data"
        )
    total_steps = config.max_steps or config.epochs * steps
    warmup_steps = int(config.warmup_proportion * total_steps)
    per_process = config.batch_size
    negatives = per_process * config.neg_nums
    if config.gather_across_processes:
        negatives *= world_size
    if config.other_positives_as_negatives:
        negatives += per_process * (world_size if config.gather_across_processes else 1) - 1
    return {
        "world_size": world_size,
        "examples": num_examples,
        "batch_size_per_process": per_process,
        "passages_per_query_example": 1 + config.neg_nums,
        "global_batch_size": per_process * world_size,
        "effective_batch_size": per_process * world_size * config.gradient_accumulation_steps,
        "negatives_per_query": negatives,
        "steps_per_epoch": steps,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "large_batch_by": ("gradient caching" if config.grad_cache else "none")
        + (" + cross-process gathering" if config.gather_across_processes else ""),
        "loss": config.loss,
        "head_warmup_steps": min(config.head_warmup_steps, total_steps),
        # The encoder joins after the head warm-up with a warm-up of its own, the same share
        # of the steps it trains for: a first step at the peak rate with fresh Adam moments is
        # what a warm-up exists to avoid.
        "encoder_warmup_steps": int(
            config.warmup_proportion * (total_steps - min(config.head_warmup_steps, total_steps))
        ),
    }


def _describe_plan(plan: Mapping[str, Any], resume_dir: Path | None, progress: Progress) -> str:
    text = (
        f"training on {plan['examples']} examples with {plan['world_size']} process(es): "
        f"{plan['batch_size_per_process']} queries x {plan['passages_per_query_example']} passages "
        f"per process, effective batch {plan['effective_batch_size']}, each query sees "
        f"{plan['negatives_per_query']} negatives (gradient accumulation adds none), "
        f"{plan['total_steps']} steps ({plan['warmup_steps']} warm-up), loss {plan['loss']}"
    )
    if plan["head_warmup_steps"]:
        text += (
            f"; only the head trains for the first {plan['head_warmup_steps']} steps, then "
            f"the encoder warms up over {plan['encoder_warmup_steps']}"
        )
    if resume_dir is not None:
        text += f"; resuming from {resume_dir} at step {progress.step}"
    return text


# --------------------------------------------------------------------------------------------
# Checkpoints and models (their formats are colbertkit.checkpoint's)
# --------------------------------------------------------------------------------------------


def _save_checkpoint(
    accelerator: Any, model: nn.Module, progress: Progress, config: TrainConfig, tokenizer: Any
) -> Path:
    """The full training state at this step, with what resuming and loading need to know."""
    colbert = accelerator.unwrap_model(model).colbert
    state = {
        "progress": asdict(progress),
        "world_size": accelerator.num_processes,
        "config": config.model_dump(mode="json"),
        "model": {
            "state_dict_prefix": STATE_DICT_PREFIX,
            "colbert_dim": colbert.head.out_features,
            "hidden_size": colbert.head.in_features,
            "query_max_len": config.query_max_len,
            "passage_max_len": config.passage_max_len,
        },
        "versions": library_versions(),
    }
    return save_training_state(
        accelerator,
        Path(config.output_dir),
        progress.step,
        state,
        encoder_config=colbert.encoder.config,
        tokenizer=tokenizer,
        keep=config.num_max_checkpoints,
    )


def _resumed_progress(checkpoint: Path, config: TrainConfig, world_size: int) -> Progress:
    """The data position to continue from, if the run's settings allow resuming at all."""
    state = read_trainer_state(checkpoint)
    try:
        progress = Progress(**state["progress"])
    except TypeError as error:
        raise UsageError(f"{checkpoint}: unreadable training progress ({error})") from error
    changed = resume_conflicts(state.get("config", {}), config)
    if changed:
        details = ", ".join(changed)
        raise UsageError(
            f"cannot resume {checkpoint}: settings differ from the run that wrote it ({details}); "
            "restore them or start a new run in another output_dir"
        )
    if state.get("world_size") != world_size:
        raise UsageError(
            f"cannot resume {checkpoint}: it was written by {state.get('world_size')} process(es) "
            f"and this run has {world_size}; the data position is per process, resume with "
            f"{state.get('world_size')}"
        )
    return progress


def _consolidated_colbert(accelerator: Any, model: nn.Module) -> nn.Module | None:
    """The full ColBERT module to write (on the main process; None elsewhere).

    Under FSDP the parameters are sharded: gather a full state dict (a collective, so every
    process calls this) and build an unsharded copy from it on the main process.
    """
    from accelerate.utils import DistributedType

    from colbertkit.checkpoint.build import build_colbert

    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(model).colbert if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    sharded = accelerator.unwrap_model(model).colbert
    encoder_prefix, head_prefix = STATE_DICT_PREFIX + "encoder.", STATE_DICT_PREFIX + "head."
    encoder_tensors = [
        (name.removeprefix(encoder_prefix), lambda value=value: value)
        for name, value in state.items()
        if name.startswith(encoder_prefix)
    ]
    head_state = {
        name.removeprefix(head_prefix): value
        for name, value in state.items()
        if name.startswith(head_prefix)
    }
    colbert = build_colbert(sharded.encoder.config, encoder_tensors, head_state)
    if colbert is None:
        raise UsageError("the gathered FSDP state does not match the encoder's parameter names")
    return colbert


def _save_final_model(
    accelerator: Any,
    model: nn.Module,
    tokenizer: Any,
    config: TrainConfig,
    target: Path,
    *,
    source: Mapping[str, Any],
    reference_dir: Path | None = None,
) -> None:
    """Write the model in colbertkit's layout (and optionally the reference layout)."""
    from colbertkit.checkpoint.build import save_checkpoint
    from colbertkit.checkpoint.files import atomic_directory
    from colbertkit.checkpoint.layouts import HEAD_PICKLE, quiet_transformers
    from colbertkit.checkpoint.tensors import write_reference_head

    accelerator.wait_for_everyone()
    colbert = _consolidated_colbert(accelerator, model)
    if colbert is not None:
        save_checkpoint(
            colbert,
            tokenizer,
            target,
            query_max_len=config.query_max_len,
            passage_max_len=config.passage_max_len,
            source=dict(source),
            overwrite=True,
        )
        if reference_dir is not None:
            with atomic_directory(reference_dir) as tmp, quiet_transformers():
                colbert.encoder.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                write_reference_head(colbert.head.state_dict(), tmp / HEAD_PICKLE)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


class _Evaluator:
    """Rerank each held-out query's ``pos + neg`` and average MRR@10, NDCG@10, Recall@k.

    Scoring is the scorer's (:class:`colbertkit.scorer.PairScorer`: the same encode path and
    MaxSim as ``colbertkit score``). Rows are split across processes and the sums all-reduced.
    Under FSDP every process must run the same forwards (each one is a collective), so there
    every process scores every row through the wrapped module.
    """

    def __init__(
        self,
        rows: Sequence[Any],
        tokenizer: Any,
        config: TrainConfig,
        accelerator: Any,
        multiple_of: int,
    ) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.config = config
        self.tokenizer = tokenizer
        self.multiple_of = multiple_of
        self.sharded_model = accelerator.distributed_type == DistributedType.FSDP
        self.rows = (
            rows
            if self.sharded_model
            else rows[accelerator.process_index :: accelerator.num_processes]
        )
        self.dtype, self.dtype_reason = self._eval_precision()

    def _eval_precision(self) -> tuple[str | None, str]:
        """The precision evaluation autocasts to (None: the training's own), and why.

        ``eval_dtype`` applies to fp32 training; under mixed precision the model is evaluated in
        it (its forward autocasts, and FSDP gathers 16-bit parameters).
        """
        from colbertkit.precision import resolve_dtype

        asked = self.config.eval_dtype
        training = self.accelerator.mixed_precision
        if asked is None:
            return None, "the training's precision"
        if training != "no":
            if asked not in ("auto", training):
                raise UsageError(
                    f"eval_dtype {asked}: evaluation runs in the training's mixed precision "
                    f"({training}); set eval_dtype to null or {training}"
                )
            return None, "the training's precision"
        return resolve_dtype(asked, self.accelerator.device)

    def describe(self) -> str:
        """``bf16, AMX``: what evaluation runs in."""
        from colbertkit.precision import describe_dtype

        if self.dtype is None:
            precision = self.accelerator.mixed_precision
            return "fp32" if precision == "no" else f"{precision} autocast (mixed_precision)"
        return describe_dtype(str(self.config.eval_dtype), self.dtype, self.dtype_reason)

    def _autocast(self) -> Any:
        if self.dtype is None:
            return self.accelerator.autocast()
        if self.dtype == "fp32":
            return nullcontext()
        from colbertkit.precision import torch_dtype

        return torch.autocast(self.accelerator.device.type, dtype=torch_dtype(self.dtype))

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        from colbertkit.metrics import ranking_metrics
        from colbertkit.scorer import PairScorer

        module = model if self.sharded_model else self.accelerator.unwrap_model(model)
        colbert = self.accelerator.unwrap_model(model).colbert
        was_training = module.training
        module.eval()
        scorer = PairScorer(
            colbert,
            self.tokenizer,
            query_max_len=self.config.query_max_len,
            passage_max_len=self.config.passage_max_len,
            batch_size=self.config.eval_batch_size,
            encode=lambda input_ids, attention_mask: module([(input_ids, attention_mask)])[0],
        )
        scorer.length_multiple = self.multiple_of
        pairs = [(row.query, passage) for row in self.rows for passage in (*row.pos, *row.neg)]
        names = self.config.metric_names()
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        with self._autocast():
            scores = iter(scorer.score(pairs))
            for row in self.rows:
                relevance = [True] * len(row.pos) + [False] * len(row.neg)
                row_scores = [next(scores) for _ in relevance]
                metrics = ranking_metrics(row_scores, relevance, self.config.recall_at)
                sums[:-1] += torch.tensor([metrics[name] for name in names], dtype=torch.float64)
                sums[-1] += 1
        if was_training:
            module.train()
        if not self.sharded_model:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        count = max(float(sums[-1]), 1.0)
        return {name: float(sums[i]) / count for i, name in enumerate(names)}


# --------------------------------------------------------------------------------------------
# Console output (main process only)
# --------------------------------------------------------------------------------------------


class _Console:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def print(self, text: str) -> None:
        if self.enabled:
            print(f"colbertkit: {text}", file=sys.stderr, flush=True)
