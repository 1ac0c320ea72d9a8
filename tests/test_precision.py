"""Precision names, hardware detection for ``auto``, and the hint of an fp32 run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from colbertkit.errors import UsageError
from colbertkit.precision import (
    AUTO_SPEEDUP,
    cpu_flags,
    describe_dtype,
    hint_for,
    native_cpu_bf16,
    resolve_dtype,
    resolve_mixed_precision,
)

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
flags\t\t: fpu vme
"""
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_cpu_flags_reads_the_first_processor_x86_and_arm():
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= cpu_flags(X86_CPUINFO)
    assert "amx_bf16" in cpu_flags(X86_CPUINFO) and "vme" in cpu_flags(X86_CPUINFO)
    assert cpu_flags(ARM_CPUINFO) == {"fp", "asimd", "bf16", "sve"}
    assert cpu_flags("") == set()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX"),
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
        ({"avx2", "avx512f"}, None),  # AVX512 without its bf16 instructions emulates bf16
        ({"avx", "avx2"}, None),
        ({"fp", "asimd", "bf16"}, None),  # ARM: auto stays fp32 ("fp32 elsewhere")
    ],
)
def test_native_cpu_bf16_from_flags(flags, expected):
    assert native_cpu_bf16(flags) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo (Linux)")
def test_this_machines_detection_matches_its_cpuinfo():
    text = Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n")[0]
    expected = "AMX" if " amx_bf16" in first else "AVX512-BF16" if " avx512_bf16" in first else None
    assert native_cpu_bf16() == expected
    resolved, reason = resolve_dtype("auto", "cpu")
    if expected is None:
        assert resolved == "fp32"
        assert reason == f"no native bf16 on this CPU: {torch.backends.cpu.get_cpu_capability()}"
    else:
        assert (resolved, reason) == ("bf16", expected)


def test_explicit_precisions_are_returned_as_asked_and_checked():
    assert resolve_dtype("fp32", "cpu") == ("fp32", "asked")
    assert resolve_dtype("bf16", torch.device("cpu")) == ("bf16", "asked")
    with pytest.raises(UsageError, match=r"`dtype=fp16` is not supported on CPU; use bf16, auto"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(UsageError, match=r"`dtype` int8: use one of auto, fp32, fp16, bf16"):
        resolve_dtype("int8", "cpu")


def test_auto_on_other_devices_is_fp32():
    assert resolve_dtype("auto", "meta") == ("fp32", "auto is fp32 on meta")


def test_hint_names_the_measured_speedup_and_the_score_shift():
    assert hint_for("fp32", "no native bf16 on this CPU: AVX2") is None
    amx = hint_for("bf16", "AMX")
    assert amx == (
        f"--dtype auto is about {AUTO_SPEEDUP['AMX']:g}x faster here (bf16, AMX); "
        "scores move by about 3e-3"
    )
    # No measured figure for a class: the hint says what would run, not a made-up number.
    gpu = hint_for("bf16", "NVIDIA H200, sm_90")
    assert gpu is not None and "x faster" not in gpu
    assert "bf16 runs natively (NVIDIA H200, sm_90)" in gpu
    old_gpu = hint_for("fp16", "no native bf16 on Tesla T4, sm_75")
    assert old_gpu is not None and "fp16 runs natively (Tesla T4, sm_75)" in old_gpu


def test_describe_dtype_says_why_only_for_auto():
    assert describe_dtype("auto", "bf16", "AMX") == "bf16, AMX"
    assert describe_dtype("fp32", "fp32", "asked") == "fp32"


def test_mixed_precision_auto_follows_resolve_dtype():
    resolved, reason = resolve_dtype("auto", "cpu")
    assert resolve_mixed_precision("auto", "cpu") == (
        "no" if resolved == "fp32" else resolved,
        reason,
    )
    assert resolve_mixed_precision("bf16", "cpu") == ("bf16", "asked")
    assert resolve_mixed_precision("no", "cpu") == ("no", "asked")


@pytest.mark.parametrize(
    ("capability", "name", "expected"),
    [
        ((9, 0), "NVIDIA H200", ("bf16", "NVIDIA H200, sm_90")),
        ((7, 5), "Tesla T4", ("fp16", "no native bf16 on Tesla T4, sm_75")),
        (
            (6, 1),
            "GeForce GTX 1080",
            ("fp32", "no fast 16-bit arithmetic on GeForce GTX 1080, sm_61"),
        ),
    ],
)
def test_auto_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, name, expected):
    # No GPU here: the CUDA queries resolve_dtype makes answer as the named card would.
    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability[0] >= 8)
    assert resolve_dtype("auto", "cuda") == expected
