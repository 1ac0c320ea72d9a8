"""Export any ColBERT checkpoint to safetensors, then prove the export scores like its source.

Sources: every form :func:`colbertkit.checkpoint.open_checkpoint` reads (colbertkit and reference
/ BGE-M3 model directories, training runs, ``best/``, training checkpoints including FSDP sharded
ones). BGE-M3's other heads (``sparse_linear.pt``; the dense vector is the CLS state and has no
weights of its own) are not part of a ColBERT model and are left out, with a note; so are
optimizer, scheduler and RNG state.

Outputs: colbertkit's layout (default) or the reference layout with a plain-tensor
``colbert_linear.pt``; the encoder always as one ``model.safetensors``.

Memory: tensors are streamed one at a time from source to output (read, convert, write, drop),
with plain file reads rather than memory maps, so the copy itself holds about one tensor; the
verification then loads one model at a time (source, freed, then export).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from colbertkit.checkpoint.build import colbert_from_source
from colbertkit.checkpoint.files import atomic_directory, check_replaceable, names_of
from colbertkit.checkpoint.layouts import (
    CONFIG_JSON,
    ENCODER_FILE,
    HEAD_PICKLE,
    HEAD_SAFETENSORS,
    METADATA_FILE,
    MODEL_FILES,
    CheckpointMetadata,
    library_versions,
    read_config,
    tokenizer_files,
)
from colbertkit.checkpoint.sources import CheckpointSource, open_checkpoint
from colbertkit.checkpoint.tensors import (
    TensorEntry,
    TensorWriteError,
    check_fits_fp16,
    write_reference_head,
    write_safetensors,
)
from colbertkit.errors import UsageError, validate_options
from colbertkit.precision import DTypeName, torch_dtype

LAYOUTS = ("colbertkit", "reference")
# Largest allowed |score(source) - score(export)|. Scores are means of cosine similarities, in
# [-1, 1]. fp32 copies bits, so any difference is arithmetic noise; fp16/bf16 round every weight
# (relative error 2^-11 / 2^-8), which moves MiniLM's scores by about 2e-4 / 7e-4, while a wrong
# tensor moves them by tenths.
TOLERANCES = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
# An export is written whole by colbertkit: these are all the entries its directory may hold.
_EXPORT_ENTRIES = MODEL_FILES

# The export cannot be written as asked (e.g. a value does not fit the chosen dtype).
ExportError = TensorWriteError

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


class VerificationError(ExportError):
    """The written export does not score like its source: nothing was placed."""


@dataclass
class ExportReport:
    """What :func:`export_model` did. Sizes in bytes, times in seconds."""

    source: Path
    source_kind: str  # "colbertkit" | "reference" | "training"
    description: str  # what was found, e.g. "training checkpoint (step 400, model.safetensors)"
    out: Path
    layout: str  # colbertkit | reference
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
    form: str = ""  # what the source was, in words (e.g. "training checkpoint step 400")

    def to_dict(self) -> dict[str, Any]:
        """The report for machines (``colbertkit export --format json``)."""
        data = {key: getattr(self, key) for key in self.__dataclass_fields__}
        data.update(source=str(self.source), out=str(self.out))
        return {"format": "colbertkit.export-report", "format_version": 1, **data}


# --------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------


def export_model(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layout: str = "colbertkit",
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

    ``layout``: ``colbertkit`` (encoder ``model.safetensors``, ``colbert_linear.safetensors``,
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
    options = validate_options(
        ExportOptions,
        layout=layout,
        dtype=dtype,
        tolerance=tolerance,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
    )
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; choose another directory or pass `force=True`")
    pairs = _verification_pairs(verify_pairs) if verify else []

    src = open_checkpoint(source, base_model=base_model, trust_remote_code=trust_remote_code)
    src.require_head()
    _check_not_nested(src.path, out)
    check_replaceable(
        out,
        names_of(_EXPORT_ENTRIES),
        what="an export",
        fix="choose a new directory for the export",
    )
    notes = [*src.notes]
    if src.left_out:
        notes.append("not exported: " + ", ".join(src.left_out))
    if (src.path / "sparse_linear.pt").exists():
        notes.append(
            "BGE-M3's sparse and dense outputs are not part of a ColBERT export; only "
            f"{HEAD_PICKLE} is kept"
        )
    if log is not None:
        found = f"found {src.description}"
        if not src.form.startswith("a "):
            found += f": {src.form}"
        for line in (found, *notes):
            log(line)
    if options.query_max_len is not None:
        src.query_max_len = options.query_max_len
    if options.passage_max_len is not None:
        src.passage_max_len = options.passage_max_len
    dtype = options.dtype
    limit = TOLERANCES[dtype] if options.tolerance is None else options.tolerance

    start = time.perf_counter()
    with atomic_directory(out) as tmp:
        tensors = _write_export(src, tmp, layout=options.layout, dtype=dtype, progress=progress)
        src.release()
        write_seconds = time.perf_counter() - start
        report = ExportReport(
            source=src.path,
            source_kind=src.kind,
            description=src.description,
            out=out,
            layout=options.layout,
            dtype=dtype,
            colbert_dim=src.colbert_dim,
            hidden_size=src.hidden_size,
            tensors=tensors,
            source_bytes=src.weight_bytes,
            written_bytes=sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()),
            write_seconds=write_seconds,
            tolerance=limit if verify else None,
            notes=notes,
            form=src.form,
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
                    "(export in fp32, raise `tolerance`, or skip with `verify=False`)"
                )
            report.verified = True
        if out.exists() and not force:  # someone created it while we worked
            raise UsageError(
                f"{out} appeared while exporting; choose another directory or `force=True`"
            )
    return report


class ExportOptions(BaseModel):
    """The checked options of :func:`export_model`."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["colbertkit", "reference"] = "colbertkit"
    dtype: DTypeName = "fp32"
    tolerance: float | None = Field(default=None, ge=0)
    query_max_len: int | None = Field(default=None, ge=2)
    passage_max_len: int | None = Field(default=None, ge=2)


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
# Writing
# --------------------------------------------------------------------------------------------


