"""Load, build and save ColBERT models: the one place a model is made from weights.

* :func:`build_colbert` turns an encoder config, its tensors and a head state into a float32
  :class:`~colbertkit.model.ColBERT` (used by loading, export's verification and the FSDP
  consolidation of the trainer);
* :func:`load_checkpoint` opens any checkpoint form (:func:`open_checkpoint`) and builds it:
  ``score``, ``train --model``, ``export`` and evaluation all load through it;
* :func:`save_checkpoint` writes colbertkit's layout, atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colbertkit import defaults
from colbertkit.checkpoint.files import atomic_directory, check_replaceable, names_of
from colbertkit.checkpoint.layouts import (
    HEAD_SAFETENSORS,
    METADATA_FILE,
    MODEL_FILES,
    CheckpointMetadata,
    library_versions,
    quiet_transformers,
)
from colbertkit.checkpoint.sources import CheckpointSource, open_checkpoint
from colbertkit.errors import CheckpointError, UsageError, first_line


@dataclass
class LoadedCheckpoint:
    """A ready model with everything a scorer needs to know about it."""

    model: Any  # colbertkit.model.ColBERT
    tokenizer: Any
    source: CheckpointSource
    query_max_len: int
    passage_max_len: int
    notes: list[str] = field(default_factory=list)


def load_encoder_config(config_dir: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code)
    except Exception as error:
        raise CheckpointError(
            f"{config_dir}: cannot read the encoder config ({first_line(error)})"
        ) from error


def load_tokenizer(config_dir: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(
                str(config_dir), trust_remote_code=trust_remote_code
            )
    except Exception as error:
        raise CheckpointError(
            f"{config_dir}: cannot load the tokenizer ({first_line(error)}); "
            "copy the tokenizer files of the base model into the checkpoint"
        ) from error


def build_colbert(
    config: Any,
    tensors: Sequence[tuple[str, Callable[[], Any]]],
    head_state: dict[str, Any],
    *,
    trust_remote_code: bool = False,
) -> Any | None:
    """A float32 ColBERT from an encoder ``config``, its named tensors and a head state.

    The tensors become the parameters (``assign=True``), read one at a time and upcast where
    stored in 16 bits: one copy of the weights. Returns None unless the names are exactly the
    encoder's (no renaming, nothing missing), so a checkpoint that only transformers' loading
    logic understands is left to it.
    """
    import torch
    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    from colbertkit.model import ColBERT

    try:
        with quiet_transformers(), no_init_weights():  # every weight is replaced below
            encoder = AutoModel.from_config(
                config, trust_remote_code=trust_remote_code, dtype=torch.float32
            )
    except Exception as error:
        raise CheckpointError(f"cannot build the encoder ({first_line(error)})") from error
    names = [name for name, _ in tensors]
    if set(names) != set(encoder.state_dict()) or len(names) != len(set(names)):
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
    return ColBERT(encoder, head).eval()


def colbert_from_source(
    source: CheckpointSource,
    *,
    fresh_head: bool = False,
    colbert_dim: int | None = None,
    seed: int = 0,
) -> tuple[Any, Any, list[str]]:
    """(float32 ColBERT on CPU, tokenizer, notes) of an opened checkpoint.

    ``colbert_dim`` checks an existing head (its size comes from the weights); with
    ``fresh_head`` it sizes the new head (default :data:`defaults.FRESH_COLBERT_DIM`).
    """

    from colbertkit.model import fresh_head as make_fresh_head

    notes = []
    config = load_encoder_config(source.config_dir, source.trust_remote_code)
    hidden_size = int(config.hidden_size)
    if fresh_head:
        dim = colbert_dim or defaults.FRESH_COLBERT_DIM
        head = make_fresh_head(hidden_size, dim, seed=seed)
        head_state = {key: value.detach() for key, value in head.state_dict().items()}
        if source.head is not None:
            notes.append("ignored the checkpoint's head (a fresh head was asked for)")
        notes.append(f"attached a fresh head {hidden_size} -> {dim} (seed {seed})")
    else:
        head_state = source.require_head()
        out_features, in_features = head_state["weight"].shape
        if in_features != hidden_size:
            raise CheckpointError(
                f"{source.path}: head input size {in_features} does not match the encoder's "
                f"hidden size {hidden_size}"
            )
        if colbert_dim is not None and colbert_dim != out_features:
            raise UsageError(
                f"`colbert_dim` {colbert_dim} does not match the checkpoint's head "
                f"(colbert_dim {out_features}); leave `colbert_dim` unset"
            )
    model = build_colbert(
        config,
        [(entry.name, entry.read_mapped or entry.read) for entry in source.encoder],
        head_state,
        trust_remote_code=source.trust_remote_code,
    )
    source.release()
    if model is None:
        if source.kind == "training":
            raise CheckpointError(
                f"{source.path}: the training state does not fit the encoder built from "
                f"{source.config_dir / 'config.json'}; pass the run's base model as `base_model`"
            )
        model = _load_renamed(source, head_state)
    tokenizer = load_tokenizer(source.config_dir, source.trust_remote_code)
    return model, tokenizer, notes


def _load_renamed(source: CheckpointSource, head_state: dict[str, Any]) -> Any:
    """Weights whose names only transformers' loading logic maps (a prefixed or legacy
    checkpoint): load with ``from_pretrained``, refusing weights that would stay random."""
    import torch
    from transformers import AutoModel

    from colbertkit.model import ColBERT

    try:
        with quiet_transformers():
            encoder, loading = AutoModel.from_pretrained(
                str(source.path),
                trust_remote_code=source.trust_remote_code,
                dtype=torch.float32,
                output_loading_info=True,
            )
    except Exception as error:
        raise CheckpointError(
            f"{source.path}: cannot load the encoder ({first_line(error)})"
        ) from error
    # The pooler is the exception: ColBERT never uses it, and many checkpoints leave it out.
    missing = sorted(k for k in loading.get("missing_keys", ()) if not k.startswith("pooler."))
    mismatched = sorted(str(item[0]) for item in loading.get("mismatched_keys", ()))
    if missing or mismatched:
        names = missing or mismatched
        problem = "missing from" if missing else "of another shape in"
        weights = source.weight_files[0].name if source.weight_files else "the weights"
        raise CheckpointError(
            f"{source.path}: {len(names)} encoder weights are {problem} {weights} "
            f"(e.g. {names[0]}) and would be random; is it a model of another architecture "
            "or with renamed keys?"
        )
    weight = head_state["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state)
    head.load_state_dict({key: value.float() for key, value in head_state.items()})
    return ColBERT(encoder, head).eval()


def load_checkpoint(
    spec: str | os.PathLike[str],
    *,
    colbert_dim: int | None = None,
    fresh_head: bool = False,
    seed: int = 0,
    device: str = "cpu",
    dtype: Any = None,
    trust_remote_code: bool = False,
    base_model: str | os.PathLike[str] | None = None,
) -> LoadedCheckpoint:
    """Load a ColBERT model and tokenizer from any checkpoint form (see :func:`open_checkpoint`).

    A bare encoder needs ``fresh_head=True``. ``dtype`` (a torch dtype) and ``device`` place the
    built model.
    """
    source = open_checkpoint(spec, base_model=base_model, trust_remote_code=trust_remote_code)
    described = f"found {source.description}"
    if not source.form.startswith("a "):
        described += f": {source.form}"
    model, tokenizer, notes = colbert_from_source(
        source, fresh_head=fresh_head, colbert_dim=colbert_dim, seed=seed
    )
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    return LoadedCheckpoint(
        model=model,
        tokenizer=tokenizer,
        source=source,
        query_max_len=source.query_max_len,
        passage_max_len=source.passage_max_len,
        notes=[described, *source.notes, *notes],
    )


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    query_max_len: int = defaults.QUERY_MAX_LEN,
    passage_max_len: int = defaults.PASSAGE_MAX_LEN,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in the colbertkit layout, atomically (temp dir, then rename).

    ``overwrite`` replaces an existing model directory, but never one that holds files a model
    directory of colbertkit would not (they are the user's).
    """
    import safetensors.torch

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; choose another directory or allow `overwrite`")
    check_replaceable(
        out, names_of(MODEL_FILES), what="a model directory", fix="choose another directory"
    )
    metadata = CheckpointMetadata(
        colbert_dim=model.colbert_dim,
        hidden_size=model.hidden_size,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        encoder_class=type(model.encoder).__name__,
        versions=library_versions(),
        source=source or {},
    )
    with atomic_directory(out) as tmp, quiet_transformers():
        model.encoder.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        head_state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        safetensors.torch.save_file(head_state, str(tmp / HEAD_SAFETENSORS))
        (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n")
    return out
