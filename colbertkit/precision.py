"""Numeric precisions as users name them (``fp32``, ``fp16``, ``bf16``, ``auto``), in one place.

* :func:`resolve_dtype` turns a requested computation precision into the one that runs, with
  the reason in words: ``auto`` is bf16 where the hardware computes it natively (CUDA GPUs with
  bf16, CPUs with AMX or AVX512-BF16, detected, never guessed), fp16 on Volta and Turing GPUs
  (sm_7x) and fp32 everywhere else;
* :func:`auto_hint` is the one line an fp32 run prints where ``auto`` would be faster.

Light on purpose: the CLI's option types import the names; torch is imported on use.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Literal

DTYPE_NAMES = ("fp32", "fp16", "bf16")
DTypeName = Literal["fp32", "fp16", "bf16"]
# What a computation may ask for; export's --dtype is a storage format and takes no "auto".
COMPUTE_DTYPE_NAMES = ("auto", *DTYPE_NAMES)
ComputeDTypeName = Literal["auto", "fp32", "fp16", "bf16"]

# How much faster `auto` ran than fp32 for scoring (pairs/s, same input), by hardware class, and
# where each figure was measured. A class missing here has no measurement yet: the hint then
# says what auto would run without a number (benchmarks/bench_score.py and
# benchmarks/gpu_check.py measure it on the machine at hand).
AUTO_SPEEDUP = {
    # Issue 12: a MiniLM forward with bf16 weights is about 2x the fp32 one on the Xeons with
    # AMX this project runs on.
    "AMX": 2.0,
}
# Largest score difference bf16 vs fp32 seen by benchmarks/bench_score.py (MiniLM + 128-d head,
# 200 queries x 50 passages; README "--dtype auto" lists the run). bf16 keeps 8 bits of
# mantissa, so a score in [-1, 1] moves in its third decimal.
BF16_SCORE_SHIFT = 3e-3
FP16_SCORE_SHIFT = 1e-3  # 11-bit mantissa; the same run, by the bits (not measured here)

CPUINFO = Path("/proc/cpuinfo")


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``name`` (one of :data:`DTYPE_NAMES`)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text (x86 ``flags``,
    ARM ``Features``)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_cpu_bf16(flags: set[str] | None = None) -> str | None:
    """``"AMX"`` or ``"AVX512-BF16"`` where this CPU computes bf16 natively, else None.

    ``flags``: the CPU's feature flags; by default read from /proc/cpuinfo on Linux, else asked
    of torch's own CPU detection (cpuinfo). Both report what the processor has, not a guess from
    its model name.
    """
    if flags is None:
        flags = _this_cpu_flags()
    if flags is None:  # not Linux: torch's detection
        return _torch_cpu_bf16()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


@functools.cache
def _this_cpu_flags() -> frozenset[str] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return frozenset(cpu_flags(CPUINFO.read_text(errors="replace")))
    except OSError:
        return None


def _torch_cpu_bf16() -> str | None:
    import torch

    def supported(name: str) -> bool:
        check = getattr(torch.cpu, name, None)  # private helpers; absent in some versions
        return bool(check()) if callable(check) else False

    if supported("_is_amx_tile_supported"):
        return "AMX"
    if supported("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return None


def cpu_vector_unit() -> str:
    """The vector unit torch's kernels use here (AVX2, AVX512, ...), for messages."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def resolve_dtype(name: str, device: Any) -> tuple[DTypeName, str]:
    """(precision that runs, why) for ``name`` (``auto`` or a precision) on ``device``.

    ``device``: a torch device or its name. Explicit precisions are checked (fp16 needs a GPU)
    and returned with the reason ``"asked"``; for ``auto`` the reason names the hardware
    (``"AMX"``, ``"NVIDIA H200, sm_90"``, ``"no native bf16 on this CPU: AVX2"``). Raises
    :class:`~colbertkit.errors.UsageError` naming ``dtype``.
    """
    import torch

    from colbertkit.errors import UsageError

    if name not in COMPUTE_DTYPE_NAMES:
        raise UsageError(f"`dtype` {name}: use one of {', '.join(COMPUTE_DTYPE_NAMES)}")
    device = torch.device(device)
    if name == "fp16" and device.type == "cpu":
        raise UsageError("`dtype=fp16` is not supported on CPU; use bf16, auto or fp32")
    if name != "auto":
        return name, "asked"  # type: ignore[return-value]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        gpu = f"{torch.cuda.get_device_name(index)}, sm_{major}{minor}"
        # Ampere (sm_80) and later compute bf16 in their tensor cores.
        if major >= 8 and torch.cuda.is_bf16_supported():
            return "bf16", gpu
        if major >= 7:  # Volta and Turing: fp16 tensor cores
            return "fp16", f"no native bf16 on {gpu}"
        # Pascal and older: fp16 is no faster (a fraction of fp32 on consumer cards).
        return "fp32", f"no fast 16-bit arithmetic on {gpu}"
    if device.type == "cpu":
        unit = native_cpu_bf16()
        if unit is not None:
            return "bf16", unit
        return "fp32", f"no native bf16 on this CPU: {cpu_vector_unit()}"
    return "fp32", f"auto is fp32 on {device.type}"


def auto_hint(device: Any) -> str | None:
    """The line an fp32 run prints where ``auto`` would run a 16-bit precision instead.

    No benchmark runs for it: the speed-up is the measured figure of the hardware class
    (:data:`AUTO_SPEEDUP`), the score shift the one bench_score measured for that precision.
    None where auto is fp32 too.
    """
    return hint_for(*resolve_dtype("auto", device))


def hint_for(resolved: str, reason: str) -> str | None:
    """:func:`auto_hint` for what ``auto`` resolves to (``"bf16", "AMX"``)."""
    if resolved == "fp32":
        return None
    shift = BF16_SCORE_SHIFT if resolved == "bf16" else FP16_SCORE_SHIFT
    speedup = AUTO_SPEEDUP.get(reason) if resolved == "bf16" else None
    where = reason.removeprefix("no native bf16 on ")
    faster = (
        f"about {speedup:g}x faster here ({resolved}, {where})"
        if speedup
        else f"faster here: {resolved} runs natively ({where})"
    )
    return f"--dtype auto is {faster}; scores move by about {shift:.0e}".replace("e-0", "e-")


def describe_dtype(name: str, resolved: str, reason: str) -> str:
    """``bf16, AMX`` for what ``auto`` chose; ``fp32`` for a precision asked for by name."""
    return resolved if name != "auto" else f"{resolved}, {reason}"


def resolve_mixed_precision(name: str, device: Any) -> tuple[str, str]:
    """Training's ``mixed_precision`` (``no``, ``bf16``, ``fp16`` or ``auto``) as accelerate
    takes it, with the reason: ``auto`` is :func:`resolve_dtype`'s choice (fp32 -> ``no``)."""
    if name != "auto":
        return name, "asked"
    resolved, reason = resolve_dtype("auto", device)
    return ("no" if resolved == "fp32" else resolved), reason
