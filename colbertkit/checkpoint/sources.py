"""What a checkpoint argument is, opened as tensors: the one reader behind every command.

:func:`open_checkpoint` accepts every form a user may point at and says which it was:

* a training run directory (meaning its final ``model/``), its ``best/``, its ``model/``;
* a training checkpoint ``checkpoints/step-N`` (``model.safetensors``, ``pytorch_model.bin``,
  an FSDP full ``pytorch_model_fsdp.bin`` or a sharded ``pytorch_model_fsdp_0/``);
* a model directory in colbertkit's layout, the reference / BGE-M3 layout, or a bare encoder;
* a packaged model name or a hub id (see :func:`colbertkit.checkpoint.layouts.resolve_checkpoint`).

The result, a :class:`CheckpointSource`, lists the encoder's tensors without reading them (the
head is read: it is small), with the directory its config and tokenizer come from. ``score``,
``train``, ``export`` and evaluation all build their model from it
(:func:`colbertkit.checkpoint.build.build_colbert`); ``export`` streams its tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colbertkit import defaults
from colbertkit.checkpoint.layouts import (
    CONFIG_JSON,
    HEAD_PICKLE,
    HEAD_SAFETENSORS,
    METADATA_FILE,
    TOKENIZER_FILES,
    Semantics,
    detect_layout,
    read_config,
    resolve_checkpoint,
    tokenizer_files,
)
from colbertkit.checkpoint.run import (
    BEST_MODEL_DIR,
    CHECKPOINTS_DIR,
    FINAL_MODEL_DIR,
    TRAINER_STATE_FILE,
    TRAINING_BASE_DIR,
    TRAINING_SHARDED_DIR,
    TRAINING_WEIGHTS,
    is_run_directory,
    is_training_checkpoint,
    list_checkpoints,
    read_trainer_state,
    run_of,
)
from colbertkit.checkpoint.sharded import DcpCheckpoint
from colbertkit.checkpoint.tensors import (
    TensorEntry,
    check_head,
    file_size,
    load_head_state,
    read_weights,
)
from colbertkit.errors import CheckpointError, UsageError, first_line

# Entries a checkpoint may hold that are not part of a ColBERT model, and why.
_KNOWN_LEFT_OUT = {
    "sparse_linear.pt": "BGE-M3's sparse head",
    "colbert_linear.pt": "a second head",
    "optimizer.bin": "training state",
    "scheduler.bin": "training state",
    TRAINER_STATE_FILE: "training state",
}


@dataclass
class CheckpointSource:
    """A checkpoint opened for reading: its tensors (not yet read), head, config and facts."""

    path: Path  # the directory the weights are read from
    kind: str  # "colbertkit" | "reference" | "encoder" | "training"
    form: str  # what the user pointed at, in words ("the final model of run runs/x", ...)
    config_dir: Path  # config.json and tokenizer files come from here
    encoder: list[TensorEntry]
    head: dict[str, torch.Tensor] | None  # {"weight": (D, H), "bias": (D,)}; None: no head
    weight_files: list[Path]  # what was read, for checksums and sizes
    query_max_len: int
    passage_max_len: int
    semantics: Semantics
    trust_remote_code: bool = False
    description: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the training step
    notes: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # entries not part of the model, described

    @property
    def colbert_dim(self) -> int:
        return int(self.require_head()["weight"].shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.require_head()["weight"].shape[1])

    @property
    def weight_bytes(self) -> int:
        return sum(file_size(path) for path in self.weight_files)

    def require_head(self) -> dict[str, torch.Tensor]:
        if self.head is None:
            raise CheckpointError(
                f"{self.path} has no ColBERT head ({HEAD_PICKLE} or {HEAD_SAFETENSORS}): it is "
                "a bare encoder; train it (colbertkit train) or attach a new head with "
                "`fresh_head=True`"
            )
        return self.head

    def release(self) -> None:
        """Drop memory maps kept open by reading (their pages count as resident memory)."""
        for release in {id(e.release): e.release for e in self.encoder if e.release}.values():
            release()


def open_checkpoint(
    spec: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> CheckpointSource:
    """Find what ``spec`` is and list its tensors without reading them (see the module doc).

    ``base_model`` gives a training checkpoint its config and tokenizer when neither the
    checkpoint's ``base/`` nor the run's base model can be found.
    """
    path = resolve_checkpoint(spec)
    if is_training_checkpoint(path):
        return _training_source(path, base_model, trust_remote_code)
    if is_run_directory(path) and not (path / CONFIG_JSON).is_file():
        final = path / FINAL_MODEL_DIR
        if not (final / CONFIG_JSON).is_file():
            newest = list_checkpoints(path)
            hint = (
                f"pass its newest checkpoint {newest[-1]}"
                if newest
                else "it saved no checkpoint either"
            )
            raise CheckpointError(
                f"{path} is a training run without a final model/ (still running or "
                f"interrupted); {hint}, or continue it with colbertkit train --resume {path}"
            )
        source = _model_source(final, trust_remote_code)
        source.form = f"the final model of training run {path}"
        return source
    source = _model_source(path, trust_remote_code)
    run = run_of(path)
    if run is not None and path.name == BEST_MODEL_DIR:
        step = source.details.get("step")
        source.form = f"the best model of training run {run}" + (
            f" (step {step})" if step is not None else ""
        )
    elif run is not None and path.name == FINAL_MODEL_DIR:
        source.form = f"the final model of training run {run}"
    return source


def _model_source(path: Path, trust_remote_code: bool) -> CheckpointSource:
    """A model directory: colbertkit's layout, the reference's, or a bare encoder."""
    if not (path / CONFIG_JSON).is_file() and (path.parent.name == CHECKPOINTS_DIR):
        raise CheckpointError(
            f"{path} is an incomplete training checkpoint (no {TRAINER_STATE_FILE}: its save "
            "was interrupted); use an earlier checkpoints/step-N"
        )
    layout = detect_layout(path)
    head = (
        check_head(load_head_state(layout.head_file), layout.head_file)
        if layout.head_file is not None
        else None
    )
    encoder, encoder_files = read_weights(layout.encoder_weights)
    metadata = layout.metadata
    source = CheckpointSource(
        path=path,
        kind=layout.kind,
        form=f"{'an' if layout.kind[0] in 'aeiou' else 'a'} {layout.kind} model directory",
        config_dir=path,
        encoder=encoder,
        head=head,
        weight_files=[*encoder_files, *([layout.head_file] if layout.head_file else [])],
        query_max_len=metadata.query_max_len if metadata else defaults.QUERY_MAX_LEN,
        passage_max_len=metadata.passage_max_len if metadata else defaults.PASSAGE_MAX_LEN,
        semantics=metadata.semantics if metadata else Semantics(),
        trust_remote_code=trust_remote_code,
        description=layout.describe(),
        # best/ records the step it was kept at; export passes it on.
        details={"step": metadata.source.get("step")} if metadata else {},
    )
    used = {CONFIG_JSON, METADATA_FILE, layout.encoder_weights.name}
    if layout.head_file is not None:
        used.add(layout.head_file.name)
    used |= {file.name for file in encoder_files} | tokenizer_files(path).keys()
    _note_left_out(source, path, used)
    if head is not None:
        _check_config(source)
    return source


def _training_source(
    path: Path, base_model: str | os.PathLike[str] | None, trust_remote_code: bool
) -> CheckpointSource:
    """A ``checkpoints/step-N`` directory written by colbertkit's training engine."""
    try:
        state = read_trainer_state(path)
    except UsageError as error:
        raise CheckpointError(str(error)) from error
    config = dict(state.get("config") or {})
    step = state["progress"].get("step")
    facts = dict(state.get("model") or {})  # newer engines: dims, lengths, prefix

    sharded = path / TRAINING_SHARDED_DIR
    weights_file = next((path / n for n in TRAINING_WEIGHTS if (path / n).is_file()), None)
    if weights_file is not None:
        entries, files = read_weights(weights_file)
        what = weights_file.name
    elif (sharded / ".metadata").is_file():
        reader = DcpCheckpoint(sharded)
        entries, files = reader.entries(), reader.files()
        what = f"{TRAINING_SHARDED_DIR}/ (FSDP sharded, {len(reader.data_files())} shard files)"
    elif list(path.glob("pytorch_model_fsdp*_rank*.bin")):
        raise CheckpointError(
            f"{path} holds per-rank FSDP state (LOCAL_STATE_DICT or use_dcp=False), which cannot "
            "be consolidated; save with fsdp_state_dict_type SHARDED_STATE_DICT or FULL_STATE_DICT"
        )
    else:
        raise CheckpointError(
            f"{path} has {TRAINER_STATE_FILE} but no model weights (expected one of "
            f"{', '.join(TRAINING_WEIGHTS)} or {TRAINING_SHARDED_DIR}/); the checkpoint is "
            "incomplete"
        )

    encoder, head_entries, ignored = _split_colbert_state(entries, path)
    head = check_head({key: entry.read().clone() for key, entry in head_entries.items()}, path)
    for key, actual in (
        ("colbert_dim", head["weight"].shape[0]),
        ("hidden_size", head["weight"].shape[1]),
    ):
        if facts.get(key) not in (None, actual):
            raise CheckpointError(
                f"{path}: {TRAINER_STATE_FILE} says {key} {facts[key]} but the saved head has "
                f"{actual}; the checkpoint is inconsistent"
            )
    config_dir, origin = _training_config_dir(path, config.get("model"), base_model)
    run = run_of(path)

    def length(name: str, default: int) -> int:
        return int(facts.get(name) or config.get(name) or default)

    source = CheckpointSource(
        path=path,
        kind="training",
        form=f"training checkpoint step {step}" + (f" of run {run}" if run else ""),
        config_dir=config_dir,
        encoder=encoder,
        head=head,
        weight_files=files,
        query_max_len=length("query_max_len", defaults.QUERY_MAX_LEN),
        passage_max_len=length("passage_max_len", defaults.PASSAGE_MAX_LEN),
        semantics=Semantics(),
        trust_remote_code=trust_remote_code or bool(config.get("trust_remote_code")),
        description=f"training checkpoint (step {step}, {what}) at {path}",
        details={"step": step, "base_model": config.get("model")},
    )
    source.notes.append(f"config and tokenizer from {origin}")
    if ignored:
        source.left_out.append(f"tensors outside the ColBERT model: {', '.join(ignored)}")
    used = {TRAINING_SHARDED_DIR, TRAINING_BASE_DIR, *(file.name for file in files)}
    _note_left_out(source, path, used)
    _check_config(source)
    return source


