"""Export any ColBERT checkpoint to safetensors, then prove the export scores like its source.

Sources read (see :func:`open_source`):

* colbertkit's own layout (final models, ``best/``), written by :func:`save_checkpoint`;
* the reference / BGE-M3 layout: a Hugging Face encoder directory (``model.safetensors``,
  ``pytorch_model.bin`` or their sharded ``*.index.json`` form) plus ``colbert_linear.pt``.
  BGE-M3's other heads (``sparse_linear.pt``; the dense vector is the CLS state and has no
  weights of its own) are not part of a ColBERT model and are left out, with a note;
* colbertkit training checkpoints (``checkpoints/step-N``: accelerate's ``save_state`` plus
  ``trainer_state.json``): ``model.safetensors`` or ``pytorch_model.bin``, an FSDP full state
  dict ``pytorch_model_fsdp.bin``, or an FSDP sharded state dict ``pytorch_model_fsdp_0/``
  (torch.distributed.checkpoint), consolidated here. Optimizer, scheduler and RNG state are never
  opened. Config and tokenizer come from the model the run started from.

Outputs: colbertkit's layout (default) or the reference layout with a plain-tensor
``colbert_linear.pt``; the encoder always as one ``model.safetensors``.

Memory: tensors are streamed one at a time from source to output (read, convert, write, drop),
with plain file reads rather than memory maps, so the copy itself holds about one tensor; the
verification then loads one model at a time (source, freed, then export).

Nothing is unpickled with code execution: ``torch.load(weights_only=True)`` for ``.bin``/``.pt``
files, and a restricted unpickler for DCP's ``.metadata`` (which torch itself reads with a plain
``pickle.load``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import pickle
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colbertkit import __version__
from colbertkit.checkpoint import (
    HEAD_PICKLE,
    HEAD_SAFETENSORS,
    METADATA_FILE,
    CheckpointMetadata,
    Semantics,
    _first_line,
    _quiet_transformers,
    atomic_directory,
    detect_layout,
    load_head_state,
    resolve_checkpoint,
    write_reference_head,
)
from colbertkit.errors import CheckpointError, ColbertkitError, UsageError

FORMATS = ("colbertkit", "reference")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest allowed |score(source) - score(export)|. Scores are means of cosine similarities, in
# [-1, 1]. fp32 copies bits, so any difference is arithmetic noise; fp16/bf16 round every weight
# (relative error 2^-11 / 2^-8), which moves MiniLM's scores by about 2e-4 / 7e-4, while a wrong
# tensor moves them by tenths.
TOLERANCES = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
ENCODER_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"  # what marks a colbertkit training checkpoint
# accelerate's names for the model part of save_state (model_index 0).
TRAINING_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp.bin")
TRAINING_SHARDED_DIR = "pytorch_model_fsdp_0"
TRAINING_BASE_DIR = "base"  # config.json + tokenizer, in checkpoints of newer engines
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
)
_KNOWN_LEFT_OUT = {
    "sparse_linear.pt": "BGE-M3's sparse head",
    "colbert_linear.pt": "a second head",
    "optimizer.bin": "training state",
    "scheduler.bin": "training state",
    TRAINER_STATE_FILE: "training state",
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the limit the safetensors library applies
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}

# A fixed, varied set: short and long, matching and not, English and Chinese (BGE-M3), one
# passage longer than any passage_max_len so truncation is compared too.
SAMPLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("what is the capital of france", "paris is the capital and largest city of france"),
    ("what is the capital of france", "the cat eats fish by the river"),
    ("how do fish swim", "fish swim by moving their fins and tails through the water"),
    ("python code", "a python program is code that a computer can run"),
    ("who won the game", "the team played music before the game and the crowd sang " * 60),
    ("北京是中国的首都吗", "北京是中华人民共和国的首都,也是全国的政治和文化中心。"),
    ("机器学习", "the moon and the stars at night"),
    ("a", "b"),
)


class ExportError(ColbertkitError):
    """The export cannot be written as asked (e.g. a value does not fit the chosen dtype)."""


class VerificationError(ExportError):
    """The written export does not score like its source: nothing was placed."""


@dataclass
class ExportReport:
    """What :func:`export_model` did. Sizes in bytes, times in seconds."""

    source: Path
    source_kind: str  # "colbertkit" | "reference" | "training"
    description: str  # what was found, e.g. "training checkpoint (step 400, model.safetensors)"
    out: Path
    format: str
    dtype: str
    colbert_dim: int
    hidden_size: int
    tensors: int
    source_bytes: int  # weight files read (encoder + head), not optimizer state
    written_bytes: int  # every file of the export
    write_seconds: float
    verify_seconds: float = 0.0
    verified: bool = False
    pairs_checked: int = 0
    max_difference: float | None = None
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------


def export_model(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: str = "colbertkit",
    dtype: str = "fp32",
    force: bool = False,
    verify: bool = True,
    verify_pairs: str | os.PathLike[str] | Sequence[tuple[str, str]] | None = None,
    tolerance: float | None = None,
    base_model: str | os.PathLike[str] | None = None,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write ``source`` (any supported checkpoint) to ``out`` in safetensors, then verify it.

    ``format``: ``colbertkit`` (encoder ``model.safetensors``, ``colbert_linear.safetensors``,
    ``colbertkit.json``, config, tokenizer) or ``reference`` (the same encoder and a plain-tensor
    ``colbert_linear.pt``). ``dtype``: ``fp32``, ``fp16`` or ``bf16`` for floating tensors.

    ``out`` is written to a temporary sibling directory and renamed into place only after the
    verification passed; an existing ``out`` is replaced only with ``force``. Verification scores
    ``verify_pairs`` (a TSV path or ``(query, passage)`` pairs; default :data:`SAMPLE_PAIRS`) with
    the source and with the export, both in float32 on CPU (fp16/bf16 weights are upcast: fp16
    arithmetic does not run on CPU), and fails if the largest difference exceeds ``tolerance``
    (default :data:`TOLERANCES`). ``base_model`` gives a training checkpoint its config and
    tokenizer when the run's own base model cannot be found. ``progress(done, total)`` is told
    the bytes of tensors written; ``log(line)`` what was found and what is left out, before
    writing starts.
    """
    if format not in FORMATS:
        raise UsageError(f"--format {format}: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if tolerance is not None and not tolerance >= 0:
        raise UsageError(f"--tolerance {tolerance}: must be 0 or more")
    for flag, value in (("--query-max-len", query_max_len), ("--passage-max-len", passage_max_len)):
        if value is not None and value < 2:
            raise UsageError(f"{flag} {value}: must be at least 2 (CLS + one token)")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; choose another directory or pass --force")
    pairs = _verification_pairs(verify_pairs) if verify else []

    src = open_source(source, base_model=base_model, trust_remote_code=trust_remote_code)
    _check_not_nested(src.path, out)
    if log is not None:
        for line in (f"found {src.description}", *src.notes):
            log(line)
    if query_max_len is not None:
        src.query_max_len = query_max_len
    if passage_max_len is not None:
        src.passage_max_len = passage_max_len
    limit = TOLERANCES[dtype] if tolerance is None else tolerance

    start = time.perf_counter()
    with atomic_directory(out) as tmp:
        tensors = _write_export(src, tmp, format=format, dtype=dtype, progress=progress)
        src.release()
        write_seconds = time.perf_counter() - start
        report = ExportReport(
            source=src.path,
            source_kind=src.kind,
            description=src.description,
            out=out,
            format=format,
            dtype=dtype,
            colbert_dim=src.colbert_dim,
            hidden_size=src.hidden_size,
            tensors=tensors,
            source_bytes=src.weight_bytes,
            written_bytes=sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()),
            write_seconds=write_seconds,
            tolerance=limit if verify else None,
            notes=list(src.notes),
        )
        if verify:
            verify_start = time.perf_counter()
            difference, worst = _largest_difference(src, tmp, pairs)
            report.verify_seconds = time.perf_counter() - verify_start
            report.pairs_checked, report.max_difference = len(pairs), difference
            if not difference <= limit:  # also catches NaN
                query, passage = pairs[worst]
                raise VerificationError(
                    f"verification failed: the export's scores differ from the source's by up to "
                    f"{difference:.3g} (pair {worst + 1}: {query[:40]!r} / {passage[:40]!r}), "
                    f"over the {dtype} tolerance {limit:.3g}; nothing was written to {out} "
                    "(export in fp32, raise --tolerance, or skip with --no-verify)"
                )
            report.verified = True
        if out.exists() and not force:  # someone created it while we worked
            raise UsageError(f"{out} appeared while exporting; choose another directory or --force")
    return report


