"""What this machine's CPU is: its model name, its x86-64 ISA level, and what PyTorch's build sees.

Read from ``/proc/cpuinfo`` (Linux) and from PyTorch's own CPU checks; nothing here measures
anything. The precision pick (core/precision.py) names the CPU with :func:`describe_cpu`, and the
benchmarks (bench/run.py) put :func:`cpu_record` into every result.

The x86-64 levels are the psABI's microarchitecture levels, as Linux's cpuinfo spells the flags
(LZCNT is ``abm`` there): v1 is any x86-64, v2 adds SSE4.2 and POPCNT (Nehalem, 2008), v3 AVX2,
FMA and BMI (Haswell, Zen 1), v4 the AVX-512 foundation (Skylake-SP, Zen 4).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

import torch

X86_LEVELS: dict[str, tuple[str, ...]] = {
    "v2": ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"),
    "v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")


def is_x86() -> bool:
    return platform.machine().lower() in X86_MACHINES


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The fields of the first processor in ``path`` (empty where there is no such file)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: the others repeat it
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(info: dict[str, str]) -> str:
    """The CPU's model name (x86: ``model name``), else what the platform module knows."""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if info.get(key):
            return " ".join(info[key].split())
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags(info: dict[str, str]) -> set[str]:
    """The feature flags (x86: ``flags``; Arm: ``Features``)."""
    return set((info.get("flags") or info.get("Features") or "").split())


def x86_level(flags: set[str]) -> str | None:
    """``x86-64-v1`` .. ``x86-64-v4``: the highest level whose flags (and every lower level's) are all
    present; None without the 64-bit flag ``lm`` (not an x86-64 CPU, or no cpuinfo)."""
    if "lm" not in flags:
        return None
    level = "v1"
    for name, required in X86_LEVELS.items():
        if not all(f in flags for f in required):
            break
        level = name
    return f"x86-64-{level}"


def torch_bf16_isa() -> list[str]:
    """The native bf16 instructions PyTorch's build detects on this CPU: AVX512-BF16 and AMX (x86)."""
    found = []
    for name, check in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, check, None)
        if fn is not None and fn():
            found.append(name)
    return found


def aten_capability() -> str:
    """The vector ISA ATen's CPU kernels dispatch to (DEFAULT, AVX2, AVX512, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build
        return "unknown"


@functools.cache
def describe_cpu() -> str:
    """A short name for log lines: the model, and the ISA level on x86 (``AMD EPYC, x86-64-v4``)."""
    info = read_cpuinfo()
    level = x86_level(cpu_flags(info)) if is_x86() else None
    return cpu_model(info) + (f", {level}" if level else "")


def cpu_record() -> dict[str, Any]:
    """What the benchmarks record about the CPU and PyTorch (measurements are added by the caller)."""
    info = read_cpuinfo()
    flags = cpu_flags(info)
    return {
        "cpu": cpu_model(info),
        "arch": platform.machine(),
        "isa_level": x86_level(flags) if is_x86() else None,
        "bf16_isa": torch_bf16_isa(),
        "aten_cpu_capability": aten_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