def _write_export(
    source: CheckpointSource,
    tmp: Path,
    *,
    layout: str,
    dtype: str,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Write every file of the export into ``tmp``; returns the number of tensors written."""
    target = torch_dtype(dtype)
    head_state = source.require_head()
    total = sum(
        math.prod(entry.shape)
        * (target.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize)
        for entry in source.encoder
    )
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    write_safetensors(source.encoder, tmp / ENCODER_FILE, dtype=target, progress=advance)
    if layout == "colbertkit":
        head_entries = [
            TensorEntry(key, tuple(value.shape), value.dtype, lambda v=value: v)
            for key, value in head_state.items()
        ]
        write_safetensors(head_entries, tmp / HEAD_SAFETENSORS, dtype=target)
    else:
        head = {key: value.to(target) for key, value in head_state.items()}
        if target == torch.float16:
            for key, value in head_state.items():
                check_fits_fp16(f"head.{key}", value, head[key])
        write_reference_head(head, tmp / HEAD_PICKLE)

    config = read_config(source.config_dir)
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = str(target).removeprefix("torch.")
    (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2) + "\n")
    for name, file in tokenizer_files(source.config_dir).items():
        shutil.copyfile(file, tmp / name)

    if layout == "colbertkit":
        architectures = config.get("architectures") or [config.get("model_type", "")]
        metadata = CheckpointMetadata(
            colbert_dim=source.colbert_dim,
            hidden_size=source.hidden_size,
            query_max_len=source.query_max_len,
            passage_max_len=source.passage_max_len,
            encoder_class=str(architectures[0]),
            semantics=source.semantics,
            versions=library_versions(),
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
    return len(source.encoder) + len(head_state)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _largest_difference(
    source: CheckpointSource, export_dir: Path, pairs: list[tuple[str, str]]
) -> tuple[float, int]:
    """(largest |score difference|, index of that pair) between source and export.

    One model in memory at a time: the source is scored and freed before the export is loaded
    (each inside its own function, so nothing keeps it alive). Both run in float32 on CPU
    (16-bit weights are upcast tensor by tensor while the model is built), so the comparison
    sees the exported weights, not the arithmetic of a device.
    """
    expected = _scores(source, pairs)
    _release_memory()
    exported = open_checkpoint(export_dir, trust_remote_code=source.trust_remote_code)
    # The same lengths and semantics as the source (the reference layout records none).
    exported.semantics = source.semantics
    exported.query_max_len, exported.passage_max_len = source.query_max_len, source.passage_max_len
    got = _scores(exported, pairs)
    _release_memory()
    differences = [
        abs(a - b) if not (math.isnan(a) or math.isnan(b)) else math.inf
        for a, b in zip(expected, got, strict=True)
    ]
    worst = max(range(len(differences)), key=differences.__getitem__)
    return differences[worst], worst


def _scores(source: CheckpointSource, pairs: list[tuple[str, str]]) -> list[float]:
    from colbertkit.scorer import PairScorer

    model, tokenizer, _ = colbert_from_source(source)
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