def _check_not_nested(source: Path, out: Path) -> None:
    source, target = source.resolve(), out.resolve()
    if source == target or source.is_relative_to(target):
        raise UsageError(
            f"{out} is (or contains) the source checkpoint {source}; export to another directory"
        )


def _verification_pairs(
    spec: str | os.PathLike[str] | Sequence[tuple[str, str]] | None,
) -> list[tuple[str, str]]:
    if spec is None:
        return list(SAMPLE_PAIRS)
    if isinstance(spec, (str, os.PathLike)):
        from colbertkit.pairs import open_pairs

        checked = open_pairs(spec)
        try:
            return [(pair.query, pair.passage) for pair in checked.pairs()]
        finally:
            checked.close()
    pairs = [(str(query), str(passage)) for query, passage in spec]
    if not pairs:
        raise UsageError("verify_pairs is empty; give at least one (query, passage) pair")
    return pairs


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a source, known by name, shape and dtype before its data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]  # the tensor on CPU (a fresh buffer or a memory map)
    release: Callable[[], None] | None = None  # drop what reading keeps open (a memory map)
    # The tensor as a view of a memory map, to keep (a model's parameter) without a copy.
    read_mapped: Callable[[], torch.Tensor] | None = None


@dataclass
class ExportSource:
    """A checkpoint opened for export: its tensors (not yet read), head, config and facts."""

    path: Path
    kind: str  # "colbertkit" | "reference" | "training"
    config_dir: Path  # config.json and tokenizer files come from here
    encoder: list[TensorEntry]
    head: dict[str, torch.Tensor]  # {"weight": (D, H), "bias": (D,)}
    weight_files: list[Path]  # what was read, for checksums and sizes
    query_max_len: int
    passage_max_len: int
    semantics: Semantics
    trust_remote_code: bool = False
    description: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the training step
    notes: list[str] = field(default_factory=list)

    @property
    def colbert_dim(self) -> int:
        return int(self.head["weight"].shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.head["weight"].shape[1])

    @property
    def weight_bytes(self) -> int:
        return sum(_size(path) for path in self.weight_files)

    def release(self) -> None:
        """Drop memory maps kept open by reading (their pages count as resident memory)."""
        for release in {id(e.release): e.release for e in self.encoder if e.release}.values():
            release()


