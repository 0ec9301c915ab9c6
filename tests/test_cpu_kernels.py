"""The compiled CPU kernel's build, cache and fallback (its numbers are tested in test_attention.py)."""

from __future__ import annotations

import math
import os
import platform
import warnings

import pytest
import torch

from dalle_repro.kernels import cpu as cpu_kernels
from dalle_repro.models.attention import attend
from dalle_repro.models.masks import MaskSpec


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
    """Loading must not switch the process to flush-to-zero (a library linked with -ffast-math
    carries crtfastmath), which would change every later float op, PyTorch's and numpy's."""
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
    from dalle_repro.models.dvae import _GumbelSoftmaxKL

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
    from dalle_repro.models.dvae import gumbel_softmax_kl

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
    from dalle_repro.models.dvae import gumbel_softmax_kl

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

    code = "from dalle_repro.kernels import cpu as cpu_kernels; lib = cpu_kernels.load(); print(lib.dr_abi_version())"
    env = os.environ | {cpu_kernels.CACHE: str(fresh)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(cpu_kernels.ABI_VERSION)] * 2
    assert [p.name for p in fresh.iterdir()] == [cpu_kernels.library_path().name]


# ------------------------------------------------------------------------------------------
# The noise at its extremes, and the same bits from a build for any x86-64 level

M64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(seed: int, i: int) -> int:
    """csrc/gumbel_softmax.cpp's mix(): the 64 random bits of element i (splitmix64)."""
    x = (seed + (i + 1) * GOLDEN) & M64
    x = ((x ^ (x >> 30)) * MIX1) & M64
    x = ((x ^ (x >> 27)) * MIX2) & M64
    return x ^ (x >> 31)


