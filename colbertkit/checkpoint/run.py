"""The training run directory: its names, its checkpoints, and who may replace it.

::

    RUN/
      .colbertkit-run          marker: colbertkit created this directory (JSON)
      profile.yaml             the resolved profile (colbertkit train); read back by --resume
      accelerate_config.yaml   launch_profile.json      what the launcher started
      train_config.json        settings, plan and versions of the run (the engine)
      metrics.jsonl            logs/  wandb/
      checkpoints/step-00000400/   full training state (see :func:`save_training_state`)
      best/  model/  model-reference/   models in colbertkit's (or the reference) layout

Every name is defined here once. A directory is recognised as a run by its marker (or, for runs
of older versions, by ``train_config.json`` next to ``model/`` or ``checkpoints/``);
``--overwrite`` replaces only a directory that holds nothing but these entries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from colbertkit import __version__
from colbertkit.checkpoint.files import (
    atomic_write_text,
    check_replaceable,
    follow_umask,
    names_of,
    remove_stale_siblings,
    replace_directory,
)
from colbertkit.errors import UsageError

RUN_MARKER = ".colbertkit-run"
PROFILE_FILE = "profile.yaml"
ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
LAUNCH_CONFIG_FILE = "launch_profile.json"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
WANDB_DIR = "wandb"
CHECKPOINTS_DIR = "checkpoints"
FINAL_MODEL_DIR = "model"
BEST_MODEL_DIR = "best"
REFERENCE_MODEL_DIR = "model-reference"
RUN_ENTRIES = frozenset(
    {
        RUN_MARKER,
        PROFILE_FILE,
        ACCELERATE_CONFIG_FILE,
        LAUNCH_CONFIG_FILE,
        CONFIG_FILE,
        METRICS_FILE,
        LOGS_DIR,
        WANDB_DIR,
        CHECKPOINTS_DIR,
        FINAL_MODEL_DIR,
        BEST_MODEL_DIR,
        REFERENCE_MODEL_DIR,
    }
)

# Inside checkpoints/step-N: accelerate's save_state plus two entries of ours.
TRAINER_STATE_FILE = "trainer_state.json"  # written last: marks a complete checkpoint
TRAINING_BASE_DIR = "base"  # config.json + tokenizer of the encoder
TRAINING_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp.bin")
TRAINING_SHARDED_DIR = "pytorch_model_fsdp_0"
STATE_DICT_PREFIX = "colbert."  # the trained module's names: colbert.encoder.*, colbert.head.*
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------------------------
# Recognising runs
# --------------------------------------------------------------------------------------------


def is_run_directory(path: Path) -> bool:
    """A directory colbertkit train created (marker), or a run of an older version."""
    path = Path(path)
    if (path / RUN_MARKER).is_file():
        return True
    return (path / CONFIG_FILE).is_file() and (
        (path / FINAL_MODEL_DIR).is_dir() or (path / CHECKPOINTS_DIR).is_dir()
    )


def is_training_checkpoint(path: Path) -> bool:
    return (Path(path) / TRAINER_STATE_FILE).is_file()


def run_of(path: Path) -> Path | None:
    """The run a path belongs to: the run itself, its ``model/``, ``best/`` or a checkpoint."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if is_run_directory(candidate) and (
            candidate == path
            or path.parent.name == CHECKPOINTS_DIR
            or path.name in (FINAL_MODEL_DIR, BEST_MODEL_DIR, REFERENCE_MODEL_DIR)
        ):
            return candidate
    return None


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds training results (a checkpoint or a final model)."""
    return bool(list_checkpoints(path)) or (Path(path) / FINAL_MODEL_DIR).exists()


# --------------------------------------------------------------------------------------------
# Creating and replacing
# --------------------------------------------------------------------------------------------


def check_run_directory(path: Path, *, overwrite: bool = False, resume: bool = False) -> str:
    """What a launch into ``path`` would do, or a UsageError if it must not.

    Returns ``"new"`` (missing or empty), ``"replace"`` (a run, with ``overwrite``) or
    ``"resume"``. A directory holding anything colbertkit did not write is refused even with
    ``overwrite``: only colbertkit's own files are ever removed.
    """
    path = Path(path)
    if resume:
        return "resume"
    check_replaceable(
        path,
        names_of(RUN_ENTRIES),
        what="a training run directory",
        fix="choose a new or empty --output-dir (output_dir)",
    )
    if not path.exists() or not any(path.iterdir()):
        return "new"
    if not holds_run(path) and not overwrite:
        return "new"  # only launch files of a run that never trained: written again
    if not overwrite:
        raise UsageError(
            f"{path} already holds a training run; continue it with --resume {path}, "
            "start afresh with --overwrite, or choose another --output-dir"
        )
    return "replace"


def prepare_run_directory(path: Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create (or, with ``overwrite``, replace) the run directory and mark it as colbertkit's."""
    path = Path(path)
    action = check_run_directory(path, overwrite=overwrite, resume=resume)
    if action == "resume":
        return path
    remove_stale_siblings(path)
    marker = json.dumps(
        {"format": "colbertkit.run", "created": time.time(), "colbertkit": __version__}
    )
    if action == "replace":
        # The new, empty run is made aside and swapped in: the target is always the old run or
        # the new one.
        fresh = path.parent / f".{path.name}.tmp-{os.getpid()}"
        fresh.mkdir()
        (fresh / RUN_MARKER).write_text(marker + "\n")
        follow_umask(fresh)
        replace_directory(path, fresh)
        return path
    path.mkdir(parents=True, exist_ok=True)
    follow_umask(path)
    if not (path / RUN_MARKER).is_file():
        atomic_write_text(path / RUN_MARKER, marker + "\n")
    return path