def open_source(
    spec: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> ExportSource:
    """Find what ``spec`` is and list its tensors without reading them (heads are read: small)."""
    from colbertkit.checkpoint import DEFAULT_PASSAGE_MAX_LEN, DEFAULT_QUERY_MAX_LEN

    path = resolve_checkpoint(spec)
    if (path / TRAINER_STATE_FILE).is_file():
        return _training_source(path, base_model, trust_remote_code)
    layout = detect_layout(path)
    if layout.head_file is None:
        raise CheckpointError(
            f"{path} has no ColBERT head ({HEAD_PICKLE} or {HEAD_SAFETENSORS}): it is a bare "
            "encoder; train it (colbertkit train) or score it with --fresh-head instead"
        )
    head = _check_head(load_head_state(layout.head_file), layout.head_file)
    encoder, encoder_files = _read_weights(layout.encoder_weights)
    metadata = layout.metadata
    source = ExportSource(
        path=path,
        kind=layout.kind,
        config_dir=path,
        encoder=encoder,
        head=head,
        weight_files=[*encoder_files, layout.head_file],
        query_max_len=metadata.query_max_len if metadata else DEFAULT_QUERY_MAX_LEN,
        passage_max_len=metadata.passage_max_len if metadata else DEFAULT_PASSAGE_MAX_LEN,
        semantics=metadata.semantics if metadata else Semantics(),
        trust_remote_code=trust_remote_code,
        description=layout.describe(),
    )
    used = {"config.json", METADATA_FILE, layout.head_file.name, layout.encoder_weights.name}
    used |= {file.name for file in encoder_files} | _tokenizer_files(path).keys()
    _note_left_out(source, path, used)
    _check_config(source)
    return source


def _training_source(
    path: Path, base_model: str | os.PathLike[str] | None, trust_remote_code: bool
) -> ExportSource:
    """A ``checkpoints/step-N`` directory written by colbertkit's training engine."""
    try:
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
        config = dict(state.get("config") or {})
        step = (state.get("progress") or {}).get("step")
        facts = dict(state.get("model") or {})  # newer engines: dims, lengths, prefix
    except (ValueError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE}: unreadable ({error})") from error

    sharded = path / TRAINING_SHARDED_DIR
    weights_file = next((path / n for n in TRAINING_WEIGHTS if (path / n).is_file()), None)
    if weights_file is not None:
        entries, files = _read_weights(weights_file)
        what = weights_file.name
    elif (sharded / ".metadata").is_file():
        reader = _DcpCheckpoint(sharded)
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
    head = _check_head({key: entry.read().clone() for key, entry in head_entries.items()}, path)
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
    source = ExportSource(
        path=path,
        kind="training",
        config_dir=config_dir,
        encoder=encoder,
        head=head,
        weight_files=files,
        query_max_len=int(facts.get("query_max_len") or config.get("query_max_len") or 128),
        passage_max_len=int(facts.get("passage_max_len") or config.get("passage_max_len") or 512),
        semantics=Semantics(),
        trust_remote_code=trust_remote_code or bool(config.get("trust_remote_code")),
        description=f"training checkpoint (step {step}, {what}) at {path}",
        details={"step": step, "base_model": config.get("model")},
    )
    source.notes.append(f"config and tokenizer from {origin}")
    if ignored:
        source.notes.append(
            f"not exported: tensors outside the ColBERT model: {', '.join(ignored)}"
        )
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
        if not (path / "config.json").is_file():
            raise CheckpointError(f"--base-model {base_model}: {path} has no config.json")
        return path, f"--base-model {path}"
    own = checkpoint / TRAINING_BASE_DIR
    if (own / "config.json").is_file() and _tokenizer_files(own):
        return own, f"the checkpoint's {TRAINING_BASE_DIR}/"
    tried = []
    if run_model:
        try:
            path = resolve_checkpoint(run_model)
            if (path / "config.json").is_file():
                return path, f"the run's base model {path}"
        except CheckpointError as error:
            tried.append(f"the run's base model ({_first_line(error)[:120]})")
    # checkpoints/step-N -> the run's final model, which has the same config and tokenizer.
    final = checkpoint.parent.parent / "model"
    if checkpoint.parent.name == "checkpoints" and (final / "config.json").is_file():
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


def _check_head(state: dict[str, Any], where: Path) -> dict[str, torch.Tensor]:
    weight = state.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise CheckpointError(f"{where}: no 2-D head weight; not a Linear head")
    bias = state.get("bias")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise CheckpointError(f"{where}: head bias does not match its weight {tuple(weight.shape)}")
    return {key: value for key, value in (("weight", weight), ("bias", bias)) if value is not None}


def _check_config(source: ExportSource) -> None:
    config = _read_config(source.config_dir)
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and hidden != source.hidden_size:
        raise CheckpointError(
            f"{source.path}: head input size {source.hidden_size} does not match the encoder's "
            f"hidden size {hidden} (config from {source.config_dir})"
        )
    if not _tokenizer_files(source.config_dir):
        raise CheckpointError(
            f"{source.config_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "copy the base model's tokenizer files into it"
        )


def _note_left_out(source: ExportSource, path: Path, used: set[str]) -> None:
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
    source.notes.append("not exported: " + ", ".join(described))
    if (path / "sparse_linear.pt").exists():
        source.notes.append(
            "BGE-M3's sparse and dense outputs are not part of a ColBERT export; only "
            f"{HEAD_PICKLE} is kept"
        )


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory / 'config.json'}: unreadable ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / 'config.json'}: not a JSON object")
    return config