def _seed_for(bits: int, i: int) -> int:
    """The seed whose element i gets exactly ``bits``: splitmix64's finaliser is a bijection, undone
    step by step (xor-shifts by repeated application, products by the modular inverse)."""

    def unshift(y: int, s: int) -> int:
        x = y
        for _ in range(64 // s + 1):
            x = y ^ (x >> s)
        return x

    x = unshift(bits, 31)
    x = unshift((x * pow(MIX2, -1, 1 << 64)) & M64, 27)
    x = unshift((x * pow(MIX1, -1, 1 << 64)) & M64, 30)
    return (x - (i + 1) * GOLDEN) & M64


# the generator's extreme outputs: the top and bottom bins of the 23 bits kept, and their edges
EXTREME_BITS = [0, 1, (1 << 41) - 1, 1 << 41, M64 - (1 << 41) + 1, M64 - (1 << 40), M64 - 1, M64]


def _noise_of_bits(lib, bits: list[int]) -> torch.Tensor:
    raw = torch.tensor([b - (1 << 64) if b >= 1 << 63 else b for b in bits], dtype=torch.int64)
    out = torch.empty(len(bits))
    lib.dr_gumbel_of_bits(len(bits), cpu_kernels.pointer(raw), cpu_kernels.pointer(out))
    return out


def test_the_seed_inversion_reaches_any_bits():
    for bits in (*EXTREME_BITS, 0x0123456789ABCDEF):
        for i in (0, 7, 511):
            assert _mix(_seed_for(bits, i), i) == bits


def test_gumbel_noise_is_finite_at_its_extreme_random_bits():
    """The top bin used to give u = 1.0 exactly (16777215.5 is not a float32) and noise +inf."""
    lib = cpu_kernels.load()
    g = _noise_of_bits(lib, EXTREME_BITS)
    assert torch.isfinite(g).all(), g
    top = -math.log(-math.log1p(-(2.0**-24)))  # u = 1 - 2^-24, the largest the generator makes
    bottom = -math.log(-math.log(2.0**-24))  # u = 2^-24, the smallest
    assert g.max().item() == pytest.approx(top, rel=1e-5) and g.max().item() < 17
    assert g.min().item() == pytest.approx(bottom, rel=1e-5)
    # the old 24-bit formula, in float32 as the kernel computed it: the top bin rounds to 1.0
    import numpy as np

    old_top = (np.float32(float(M64 >> 40)) + np.float32(0.5)) * np.float32(1 / 16777216)
    assert old_top == np.float32(1.0)


def test_a_seed_that_hits_the_top_bin_gives_a_finite_sample():
    """Seeds made to give element 3 of row 1 (and element 0) the largest and smallest random
    bits: the noise, the relaxed sample and its gradient stay finite, through the real path."""
    from dalle_repro.models.dvae import _GumbelSoftmaxKL

    lib = cpu_kernels.load()
    V = 64
    for bits in (M64, 0):
        for i in (0, V + 3):
            seed = _seed_for(bits, i)
            noise = _noise(lib, (2 * V,), seed)
            assert torch.isfinite(noise).all()
            lg = torch.randn(2, V, requires_grad=True)
            z, kl = _GumbelSoftmaxKL.apply(lg, 1 / 16, seed, lib)
            assert torch.isfinite(z).all() and torch.isfinite(kl).all()
            assert torch.allclose(z.sum(-1), torch.ones(2))
            (grad,) = torch.autograd.grad((z * torch.randn(2, V)).sum() + kl.sum(), lg)
            assert torch.isfinite(grad).all()


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {f for ln in text.splitlines() if ln.startswith("flags") for f in ln.split(":", 1)[1].split()}


def _kernel_outputs(lib) -> list[torch.Tensor]:
    """Forward and backward of both kernels, float32, on fixed inputs."""
    from dalle_repro.models.attention import _key_lists
    from dalle_repro.models.masks import MaskSpec

    gen = torch.Generator().manual_seed(0)
    rows, V = 300, 512
    lg = 4 * torch.randn(rows, V, generator=gen)
    z, kl = torch.empty(rows, V), torch.empty(rows)
    ptr = cpu_kernels.pointer
    lib.dr_gumbel_softmax_kl_forward(rows, V, ptr(lg), 1 / 16, 12345, ptr(z), ptr(kl), 2)
    d_z, d_kl, d_lg = torch.randn(rows, V, generator=gen), torch.randn(rows, generator=gen), torch.empty(rows, V)
    lib.dr_gumbel_softmax_kl_backward(rows, V, ptr(lg), ptr(z), ptr(d_z), 1 / 16, ptr(d_kl), ptr(d_lg), 2)
    outs = [z, kl, d_lg, _noise(lib, (4096,), 7)]
    # the attention kernel on the conv mask (listed keys with empty slots, text keys, PB-relax)
    spec = MaskSpec("conv", 6, 8, conv_kernel=5)
    idx = _key_lists(spec)
    bh, n, d, t, kmax = 3, spec.n, 64, spec.text_len, idx.shape[1]
    q, k, v, d_out = (torch.randn(bh, n, d, generator=gen) for _ in range(4))
    text, p = torch.randn(bh, n, t, generator=gen), torch.empty(bh, n, kmax)
    out = torch.empty(bh, n, d)
    lib.dr_local_forward_f32(bh, n, d, kmax, t, ptr(q), ptr(k), ptr(v), ptr(idx), ptr(text), ptr(p), ptr(out), 2.0, 2)
    g_text = torch.randn(bh, n, t, generator=gen)
    dq, dk, dv = torch.zeros(bh, n, d), torch.zeros(bh, n, d), torch.zeros(bh, n, d)
    args = (ptr(q), ptr(k), ptr(v), ptr(idx), ptr(p), ptr(text), ptr(d_out), ptr(g_text), ptr(dq), ptr(dk), ptr(dv))
    lib.dr_local_backward_f32(bh, n, d, kmax, t, *args, 2.0, 2)
    return [*outs, text, p, out, g_text, dq, dk, dv]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_a_build_for_another_x86_level_gives_the_same_bits(march, tmp_path, monkeypatch):
    """The library built for AVX2 only (x86-64-v3) and for the x86-64 baseline (SSE2, no FMA)
    computes bit for bit what the native build (AVX-512 where the CPU has it) computes."""
    if march == "x86-64-v3" and not {"avx2", "fma", "bmi2"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an x86-64-v3 build")
    monkeypatch.setenv(cpu_kernels.CACHE, str(tmp_path))
    native, other = cpu_kernels.load_build("native"), cpu_kernels.load_build(march)
    assert native._name != other._name
    for i, (a, b) in enumerate(zip(_kernel_outputs(native), _kernel_outputs(other), strict=True)):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"output {i} differs: max {(a - b).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def emoji32(tmp_path_factory: pytest.TempPathFactory):
    """The emoji at 32x32, as the demo dVAE sees them (a few hundred, decoded once)."""
    from dalle_repro.data.emoji import EMOJI_TEST_PATH, FONT_PATH, build_emoji_dataset
    from dalle_repro.data.loader import DataArgs, Loader

    if not (os.path.isfile(FONT_PATH) and os.path.isfile(EMOJI_TEST_PATH)):
        pytest.skip("needs Debian's fonts-noto-color-emoji and unicode-data")
    out = tmp_path_factory.mktemp("emoji32")
    build_emoji_dataset(out, image_size=32, shard_size=256, val_fraction=0.0, limit=512)
    shards = sorted(str(p) for p in out.glob("**/*.tar"))
    loader = Loader(shards, DataArgs(image_size=32, batch_size=256, num_workers=0, shuffle=False), epochs=1)
    return torch.cat([b["image"] for b in loader]).float().div_(255)


@pytest.mark.parametrize("kernel", ["on", "off"])
def test_demo_dvae_skips_no_update_in_fp32(emoji32, kernel, monkeypatch):
    """100 fp32 updates of the demo dVAE (narrowed to n_hid 16 for time) on the emoji: no update
    is skipped for a non-finite gradient. With the old noise about one step in 16 was (2048 rows
    of 512 codes a step, one draw in 2^24 infinite): about 6 of these 100, and none at all with
    probability (15/16)^100 = 0.2%. (300 updates made that 4e-9 and cost the suite a minute more.)"""
    from dalle_repro.core.config import load_config
    from dalle_repro.models.dvae import DVAE
    from dalle_repro.train.dvae import DVAETrainConfig, State, train_step
    from dalle_repro.train.optim import EMA, adamw

    monkeypatch.setenv(cpu_kernels.SWITCH, kernel)
    cfg = load_config(
        DVAETrainConfig,
        "configs/demo/emoji-dvae.yaml",
        ["model.n_hid=16", "precision.dtype=fp32", "data.batch_size=32"],
    )
    torch.manual_seed(0)
    model = DVAE(cfg.model).to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = adamw(model, cfg.schedule.lr_start, (o.beta1, o.beta2), o.eps, o.weight_decay)
    st = State(model, model, opt, EMA(model, o.ema_decay), None, None)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(emoji32), (32,), generator=gen)
        train_step(st, emoji32[idx].contiguous(memory_format=torch.channels_last), cfg, torch.device("cpu"))
    assert st.step == 100
    assert st.counters.skipped_steps == 0


# ------------------------------------------------------------------------------------------
# The boundary: nothing the kernels cannot read crosses it


def _list_attention(q, k, v, keys=None, text_len=None):
    from dalle_repro.models.attention import _key_lists, _ListAttention
    from dalle_repro.models.masks import MaskSpec

    spec = MaskSpec("conv", 4, 4, conv_kernel=3)
    keys = _key_lists(spec) if keys is None else keys
    t = spec.text_len if text_len is None else text_len
    return _ListAttention.apply(q, k, v, keys, t, 0.125, None, cpu_kernels.load())


@pytest.mark.parametrize(
    "what, k_shape, match",
    [
        ("another batch", (2, 2, 20, 8), "share shape"),  # used to return NaN
        ("another length", (1, 2, 12, 8), "share shape"),  # used to read past k's end
        ("another head size", (1, 2, 20, 4), "share shape"),
        ("3-d", (2, 20, 8), "4-d"),
    ],
)
def test_attention_kernel_refuses_mismatched_operands(what, k_shape, match):
    q, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    k = torch.randn(*k_shape)
    with pytest.raises(ValueError, match=match):
        _list_attention(q, k, v)


def test_attention_kernel_refuses_bad_key_lists_and_text_len():
    from dalle_repro.models.attention import _key_lists
    from dalle_repro.models.masks import MaskSpec

    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    keys = _key_lists(MaskSpec("conv", 4, 4, conv_kernel=3))
    with pytest.raises(ValueError, match="outside"):
        _list_attention(q, k, v, keys=keys.clone().fill_(20))  # a position past the sequence
    with pytest.raises(ValueError, match="int32"):
        _list_attention(q, k, v, keys=keys.long())
    with pytest.raises(ValueError, match="int32"):
        _list_attention(q, k, v, keys=keys[:10])
    with pytest.raises(ValueError, match="text_len"):
        _list_attention(q, k, v, text_len=21)
    with pytest.raises(ValueError, match="dtype"):
        _list_attention(q, k.double(), v)
    out = _list_attention(q, k, v)  # and the well-formed call still runs
    assert torch.isfinite(out).all()


def test_gumbel_kernel_refuses_what_it_cannot_read():
    from dalle_repro.models.dvae import _GumbelSoftmaxKL

    lib = cpu_kernels.load()
    for bad in (torch.randn(4, 16).double(), torch.randn(16, 4).t(), torch.randn(4, 0)):
        with pytest.raises(ValueError, match="gumbel kernel"):
            _GumbelSoftmaxKL.apply(bad, 1.0, 0, lib)
    with pytest.raises(ValueError, match="tau"):
        _GumbelSoftmaxKL.apply(torch.randn(4, 16), 0.0, 0, lib)


def test_a_new_cache_folder_is_private(tmp_path, monkeypatch):
    cache = tmp_path / "a" / "kernels"
    monkeypatch.setenv(cpu_kernels.CACHE, str(cache))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.load() is not None
    assert cache.stat().st_mode & 0o777 == 0o700
    assert cpu_kernels.library_path().stat().st_mode & 0o022 == 0


def test_a_zero_byte_cached_library_is_built_anew(fresh):
    """It used to keep the kernels off for good: the file existed, so it was never rebuilt."""
    path = cpu_kernels.library_path()
    path.write_bytes(b"")
    assert cpu_kernels.load() is not None
    assert path.stat().st_size > 0


def test_a_library_others_may_write_is_not_loaded_as_it_is(fresh):
    path = cpu_kernels.library_path()
    path.write_bytes(b"planted: not the library we built")
    path.chmod(0o666)
    assert cpu_kernels.load() is not None  # built anew over it
    assert b"planted" not in path.read_bytes() and path.stat().st_mode & 0o022 == 0


def test_a_cache_folder_others_may_write_turns_the_kernels_off(fresh):
    fresh.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="writable by others"):
        assert cpu_kernels.load() is None
    assert not list(fresh.glob("*.so"))
