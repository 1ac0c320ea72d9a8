"""colbertkit: fine-tune and use ColBERT (late-interaction) retrieval models.

The package imports nothing heavy at start-up (``colbertkit --help`` must stay instant);
the verbs below load torch and transformers on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it, imported on first attribute access
_LAZY = {
    "ColbertkitError": "colbertkit.errors",
    "ColBERT": "colbertkit.model",
    "load_checkpoint": "colbertkit.checkpoint",
    "save_checkpoint": "colbertkit.checkpoint",
    "score_pairs": "colbertkit.scorer",
    "PairScorer": "colbertkit.scorer",
    "validate_dataset": "colbertkit.validation",
    "train": "colbertkit.training",
    "TrainConfig": "colbertkit.train_config",
    "export_model": "colbertkit.export",
    "launch": "colbertkit.launcher",
    "open_checkpoint": "colbertkit.checkpoint",
    "mine_negatives": "colbertkit.mining",
    "MiningReport": "colbertkit.mining",
    "evaluate": "colbertkit.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'colbertkit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
