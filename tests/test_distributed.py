"""dalle_repro.distributed: device picking and the CPU allocator tuning."""

import os
import platform

import pytest
import torch

from dalle_repro import distributed


def test_pick_device_rejects_unknown_names():
    with pytest.raises(ValueError, match="'tpu'"):
        distributed.pick_device("tpu")
    assert distributed.pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("DALLE_REPRO_MALLOC", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    assert distributed.tune_cpu_allocator() == {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}


@pytest.mark.parametrize(
    "var,value", [("DALLE_REPRO_MALLOC", "off"), ("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")]
)
def test_allocator_tuning_steps_aside_when_the_user_chose(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert distributed.tune_cpu_allocator() == {}