def _training_config_dir(
    checkpoint: Path, run_model: str | None, base_model: str | os.PathLike[str] | None
) -> tuple[Path, str]:
    """Where a training checkpoint's config.json and tokenizer come from.

    In order: ``--base-model``; the checkpoint's own ``base/`` (written by newer engines); the
    model the run started from (``trainer_state.json``); the run's final model, which has the
    same config and tokenizer.
    """
    if base_model is not None:
        path = resolve_checkpoint(base_model)
        if not (path / CONFIG_JSON).is_file():
            raise CheckpointError(f"--base-model {base_model}: {path} has no config.json")
        return path, f"--base-model {path}"
    own = checkpoint / TRAINING_BASE_DIR
    if (own / CONFIG_JSON).is_file() and tokenizer_files(own):
        return own, f"the checkpoint's {TRAINING_BASE_DIR}/"
    tried = []
    if run_model:
        try:
            path = resolve_checkpoint(run_model)
            if (path / CONFIG_JSON).is_file():
                return path, f"the run's base model {path}"
        except CheckpointError as error:
            tried.append(f"the run's base model ({first_line(error)[:120]})")
    # checkpoints/step-N -> the run's final model, which has the same config and tokenizer.
    run = run_of(checkpoint)
    final = run / FINAL_MODEL_DIR if run is not None else None
    if final is not None and (final / CONFIG_JSON).is_file():
        return final, f"the run's final model {final}"
    raise CheckpointError(
        f"{checkpoint}: a training checkpoint holds no config.json or tokenizer and "
        f"{'; '.join(tried) or 'its trainer_state.json names no base model'}; pass --base-model "
        "with the model the run started from"
    )


