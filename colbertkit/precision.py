"""Numeric precisions as users name them (``fp32``, ``fp16``, ``bf16``), in one table.

Light on purpose: the CLI's option types import the names; torch is imported on use.
"""

from __future__ import annotations

from typing import Any, Literal

DTYPE_NAMES = ("fp32", "fp16", "bf16")
DTypeName = Literal["fp32", "fp16", "bf16"]


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``name`` (one of :data:`DTYPE_NAMES`)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
