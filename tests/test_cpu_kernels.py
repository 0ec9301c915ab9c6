"""The compiled CPU kernel's build, cache and fallback (its numbers are tested in test_attention.py)."""

from __future__ import annotations

import math
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
    monkeypatch.setattr(cpu_kernels, "SOURCES", (bad,))
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


# ------------------------------------------------------------------------------------------
# The dVAE's fused Gumbel-softmax + KL (dvae.gumbel_softmax_kl)


def _noise(lib, shape, seed):
    out = torch.empty(shape)
    lib.dr_gumbel_noise(out.numel(), seed, cpu_kernels.pointer(out))
    return out


def _reference(lg, g, tau):
    z = torch.softmax((lg + g) / tau, dim=-1)
    log_q = torch.log_softmax(lg, dim=-1)
    kl = (log_q.exp() * (log_q + math.log(lg.shape[-1]))).sum(-1)
    return z, kl


def test_gumbel_noise_has_the_gumbel_moments():
    lib = cpu_kernels.load()
    g = _noise(lib, (1 << 20,), seed=123).double()
    assert abs(g.mean().item() - 0.5772) < 0.005  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.01
    assert not torch.equal(g[:1000], _noise(lib, (1000,), seed=124).double())


@pytest.mark.parametrize("tau", [1.0, 1 / 16])
def test_fused_gumbel_softmax_kl_matches_the_formulas_forward_and_backward(tau):
    from dalle_repro.dvae import _GumbelSoftmaxKL

    lib = cpu_kernels.load()
    gen = torch.Generator().manual_seed(0)
    lg = (3 * torch.randn(2, 3, 4, 37, generator=gen)).requires_grad_()
    d_z, d_kl = torch.randn(2, 3, 4, 37, generator=gen), torch.randn(2, 3, 4, generator=gen)
    z, kl = _GumbelSoftmaxKL.apply(lg, tau, 99, lib)
    grad = torch.autograd.grad((z * d_z).sum() + (kl * d_kl).sum(), lg)[0]
    z_ref, kl_ref = _reference(lg, _noise(lib, lg.shape, 99), tau)
    grad_ref = torch.autograd.grad((z_ref * d_z).sum() + (kl_ref * d_kl).sum(), lg)[0]
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(kl, kl_ref, atol=1e-5)
    assert torch.allclose(grad, grad_ref, atol=1e-4, rtol=1e-4)


def test_fused_gumbel_softmax_follows_the_torch_seed_not_the_thread_count():
    from dalle_repro.dvae import gumbel_softmax_kl

    lg = torch.randn(4, 8, 8, 64)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n_threads, seed in ((1, 5), (2, 5), (2, 6)):
            torch.set_num_threads(n_threads)
            torch.manual_seed(seed)
            runs.append(gumbel_softmax_kl(lg, 0.5)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[1], runs[2])


def test_gumbel_softmax_kl_fallback_gives_the_same_kl(monkeypatch):
    from dalle_repro.dvae import gumbel_softmax_kl

    lg = torch.randn(2, 4, 4, 32)
    z_fast, kl_fast = gumbel_softmax_kl(lg, 0.5)
    monkeypatch.setenv(cpu_kernels.SWITCH, "off")
    z_slow, kl_slow = gumbel_softmax_kl(lg, 0.5)
    assert torch.allclose(kl_fast, kl_slow, atol=1e-5)
    for z in (z_fast, z_slow):
        assert torch.allclose(z.sum(-1), torch.ones(2, 4, 4), atol=1e-5) and (z >= 0).all()


def test_ranks_that_start_together_build_and_load_one_library(fresh):
    """Two processes building into the same empty cache at once (as DeepSpeed's ranks do) both
    load a whole library: each compiles to its own temporary file and renames it into place."""
    import os
    import subprocess
    import sys

    code = "from dalle_repro import cpu_kernels; lib = cpu_kernels.load(); print(lib.dr_abi_version())"
    env = os.environ | {cpu_kernels.CACHE: str(fresh)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(cpu_kernels.ABI_VERSION)] * 2
    assert [p.name for p in fresh.iterdir()] == [cpu_kernels.library_path().name]
