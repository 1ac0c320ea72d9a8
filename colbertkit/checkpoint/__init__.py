"""Every on-disk format colbertkit reads or writes, in one package (see docs/architecture.md).

* :mod:`~colbertkit.checkpoint.layouts` - resolving a checkpoint argument, model-directory
  layouts and their metadata, tokenizer files, library versions;
* :mod:`~colbertkit.checkpoint.tensors` - tensor files read and written one tensor at a time;
* :mod:`~colbertkit.checkpoint.sharded` - FSDP sharded checkpoints (DCP), safely unpickled;
* :mod:`~colbertkit.checkpoint.run` - the training run directory and its checkpoints;
* :mod:`~colbertkit.checkpoint.sources` - any checkpoint form opened as tensors;
* :mod:`~colbertkit.checkpoint.build` - the one place a ColBERT is built from weights; load/save;
* :mod:`~colbertkit.checkpoint.files` - atomic, umask-following, owner-checked writing.

It imports nothing of training, scoring, export or the CLI; they import it. Importing this
package is light (no torch): the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_checkpoint": "build",
    "save_checkpoint": "build",
    "build_colbert": "build",
    "colbert_from_source": "build",
    "LoadedCheckpoint": "build",
    "open_checkpoint": "sources",
    "CheckpointSource": "sources",
    "resolve_checkpoint": "layouts",
    "detect_layout": "layouts",
    "CheckpointLayout": "layouts",
    "CheckpointMetadata": "layouts",
    "Semantics": "layouts",
    "load_head_state": "tensors",
    "atomic_directory": "files",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'colbertkit.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"colbertkit.checkpoint.{module}"), name)
