"""The compiled CPU kernel's build, cache and fallback (its numbers are tested in test_attention.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dalle_repro import cpu_kernels
from dalle_repro.attention import MaskSpec, attend


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty kernel cache in tmp_path, and no library loaded yet in this process's view."""
    monkeypatch.setenv(cpu_kernels.CACHE, str(tmp_path))
    monkeypatch.delenv(cpu_kernels.SWITCH, raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    return tmp_path


def test_builds_once_into_its_cache(fresh, monkeypatch):
    lib = cpu_kernels.load()
    assert lib is not None and lib.dr_abi_version() == cpu_kernels.ABI_VERSION
    built = sorted(fresh.iterdir())
    assert built == [cpu_kernels.library_path()]  # no temporary file left beside it
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_state", {})

    def no_build(path):
        raise AssertionError("rebuilt a cached kernel")

    monkeypatch.setattr(cpu_kernels, "build", no_build)
    assert cpu_kernels.load() is not None
    assert built[0].stat().st_mtime_ns == stamp


def test_library_name_follows_source_flags_and_cpu(fresh, monkeypatch):
    base = cpu_kernels.library_path()
    monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-g"))
    with_flags = cpu_kernels.library_path()
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "another cpu")
    other_cpu = cpu_kernels.library_path()
    assert len({base, with_flags, other_cpu}) == 3
    assert base.parent == fresh


def test_compiler_error_names_the_source_and_leaves_nothing(fresh, monkeypatch):
    bad = fresh / "src" / "broken.cpp"
    bad.parent.mkdir()
    bad.write_text("int main( {\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", bad)
    target = fresh / "out" / "broken.so"
    with pytest.raises(RuntimeError, match="failed on broken.cpp"):
        cpu_kernels.build(target)
    assert list(target.parent.iterdir()) == []


def test_no_compiler_warns_once_and_local_attention_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-dalle-repro")
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert cpu_kernels.load() is None
    spec = MaskSpec("conv", 3, 5, conv_kernel=3)
    q, k, v = (torch.randn(1, 2, spec.n, 8, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        out = attend(q, k, v, spec, "local")
    assert torch.allclose(out, attend(q, k, v, spec, "dense"), atol=1e-10)
    assert not list(fresh.glob("*.so"))


@pytest.mark.parametrize("value", ["off", "0", "false"])
def test_switch_turns_the_kernel_off(fresh, monkeypatch, value):
    monkeypatch.setenv(cpu_kernels.SWITCH, value)
    assert cpu_kernels.load() is None
    assert not list(fresh.iterdir())


def test_pointer_refuses_what_the_kernel_cannot_read():
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.pointer(torch.zeros(4, 4).t())


def test_loading_keeps_subnormals(fresh):
    """Built with -ffast-math but not linked with it: loading must not switch the process to
    flush-to-zero (crtfastmath), which would change every later float op, PyTorch's and numpy's."""
    import numpy as np

    assert cpu_kernels.load() is not None
    assert np.float32(1e-38) / np.float32(100) > 0
    assert (torch.tensor([1e-38]) / 100).item() > 0