def write_json(path: Path, data: Any) -> None:
    """A JSON file of the run, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete training checkpoints of a run, oldest first (temporary directories excluded)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _CHECKPOINT_NAME.match(path.name)) and is_training_checkpoint(path)
    ]
    return [path for _, path in sorted(found)]


def rotate_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Remove all but the newest ``keep`` checkpoints (None: keep all)."""
    if keep is None:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume_checkpoint(run_dir: Path, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (refusing to clobber an old one).

    ``resume_from`` is ``"latest"`` (the newest complete checkpoint of ``run_dir``) or a
    checkpoint directory.
    """
    run_dir = Path(run_dir)
    if resume_from is None:
        if holds_run(run_dir):
            raise UsageError(
                f"{run_dir} already holds a training run; resume it with "
                "`resume_from='latest'` or choose an empty `output_dir`"
            )
        return None
    if resume_from == "latest":
        existing = list_checkpoints(run_dir)
        if not existing:
            raise UsageError(
                f"`resume_from='latest'` but {run_dir / CHECKPOINTS_DIR} holds no complete "
                "checkpoint (set save_steps to keep some); start without `resume_from` or point "
                "it at a checkpoint directory"
            )
        return existing[-1]
    path = Path(resume_from)
    if not is_training_checkpoint(path):
        raise UsageError(
            f"`resume_from`: {path} is not a training checkpoint (no {TRAINER_STATE_FILE}); "
            f"use 'latest' or a directory under {run_dir / CHECKPOINTS_DIR}"
        )
    return path


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint: progress, world size, config, model facts."""
    file = Path(checkpoint) / TRAINER_STATE_FILE
    try:
        state = json.loads(file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
            raise ValueError("no progress record")
    except (OSError, ValueError) as error:
        raise UsageError(f"{file}: unreadable ({error})") from error
    return state


def save_training_state(
    accelerator: Any,
    run_dir: Path,
    step: int,
    state: Mapping[str, Any],
    *,
    encoder_config: Any,
    tokenizer: Any,
    keep: int | None,
) -> Path:
    """Write the full training state to ``checkpoints/step-N``, atomically, then rotate.

    Layout (accelerate's ``save_state`` plus two of ours)::

        model.safetensors        the trained module: colbert.encoder.*, colbert.head.*
                                 (FSDP: accelerate's sharded pytorch_model_fsdp_0/ instead)
        optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (plain tensors, no code)
        trainer_state.json       ``state``: progress, world size, config, versions, model facts
        base/                    config.json + tokenizer files of the encoder, so a checkpoint
                                 can be loaded and exported without the base model

    Every process calls it (FSDP gathers state, each process writes its RNG state); the main
    process renames the finished temporary directory into place, so the newest ``step-N`` is
    always complete: a crash before the rename leaves only a ``.step-N.tmp`` that listing
    ignores and the next save removes.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = checkpoint_name(step)
    target, tmp = root / name, root / f".{name}.tmp"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if main:
            from colbertkit.checkpoint.layouts import quiet_transformers

            with quiet_transformers():
                encoder_config.save_pretrained(str(tmp / TRAINING_BASE_DIR))
                tokenizer.save_pretrained(str(tmp / TRAINING_BASE_DIR))
            # Written last: its presence marks a complete checkpoint (list_checkpoints).
            write_json(tmp / TRAINER_STATE_FILE, dict(state))
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if main:
        follow_umask(tmp)
        if target.exists():  # a resumed run saving the same step again
            shutil.rmtree(target)
        os.replace(tmp, target)
        rotate_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return target