def _tokenizer_files(directory: Path) -> dict[str, Path]:
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


# --------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------


def _read_weights(file: Path) -> tuple[list[TensorEntry], list[Path]]:
    """Entries of a weights file or of a sharded ``*.index.json``, and the files behind them."""
    if file.name.endswith(".index.json"):
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{file}: unreadable index ({error})") from error
        entries, files = [], []
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(f"{file}: shard {shard!r} is not a file next to the index")
            shard_entries, shard_files = _read_weights(file.parent / shard)
            entries += shard_entries
            files += shard_files
        return entries, files
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    if file.suffix == ".safetensors":
        return SafetensorsFile(file).entries(), [file]
    return _TorchFile(file).entries(), [file]


class SafetensorsFile:
    """A safetensors file read tensor by tensor with plain reads (no memory map: pages read
    for one tensor do not stay in this process's resident memory).

    The header is checked the way the safetensors library checks it (size, dtypes, offsets that
    tile the data exactly), so a truncated or corrupt file is a one-line :class:`CheckpointError`
    before anything is written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = _size(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise self._error(f"only {size} bytes; truncated or not a safetensors file")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > _MAX_SAFETENSORS_HEADER or 8 + header_size > size:
                raise self._error(
                    f"header of {header_size} bytes does not fit in the file's {size} bytes; "
                    "truncated or not a safetensors file"
                )
            raw = handle.read(header_size)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise self._error(f"header is not valid JSON ({error})") from error
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_size
        data_size = size - self.data_start
        spans = []
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as error:
                raise self._error(
                    f"tensor {name!r}: bad or unsupported header entry ({error})"
                ) from None
            if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                raise self._error(f"tensor {name!r}: offsets do not match its shape and dtype")
            spans.append((begin, end, name, shape, dtype))
        spans.sort()
        position = 0
        for begin, end, name, _, _ in spans:
            if begin != position:
                raise self._error(f"tensor {name!r}: data offsets overlap or leave a gap")
            position = end
        if position > data_size:
            raise self._error(
                f"truncated: the header describes {position} bytes of tensor data, the file holds "
                f"{data_size}; copy or download it again"
            )
        if position < data_size:
            raise self._error(f"{data_size - position} unexpected bytes after the tensor data")
        self._spans = spans
        self._mapped: Any = None

    def _error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {problem}")

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(
                name,
                shape,
                dtype,
                lambda b=begin, e=end, s=shape, d=dtype: self._read(b, e, s, d),
                release=self.release,
                read_mapped=lambda n=name: self._map(n),
            )
            for begin, end, name, shape, dtype in self._spans
        ]

    def _map(self, name: str) -> torch.Tensor:
        if self._mapped is None:
            self._mapped = MappedSafetensors(self.path)
        return self._mapped.read(name)

    def release(self) -> None:
        self._mapped = None  # tensors kept from the map keep it alive; nothing else does

    def _read(
        self, begin: int, end: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            got = handle.readinto(memoryview(buffer.numpy())) if end > begin else 0
        if got != end - begin:
            raise self._error("the file changed or was cut short while being read")
        return buffer.view(dtype).reshape(shape)


class MappedSafetensors:
    """Tensors of a safetensors file as views of the safetensors library's memory map.

    A view costs no copy; a tensor kept (a model's parameter) keeps its pages. Pages read through
    the map count as this process's resident memory while the map lives, so it is reopened
    after every :data:`REOPEN_BYTES` handed out: tensors that were converted (copied) and dropped
    stop holding memory when their old map closes.
    """

    REOPEN_BYTES = 64 * 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._since_open = 0

    def names(self) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except Exception as error:
            raise CheckpointError(
                f"{self.path}: not a valid safetensors file ({_first_line(error)})"
            ) from error

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._handle is None or self._since_open >= self.REOPEN_BYTES:
            self._handle = None  # close before mapping again
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self._since_open = 0
        tensor = self._handle.get_tensor(name)
        self._since_open += tensor.nbytes
        return tensor

    def release(self) -> None:
        self._handle = None


class _TorchFile:
    """A ``torch.save`` state dict, loaded with ``weights_only=True`` (never runs pickled code).

    Memory-mapped where the format allows (zip files), so a tensor's bytes are read when it is
    used. Pages read through a map stay in this process's resident memory while the map lives,
    so the map is reopened after every :data:`REOPEN_BYTES` of tensors handed out and dropped by
    :meth:`release`: streaming a file through never holds more than that window.
    """

    REOPEN_BYTES = 64 * 1024 * 1024

    def __init__(self, file: Path) -> None:
        self.file = file
        self._state, self.mapped = _torch_load(file)
        if not isinstance(self._state, dict):
            raise CheckpointError(
                f"{file}: expected a state dict of tensors, found {type(self._state).__name__}"
            )
        self._since_open = 0

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(
                str(name),
                tuple(value.shape),
                value.dtype,
                lambda n=name: self.read(n),
                release=self.release,
                read_mapped=lambda n=name: self.read(n),
            )
            for name, value in self._state.items()
            if isinstance(value, torch.Tensor)  # skip e.g. a version number next to the weights
        ]

    def read(self, name: str) -> torch.Tensor:
        if self._state is None or (self.mapped and self._since_open >= self.REOPEN_BYTES):
            self._state = None  # unmap before mapping again
            self._state, _ = _torch_load(self.file)
            self._since_open = 0
        tensor = self._state[name]
        self._since_open += tensor.nbytes
        return tensor

    def release(self) -> None:
        if self.mapped:  # an unmapped (legacy) file would have to be read again in full
            self._state = None


def _torch_load(file: Path) -> tuple[Any, bool]:
    """(the object in ``file``, whether it is memory-mapped), never executing pickled code."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as error:
            if "mmap" not in str(error).lower() and "zip" not in str(error).lower():
                raise
            return torch.load(file, map_location="cpu", weights_only=True), False  # legacy
    except pickle.UnpicklingError as error:  # what weights_only raises for anything but tensors
        raise CheckpointError(
            f"{file}: refused to unpickle (only plain tensors are loaded, weights_only=True): "
            f"{_first_line(error)[:200]}; re-save it as safetensors or a plain state dict"
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{file}: cannot read it ({_first_line(error)[:160]}); truncated or not a torch.save "
            "file? copy or download it again"
        ) from error


# torch.distributed.checkpoint ---------------------------------------------------------------

_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only its own plain classes, never a callable
    that could run code (``os.system``, ``eval``, ...)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def load_dcp_metadata(file: Path) -> Any:
    """DCP's checkpoint metadata, read without executing pickled code."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(file, "rb") as handle:
            metadata = _DcpMetadataUnpickler(handle).load()
    except Exception as error:
        raise CheckpointError(
            f"{file}: refused to unpickle the sharded checkpoint's metadata "
            f"({_first_line(error)[:200]})"
        ) from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: not torch.distributed.checkpoint metadata")
    for info in (metadata.storage_data or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if Path(relative).name != relative or relative in ("", ".", ".."):
            raise CheckpointError(
                f"{file}: shard path {relative!r} leaves the checkpoint directory"
            )
    return metadata


class _DcpCheckpoint:
    """A sharded (FSDP) ``torch.distributed.checkpoint`` directory, consolidated tensor by
    tensor in this one process: each tensor is assembled from its shards on every rank."""

    def __init__(self, directory: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = directory
        self.metadata = load_dcp_metadata(directory / ".metadata")
        self.tensors = {
            key: value
            for key, value in self.metadata.state_dict_metadata.items()
            if isinstance(value, TensorStorageMetadata)
        }
        missing = [file.name for file in self.data_files() if not file.is_file()]
        if missing:
            raise CheckpointError(
                f"{directory}: shard file(s) {', '.join(missing)} missing; the sharded checkpoint "
                "is incomplete (copy every rank's file)"
            )

    def data_files(self) -> list[Path]:
        names = {info.relative_path for info in self.metadata.storage_data.values()}
        return [self.directory / name for name in sorted(names)]

    def files(self) -> list[Path]:
        return [self.directory / ".metadata", *self.data_files()]

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(
                key, tuple(meta.size), meta.properties.dtype, lambda k=key: self.read({k})[k]
            )
            for key, meta in self.tensors.items()
        ]

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        state = {
            key: torch.empty(
                tuple(self.tensors[key].size), dtype=self.tensors[key].properties.dtype
            )
            for key in keys
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            try:
                dcp.load(state, storage_reader=_safe_dcp_reader(self), no_dist=True)
            except CheckpointError:
                raise
            # DCP wraps each rank's failure in a CheckpointException, a BaseException.
            except (Exception, CheckpointException) as error:
                raise CheckpointError(
                    f"{self.directory}: cannot read the sharded checkpoint "
                    f"({_first_line(error)[:200]}); is a shard file damaged?"
                ) from error
        return state


def _safe_dcp_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeDcpReader(FileSystemReader):
        """torch's reader, but with our restricted metadata unpickler (tensor data is already
        read with ``torch.load(weights_only=True)``)."""

        def __init__(self, checkpoint: _DcpCheckpoint) -> None:
            super().__init__(str(checkpoint.directory))
            self._checked_metadata = checkpoint.metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = self._checked_metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeDcpReader


def _safe_dcp_reader(checkpoint: _DcpCheckpoint) -> Any:
    return _safe_dcp_reader_class()(checkpoint)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_safetensors(
    entries: Sequence[TensorEntry],
    file: Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream ``entries`` into one safetensors file, converting floating tensors to ``dtype``.

    The header is computed from names, shapes and dtypes first; then each tensor is read,
    converted, written and dropped, so memory holds one tensor (and its converted copy) at a
    time. ``progress(n)`` is told each tensor's output bytes. Returns the file's size.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise ExportError("writing safetensors needs a little-endian machine")
    planned = []
    for entry in entries:
        target = dtype if (dtype is not None and entry.dtype.is_floating_point) else entry.dtype
        if target not in _SAFETENSORS_CODES:
            raise ExportError(f"tensor {entry.name}: dtype {target} has no safetensors code")
        planned.append((entry, target))
    # Widest dtypes first, like the safetensors library: every tensor stays aligned.
    planned.sort(key=lambda item: -item[1].itemsize)
    names = [entry.name for entry, _ in planned]
    if len(set(names)) != len(names):
        raise ExportError(f"{file.name}: duplicate tensor names")

    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for entry, target in planned:
        size = math.prod(entry.shape) * target.itemsize
        header[entry.name] = {
            "dtype": _SAFETENSORS_CODES[target],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for entry, target in planned:
            tensor = entry.read()
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise CheckpointError(
                    f"tensor {entry.name}: expected {entry.dtype} {list(entry.shape)}, "
                    f"read {tensor.dtype} {list(tensor.shape)}"
                )
            converted = tensor.to(target).contiguous()
            if target == torch.float16 and tensor.dtype != torch.float16:
                _check_fits_fp16(entry.name, tensor, converted)
            if converted.numel():
                handle.write(memoryview(converted.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress(converted.numel() * target.itemsize)
            del tensor, converted
    return _size(file)


def _check_fits_fp16(name: str, tensor: torch.Tensor, converted: torch.Tensor) -> None:
    if not bool(torch.isfinite(converted).all()) and bool(torch.isfinite(tensor).all()):
        largest = float(tensor.abs().max())
        raise ExportError(
            f"tensor {name} holds values beyond fp16's range (largest |x| {largest:.3g} > 65504); "
            "export with --dtype bf16 or fp32"
        )


def _write_export(
    source: ExportSource,
    tmp: Path,
    *,
    format: str,
    dtype: str,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Write every file of the export into ``tmp``; returns the number of tensors written."""
    import transformers

    torch_dtype = DTYPES[dtype]
    total = sum(
        math.prod(entry.shape)
        * (torch_dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize)
        for entry in source.encoder
    )
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    write_safetensors(source.encoder, tmp / ENCODER_FILE, dtype=torch_dtype, progress=advance)
    if format == "colbertkit":
        head_entries = [
            TensorEntry(key, tuple(value.shape), value.dtype, lambda v=value: v)
            for key, value in source.head.items()
        ]
        write_safetensors(head_entries, tmp / HEAD_SAFETENSORS, dtype=torch_dtype)
    else:
        head = {key: value.to(torch_dtype) for key, value in source.head.items()}
        if torch_dtype == torch.float16:
            for key, value in source.head.items():
                _check_fits_fp16(f"head.{key}", value, head[key])
        write_reference_head(head, tmp / HEAD_PICKLE)

    config = _read_config(source.config_dir)
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = str(torch_dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, file in _tokenizer_files(source.config_dir).items():
        shutil.copyfile(file, tmp / name)

    if format == "colbertkit":
        architectures = config.get("architectures") or [config.get("model_type", "")]
        metadata = CheckpointMetadata(
            colbert_dim=source.colbert_dim,
            hidden_size=source.hidden_size,
            query_max_len=source.query_max_len,
            passage_max_len=source.passage_max_len,
            encoder_class=str(architectures[0]),
            semantics=source.semantics,
            versions={
                "colbertkit": __version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            source={
                "path": str(source.path.resolve()),
                "kind": source.kind,
                **{key: value for key, value in source.details.items() if value is not None},
                "sha256": {
                    str(file.relative_to(source.path)): _sha256(file)
                    for file in source.weight_files
                },
            },
            dtype=dtype,
        )
        (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n")
    return len(source.encoder) + len(source.head)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _largest_difference(
    source: ExportSource, export_dir: Path, pairs: list[tuple[str, str]]
) -> tuple[float, int]:
    """(largest |score difference|, index of that pair) between source and export.

    One model in memory at a time: the source is scored and freed before the export is loaded
    (each inside its own function, so nothing keeps it alive). Both run in float32 on CPU, so
    the comparison sees the exported weights, not the arithmetic of a device.
    """
    expected = _source_scores(source, pairs)
    _release_memory()
    got = _export_scores(source, export_dir, pairs)
    _release_memory()
    differences = [
        abs(a - b) if not (math.isnan(a) or math.isnan(b)) else math.inf
        for a, b in zip(expected, got, strict=True)
    ]
    worst = max(range(len(differences)), key=differences.__getitem__)
    return differences[worst], worst


def _source_scores(source: ExportSource, pairs: list[tuple[str, str]]) -> list[float]:
    from colbertkit.checkpoint import load_checkpoint

    built = _build_colbert(
        source.config_dir,
        [(entry.name, entry.read_mapped or entry.read) for entry in source.encoder],
        source.head,
        trust_remote_code=source.trust_remote_code,
    )
    source.release()
    if built is None:
        if source.kind == "training":
            raise CheckpointError(
                f"{source.path}: the training state does not fit the encoder built from "
                f"{source.config_dir / 'config.json'}; pass the run's base model as --base-model"
            )
        # Names transformers renames on load (a prefixed or legacy checkpoint): let it load.
        loaded = load_checkpoint(
            source.path, dtype=torch.float32, trust_remote_code=source.trust_remote_code
        )
        built = loaded.model, loaded.tokenizer
        del loaded
    model, tokenizer = built
    del built
    return _scores(source, model, tokenizer, pairs)


def _export_scores(
    source: ExportSource, export_dir: Path, pairs: list[tuple[str, str]]
) -> list[float]:
    """Scores of the export, read back through the safetensors library in float32.

    float32 whatever the stored dtype: fp16 arithmetic does not run on CPU, and upcasting keeps
    the check about the stored weights. Upcast tensor by tensor while building the model
    (``from_pretrained(dtype=float32)`` of a 16-bit file holds the mapped file and its float32
    copy at once); names that need transformers' renaming go through ``load_checkpoint``.
    """
    from colbertkit.checkpoint import detect_layout, load_checkpoint

    layout = detect_layout(export_dir)
    mapped = MappedSafetensors(layout.encoder_weights)
    built = _build_colbert(
        export_dir,
        [(name, lambda n=name: mapped.read(n)) for name in mapped.names()],
        load_head_state(layout.head_file),
        trust_remote_code=source.trust_remote_code,
    )
    mapped.release()  # kept parameters keep their own pages; converted ones need none
    if built is None:
        loaded = load_checkpoint(
            export_dir, dtype=torch.float32, trust_remote_code=source.trust_remote_code
        )
        built = loaded.model, loaded.tokenizer
        del loaded
    model, tokenizer = built
    del built
    return _scores(source, model, tokenizer, pairs)


def _scores(
    source: ExportSource, model: Any, tokenizer: Any, pairs: list[tuple[str, str]]
) -> list[float]:
    from colbertkit.scorer import PairScorer

    scorer = PairScorer(
        model,
        tokenizer,
        query_max_len=source.query_max_len,
        passage_max_len=source.passage_max_len,
        # Small batches: a short passage batched with a long one is padded to its length, and
        # the attention maps of a full-length batch would cost more memory than the check needs.
        batch_size=2,
        pad_floor=source.semantics.pad_floor,
    )
    return list(scorer.score(pairs))


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build_colbert(
    config_dir: Path,
    tensors: Sequence[tuple[str, Callable[[], torch.Tensor]]],
    head_state: dict[str, torch.Tensor],
    *,
    trust_remote_code: bool,
) -> tuple[Any, Any] | None:
    """A float32 ColBERT model from ``config_dir``'s config and tokenizer and these tensors.

    The tensors become the parameters (``assign=True``), read one at a time and upcast where
    stored in 16 bits: one copy of the weights. Returns None unless the names are exactly the
    encoder's (no renaming, nothing missing), so a checkpoint that only transformers' loading
    logic understands is left to it.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.initialization import no_init_weights

    from colbertkit.model import ColBERT

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(
                str(config_dir), trust_remote_code=trust_remote_code
            )
            with no_init_weights():  # every weight is replaced below: skip random init
                encoder = AutoModel.from_config(
                    config, trust_remote_code=trust_remote_code, dtype=torch.float32
                )
            tokenizer = AutoTokenizer.from_pretrained(
                str(config_dir), trust_remote_code=trust_remote_code
            )
    except Exception as error:
        raise CheckpointError(
            f"{config_dir}: cannot build the encoder or tokenizer ({_first_line(error)})"
        ) from error
    if {name for name, _ in tensors} != set(encoder.state_dict()) or len(tensors) != len(
        {name for name, _ in tensors}
    ):
        return None
    state = {}
    for name, read in tensors:
        tensor = read()
        state[name] = tensor.float() if tensor.is_floating_point() else tensor
        del tensor  # a converted copy no longer needs the mapped original
    encoder.load_state_dict(state, strict=True, assign=True)
    del state
    weight = head_state["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state)
    head.load_state_dict({key: value.float() for key, value in head_state.items()})
    return ColBERT(encoder, head).eval(), tokenizer
