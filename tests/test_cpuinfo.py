"""cpuinfo: the CPU's model name and x86-64 ISA level, read from /proc/cpuinfo-style text."""

from __future__ import annotations

import pytest

from dalle_repro.core.cpuinfo import X86_LEVELS, cpu_flags, cpu_model, cpu_record, read_cpuinfo, x86_level

V1 = {"lm", "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"}
V2 = V1 | set(X86_LEVELS["v2"])
V3 = V2 | set(X86_LEVELS["v3"])
V4 = V3 | set(X86_LEVELS["v4"])


@pytest.mark.parametrize(
    "flags, level",
    [
        (V1, "x86-64-v1"),
        (V2, "x86-64-v2"),
        (V3, "x86-64-v3"),
        (V4, "x86-64-v4"),
        (V4 - {"abm"}, "x86-64-v2"),  # no LZCNT: not v3, so not v4 either, whatever AVX-512 it has
        (V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq"}, "x86-64-v3"),  # no avx512vl
        ({"fp", "asimd", "bf16"}, None),  # an Arm CPU
        (set(), None),
    ],
)
def test_x86_level_needs_every_flag_of_each_level(flags, level):
    assert x86_level(flags) == level


def test_cpuinfo_text_gives_the_first_processors_model_and_flags(tmp_path):
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  9654 96-Core Processor\n"
        f"flags\t\t: {' '.join(sorted(V4 | {'avx512_bf16'}))}\n\n"
        "processor\t: 1\nmodel name\t: something else\nflags\t\t: lm\n"
    )
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    info = read_cpuinfo(path)
    assert cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
    assert "avx512_bf16" in cpu_flags(info) and x86_level(cpu_flags(info)) == "x86-64-v4"
    assert read_cpuinfo(tmp_path / "missing") == {}
    assert cpu_model({}) != ""  # falls back to what the platform module knows


def test_cpu_record_describes_this_machine():
    r = cpu_record()
    assert {"cpu", "arch", "isa_level", "bf16_isa", "aten_cpu_capability", "torch", "threads"} <= set(r)
    assert r["torch"] and r["threads"] >= 1 and isinstance(r["bf16_isa"], list)
    if r["arch"] == "x86_64":
        assert r["isa_level"] in {f"x86-64-v{i}" for i in range(1, 5)}
