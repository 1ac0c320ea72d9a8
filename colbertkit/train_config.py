"""The training configuration: one pydantic model, every setting of :func:`colbertkit.train`.

``TrainConfig`` rejects unknown keys (naming the nearest valid one), keeps per-field
constraints in ``Field``s and cross-field rules in validators whose messages say what to
change. The launcher's YAML profile wraps it and adds a ``distributed:`` section; nothing here
depends on the machine it is validated on (device checks such as "fp16 needs a GPU" happen
when training starts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from colbertkit import defaults
from colbertkit.errors import UsageError, describe_validation_error, unknown_key_hint
from colbertkit.metrics import metric_names

# Names users bring from the reference scripts and Hugging Face's Trainer.
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "warmup_ratio": "warmup_proportion",
    "model_name_or_path": "model",
    "train_dataset": "dataset",
    "max_steps_per_epoch": "max_steps",
    "save_total_limit": "num_max_checkpoints",
    "fp16": "mixed_precision",
    "bf16": "mixed_precision",
    "report_to": "log_with",
}

# Settings that may differ between a run and its resumption without changing the result.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume_from",
        "progress_bar",
        "logging_steps",
        "log_with",
        "tracker_project",
        "run_name",
        "save_steps",
        "save_each_epoch",
        "num_max_checkpoints",
        "save_reference_layout",
        "eval_dataset",
        "eval_steps",
        "eval_each_epoch",
        "eval_at_start",
        "eval_batch_size",
        "eval_dtype",
        "recall_at",
        "best_metric",
        "expected_num_processes",
        "validate_data",
    }
)


class TrainConfig(BaseModel):
    """Everything one training run needs. Lengths are in tokens, batch sizes in queries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- what to train on what ----------------------------------------------------------------
    model: str = Field(
        description="Checkpoint to start from: a directory (any layout), a packaged model name "
        "or a hub id."
    )
    dataset: Path = Field(description='Training jsonl: {"query", "pos": [...], "neg": [...]}.')
    output_dir: Path = Field(description="Where checkpoints, metrics and the final model go.")
    eval_dataset: Path | None = Field(
        default=None, description="Held-out jsonl in the same format; each query reranks pos + neg."
    )
    fresh_head: bool = Field(
        default=False,
        description="Attach a new ColBERT head even if the checkpoint has one. A checkpoint "
        "without a head (a plain encoder) always gets a fresh one.",
    )
    colbert_dim: int | None = Field(
        default=None,
        gt=0,
        description=f"Size of a fresh head (default {defaults.FRESH_COLBERT_DIM}); a check "
        "otherwise.",
    )
    trust_remote_code: bool = False

    # -- examples -----------------------------------------------------------------------------
    query_max_len: int = Field(default=defaults.QUERY_MAX_LEN, ge=2, le=8192)
    passage_max_len: int = Field(default=defaults.PASSAGE_MAX_LEN, ge=2, le=8192)
    neg_nums: int = Field(default=15, ge=0, description="Hard negatives per example.")
    negatives_sampling: Literal["per_epoch", "once"] = Field(
        default="per_epoch",
        description="Draw each example's negatives anew every epoch (seeded), or once for the "
        "whole run like the reference.",
    )

    # -- loss -----------------------------------------------------------------------------------
    loss: Literal["contrastive", "kl", "contrastive+kl"] = Field(
        default="contrastive",
        description="contrastive: the reference's cross-entropy against the batch's negatives; "
        "kl: distil the teacher scores of the data (pos_scores / neg_scores); contrastive+kl: "
        "their sum, the KL weighted by distill_weight.",
    )
    distill_weight: float | None = Field(
        default=None,
        gt=0,
        description="Weight of the KL term in loss contrastive+kl (null: 1).",
    )
    teacher_temperature: float | None = Field(
        default=None,
        gt=0,
        description="The teacher's scores are divided by this before their softmax, as the "
        "student's MaxSim is by temperature (null: temperature, for scores on MaxSim's scale "
        "such as 0..1; cross-encoder logits want about 1).",
    )
    temperature: float = Field(default=0.02, gt=0)
    other_positives_as_negatives: bool = Field(
        default=False,
        description="Also use the other queries' positives in the batch as negatives "
        "(the reference does not).",
    )
    gather_across_processes: bool = Field(
        default=False,
        description="Gather passages from all processes so every query sees the negatives of "
        "the whole global batch (gradients flow back to every process).",
    )
    grad_cache: bool = Field(
        default=False,
        description="Gradient caching: the loss of the whole batch at the memory of one "
        "encode_chunk_size chunk (about 1.3x the compute).",
    )

    # -- optimisation ---------------------------------------------------------------------------
    batch_size: int = Field(default=4, ge=1, description="Queries per process per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    lr: float = Field(default=2e-5, gt=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_proportion: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        default="no",
        description="Autocast the forward in 16 bits (weights and optimizer stay fp32); auto: "
        "bf16 where the hardware computes it natively (CUDA, AMX / AVX512-BF16 CPUs), fp16 on "
        "Volta and Turing GPUs, else no.",
    )
    gradient_checkpointing: bool = False
    train_head_only: bool = Field(
        default=False, description="Freeze the encoder; train the ColBERT head only."
    )
    head_warmup_steps: int = Field(
        default=0,
        ge=0,
        description="For the first N optimizer steps only the ColBERT head trains; the encoder "
        "starts after them (a fresh head's random gradients never reach it).",
    )
    encoder_lr: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Learning rate of the encoder (null: lr); lr is then the head's.",
    )
    seed: int = Field(default=42, ge=0)

    # -- speed ----------------------------------------------------------------------------------
    encode_chunk_size: int | None = Field(
        default=8,
        ge=1,
        description="Encode sequences in length-sorted chunks of this many, each padded to its "
        "own longest (less padding work); null encodes a whole batch at once.",
    )
    pad_to_multiple_of: int | None = Field(
        default=None,
        ge=1,
        description="Pad lengths to a multiple of this (default: 8 on GPU, 1 on CPU).",
    )

    # -- checkpoints ----------------------------------------------------------------------------
    save_steps: int | None = Field(default=None, ge=1, description="Checkpoint every N steps.")
    save_each_epoch: bool = True
    num_max_checkpoints: int | None = Field(
        default=3, ge=1, description="Keep at most this many training checkpoints (null: all)."
    )
    save_reference_layout: bool = Field(
        default=False,
        description="Also write the final model in the reference layout (colbert_linear.pt).",
    )
    resume_from: str | None = Field(
        default=None, description="'latest' (newest checkpoint in output_dir) or a checkpoint path."
    )

    # -- evaluation -----------------------------------------------------------------------------
    eval_steps: int | None = Field(default=None, ge=1)
    eval_each_epoch: bool = True
    eval_at_start: bool = False
    eval_batch_size: int = Field(default=32, ge=1, description="Sequences per eval forward.")
    eval_dtype: Literal["auto", "fp32", "fp16", "bf16"] | None = Field(
        default=None,
        description="Precision of evaluation when training runs in fp32 (auto: bf16 where the "
        "hardware has it); null: the training's mixed precision. Under mixed precision, "
        "evaluation runs in it.",
    )
    recall_at: list[int] = Field(default_factory=lambda: [5, 10], min_length=1)
    best_metric: str | None = Field(
        default="mrr@10",
        description="Keep the model that is best by this eval metric in output_dir/best "
        "(null: do not keep one).",
    )

    # -- logging --------------------------------------------------------------------------------
    log_with: Literal["none", "wandb", "tensorboard"] = "none"
    tracker_project: str = "colbertkit"
    run_name: str | None = None
    logging_steps: int = Field(default=10, ge=1)
    progress_bar: bool = True

    validate_data: bool = Field(
        default=True,
        description="Run the validate-data checks before training; colbertkit train does it "
        "once in the launcher and turns it off for its workers.",
    )

    # -- distribution ---------------------------------------------------------------------------
    expected_num_processes: int | None = Field(
        default=None,
        ge=1,
        description="Fail unless the run really has this many processes (catches launches that "
        "silently start independent single-process trainings).",
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    nearest = unknown_key_hint(str(key), known, FAMILIAR_NAMES)
                    hint = (
                        f"did you mean '{nearest}'?"
                        if nearest
                        else "the settings are listed in colbertkit.TrainConfig"
                    )
                    raise ValueError(f"unknown setting '{key}' ({hint})")
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.neg_nums == 0 and self.loss != "contrastive":
            raise ValueError(
                f"loss {self.loss} needs neg_nums >= 1: the teacher ranks each query's positive "
                "and neg_nums other passages; set neg_nums, e.g. 15"
            )
        if self.neg_nums == 0 and not self.other_positives_as_negatives:
            raise ValueError(
                "neg_nums 0 leaves only the positive in each query's logits (a zero loss); "
                "set neg_nums >= 1 or other_positives_as_negatives: true"
            )
        if self.distill_weight is not None and self.loss != "contrastive+kl":
            raise ValueError(
                f"distill_weight weighs the KL term of loss contrastive+kl, not of {self.loss}; "
                "set loss: contrastive+kl or drop distill_weight"
            )
        if self.teacher_temperature is not None and self.loss == "contrastive":
            raise ValueError(
                "teacher_temperature applies to teacher scores, which loss contrastive ignores; "
                "set loss: kl or contrastive+kl, or drop teacher_temperature"
            )
        if self.train_head_only and (self.head_warmup_steps or self.encoder_lr is not None):
            setting = "head_warmup_steps" if self.head_warmup_steps else "encoder_lr"
            raise ValueError(
                f"{setting} is meaningless with train_head_only (the encoder never trains); "
                f"drop {setting} or train_head_only"
            )
        if self.max_steps is not None and self.head_warmup_steps >= self.max_steps:
            raise ValueError(
                f"head_warmup_steps {self.head_warmup_steps} >= max_steps {self.max_steps}: the "
                "encoder would never train; lower head_warmup_steps or use train_head_only"
            )
        if self.grad_cache and self.encode_chunk_size is None:
            raise ValueError(
                "grad_cache needs encode_chunk_size (the sequences encoded at a time); "
                "set encode_chunk_size, e.g. 8"
            )
        if self.train_head_only and self.gradient_checkpointing:
            raise ValueError(
                "gradient_checkpointing saves nothing with train_head_only (the encoder gets no "
                "gradients); turn gradient_checkpointing off"
            )
        if self.eval_dataset is None and self.eval_steps is not None:
            raise ValueError(
                "eval_steps is set but eval_dataset is not; set eval_dataset or drop eval_steps"
            )
        if self.recall_at and min(self.recall_at) < 1:
            raise ValueError("recall_at values must be at least 1, e.g. [5, 10]")
        if self.best_metric is not None and self.best_metric not in self.metric_names():
            raise ValueError(
                f"best_metric '{self.best_metric}' is not computed; choose one of "
                f"{', '.join(self.metric_names())} (recall@k needs k in recall_at)"
            )
        if self.resume_from is not None and not self.resume_from.strip():
            raise ValueError("resume_from is empty; use 'latest' or a checkpoint directory")
        return self

    @property
    def kl_weight(self) -> float:
        """The KL term's weight in the loss (0 for contrastive alone)."""
        if self.loss == "contrastive":
            return 0.0
        return (self.distill_weight or 1.0) if self.loss == "contrastive+kl" else 1.0

    @property
    def teacher_softmax_temperature(self) -> float:
        """The teacher's temperature in force (``teacher_temperature`` or ``temperature``)."""
        return self.teacher_temperature or self.temperature

    @property
    def distils(self) -> bool:
        """Whether the loss learns from teacher scores (kl or contrastive+kl)."""
        return self.loss != "contrastive"

    def metric_names(self) -> list[str]:
        """The eval metrics this configuration computes, in log order."""
        return metric_names(self.recall_at)


def load_train_config(settings: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from a mapping, with errors turned into one readable UsageError.

    Each problem is reported as ``setting: message``, e.g.
    ``invalid training configuration: lr: Input should be greater than 0``.
    """
    if isinstance(settings, TrainConfig):
        return settings
    try:
        return TrainConfig.model_validate(dict(settings))
    except ValidationError as error:
        raise UsageError(
            f"invalid training configuration: {describe_validation_error(error)}"
        ) from None


def resume_conflicts(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """Settings of ``config`` that differ from the ``saved`` settings of the run being resumed
    and would change its result (``"lr: 2e-05 -> 1e-05"``); empty when resuming is sound."""
    current = config.model_dump(mode="json")
    fields = TrainConfig.model_fields

    def saved_value(key: str) -> Any:
        # A setting added after the run was written has its default there.
        return saved.get(key, fields[key].get_default(call_default_factory=True))

    def same(key: str) -> bool:
        ours, theirs = current[key], saved_value(key)
        if key in PATH_SETTINGS and ours and theirs and Path(ours).exists():
            # runs/x and /home/me/runs/x are the same file (profile.yaml stores absolute paths)
            return os.path.abspath(ours) == os.path.abspath(theirs)
        return ours == theirs

    return [
        f"{key}: {saved_value(key)!r} -> {current[key]!r}"
        for key in sorted(current)
        if key not in RESUMABLE_CHANGES and not same(key)
    ]


# Settings that name files: equal when they name the same file.
PATH_SETTINGS = frozenset({"model", "dataset", "eval_dataset", "output_dir"})