def _split_colbert_state(
    entries: list[TensorEntry], where: Path
) -> tuple[list[TensorEntry], dict[str, TensorEntry], list[str]]:
    """Training state dict names -> (encoder entries, head entries, ignored names).

    accelerate saves the wrapped module: ``colbert.encoder.*`` / ``colbert.head.*``, with a
    ``model.`` prefix in DCP checkpoints. The prefix is found, not assumed.
    """
    names = {entry.name for entry in entries}
    candidates = {
        name.removesuffix("head.weight") for name in names if name.endswith("head.weight")
    }
    prefixes = sorted(
        (p for p in candidates if any(name.startswith(p + "encoder.") for name in names)), key=len
    )
    if not prefixes:
        raise CheckpointError(
            f"{where}: no ColBERT head in the training state (expected '...head.weight' next to "
            "'...encoder.*' tensors)"
        )
    prefix = prefixes[0]
    encoder, head, ignored = [], {}, []
    for entry in entries:
        if entry.name.startswith(prefix + "encoder."):
            name = entry.name.removeprefix(prefix + "encoder.")
            encoder.append(
                TensorEntry(
                    name, entry.shape, entry.dtype, entry.read, entry.release, entry.read_mapped
                )
            )
        elif entry.name in (prefix + "head.weight", prefix + "head.bias"):
            head[entry.name.removeprefix(prefix + "head.")] = entry
        else:
            ignored.append(entry.name)
    return encoder, head, ignored


def _check_config(source: CheckpointSource) -> None:
    config = read_config(source.config_dir)
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and hidden != source.hidden_size:
        raise CheckpointError(
            f"{source.path}: head input size {source.hidden_size} does not match the encoder's "
            f"hidden size {hidden} (config from {source.config_dir})"
        )
    if not tokenizer_files(source.config_dir):
        raise CheckpointError(
            f"{source.config_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "copy the base model's tokenizer files into it"
        )


def _note_left_out(source: CheckpointSource, path: Path, used: set[str]) -> None:
    left = sorted(
        p.name for p in path.iterdir() if p.name not in used and not p.name.startswith(".")
    )
    if not left:
        return
    described = []
    for name in left:
        reason = _KNOWN_LEFT_OUT.get(name)
        if reason is None and name.startswith("random_states"):
            reason = "training state"
        if reason is None and name.startswith("optimizer"):
            reason = "training state"
        described.append(
            f"{name}{'/' if (path / name).is_dir() else ''}" + (f" ({reason})" if reason else "")
        )
    source.left_out.extend(described)
