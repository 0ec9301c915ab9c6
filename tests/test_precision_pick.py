"""precision: auto: what it picks on which device, and why; the warning for a slow explicit bf16.

The CPU's bf16 flags and the measured probe are replaced by stand-ins, so each case runs here
whatever this machine's CPU is; one test runs the real probe.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dalle_repro.core import precision
from dalle_repro.core.config import ConfigError
from dalle_repro.core.precision import (
    BF16_MIN_SPEEDUP,
    MatmulProbe,
    PrecisionArgs,
    auto_precision,
    autocast_dtype,
    cpu_matmul_probe,
    pick_precision,
)
from dalle_repro.models.transformer import Transformer, TransformerArgs

NATIVE = MatmulProbe(256, 1, fp32_gflops=90.0, bf16_gflops=180.0)  # what this project's EPYC measures
EMULATED = MatmulProbe(256, 1, fp32_gflops=45.0, bf16_gflops=0.9)  # bf16 without AVX512-BF16 / AMX


@pytest.fixture
def cpu(monkeypatch):
    """A CPU whose bf16 flags and probe the test sets: ``cpu(isa, probe, x86=True)``."""
    calls = []

    def make(isa: list[str], probe: MatmulProbe, x86: bool = True) -> list[int]:
        monkeypatch.setattr(precision, "is_x86", lambda: x86)
        monkeypatch.setattr(precision, "torch_bf16_isa", lambda: list(isa))
        monkeypatch.setattr(precision, "describe_cpu", lambda: "Test CPU 9000, x86-64-v4")

        def probe_fn() -> MatmulProbe:
            calls.append(1)
            return probe

        monkeypatch.setattr(precision, "cpu_matmul_probe", probe_fn)
        return calls

    precision._auto.cache_clear()
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    yield make
    precision._auto.cache_clear()  # the next test measures this machine again


def test_no_native_bf16_flags_picks_fp32_with_the_measured_reason(cpu):
    cpu([], EMULATED)
    pick = pick_precision("auto", "cpu", "run.precision")
    assert pick.dtype == "fp32"
    assert pick.reason == (
        "run.precision=auto picked fp32: this CPU (Test CPU 9000, x86-64-v4) has no native bf16 "
        "(no AVX512-BF16 or AMX; bf16 matmul measured 0.02x fp32)"
    )


def test_native_flags_but_a_slow_probe_picks_fp32(cpu):
    cpu(["AVX512-BF16"], MatmulProbe(256, 1, fp32_gflops=90.0, bf16_gflops=0.5 * 90))
    pick = auto_precision("cpu")
    assert pick.dtype == "fp32"
    assert "reports AVX512-BF16, but bf16 matmul measured 0.5x fp32" in pick.reason


def test_native_flags_and_a_fast_probe_pick_bf16(cpu):
    cpu(["AVX512-BF16", "AMX"], NATIVE)
    pick = pick_precision("auto", "cpu", "precision.dtype")
    assert pick.dtype == "bf16"
    assert pick.reason == (
        "precision.dtype=auto picked bf16: this CPU (Test CPU 9000, x86-64-v4) has AVX512-BF16 and AMX; "
        "bf16 matmul measured 2x fp32"
    )


def test_the_threshold_sits_between_the_two_kinds_of_cpu(cpu):
    just_below = MatmulProbe(256, 1, 100.0, 100.0 * BF16_MIN_SPEEDUP * 0.99)
    cpu(["AMX"], just_below)
    assert auto_precision("cpu").dtype == "fp32"
    precision._auto.cache_clear()
    cpu(["AMX"], MatmulProbe(256, 1, 100.0, 100.0 * BF16_MIN_SPEEDUP))
    assert auto_precision("cpu").dtype == "bf16"


@pytest.mark.parametrize("probe, dtype", [(NATIVE, "bf16"), (EMULATED, "fp32")])
def test_a_cpu_that_is_not_x86_is_decided_by_the_probe_alone(cpu, probe, dtype):
    cpu(["AVX512-BF16"], probe, x86=False)  # flags that an Arm CPU never reports: ignored
    pick = auto_precision("cpu")
    assert pick.dtype == dtype and "AVX512" not in pick.reason and "bf16 matmul measured" in pick.reason


def test_the_pick_is_made_once_per_process(cpu):
    calls = cpu(["AVX512-BF16"], NATIVE)
    assert {pick_precision("auto", "cpu").dtype for _ in range(5)} == {"bf16"}
    assert auto_precision(torch.device("cpu")).dtype == "bf16"
    assert len(calls) == 1


def test_explicit_bf16_on_a_cpu_without_it_warns_once_with_the_slowdown(cpu):
    cpu([], EMULATED)
    with pytest.warns(RuntimeWarning) as record:
        pick = pick_precision("bf16", "cpu", "run.precision")
    assert pick.dtype == "bf16"  # it runs, as asked
    [w] = record
    msg = str(w.message)
    assert "run.precision=bf16" in msg and "Test CPU 9000" in msg
    assert "bf16 matmul runs at 0.9 GFLOP/s here against 45 GFLOP/s in fp32 (50x slower)" in msg
    assert "50x slower" in pick.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert pick_precision("bf16", "cpu", "run.precision").dtype == "bf16"


def test_explicit_bf16_where_it_is_native_and_explicit_fp32_do_not_warn(cpu):
    cpu(["AVX512-BF16"], NATIVE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_precision("bf16", "cpu", "k").reason == "k=bf16 (set in the config)"
    cpu([], EMULATED)
    precision._auto.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_precision("fp32", "cpu", "k").dtype == "fp32"


def test_fp16_on_a_cpu_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^precision.dtype: fp16 needs CUDA"):
        pick_precision("fp16", "cpu", "precision.dtype")
    with pytest.raises(ConfigError, match="run.precision: got 'fp8'"):
        pick_precision("fp8", "cpu", "run.precision")


@pytest.mark.parametrize("native, dtype", [(True, "bf16"), (False, "fp32")])
def test_cuda_is_decided_by_its_native_bf16(monkeypatch, native, dtype):
    seen = {}

    def supported(including_emulation: bool = True) -> bool:
        seen["emulation"] = including_emulation
        return native

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    precision._auto.cache_clear()
    try:
        pick = auto_precision("cuda:0")
    finally:
        precision._auto.cache_clear()
    assert pick.dtype == dtype and "Test GPU" in pick.reason
    assert seen["emulation"] is False  # emulated bf16 (pre-Ampere) does not count


def test_the_real_probe_measures_both_dtypes_and_restores_the_threads():
    threads = torch.get_num_threads()
    probe = cpu_matmul_probe.__wrapped__()  # uncached: a fresh measurement
    assert probe.size == 256 and probe.threads == 1
    assert probe.fp32_gflops > 0 and probe.bf16_gflops > 0
    assert torch.get_num_threads() == threads
    pick = auto_precision("cpu")
    assert pick.dtype in ("fp32", "bf16") and pick.reason.startswith(pick.dtype + ": this CPU (")


def test_auto_must_be_resolved_before_it_reaches_autocast(cpu):
    with pytest.raises(ValueError, match="pick_precision"):
        autocast_dtype("auto")  # type: ignore[arg-type]
    cpu([], EMULATED)
    args = dict(dim=32, depth=1, heads=4, text_len=6, text_vocab=40, grid=4, image_vocab=24, conv_kernel=3)
    m = Transformer(TransformerArgs(**args))
    assert m.enable_precision(PrecisionArgs()).args.dtype == "fp32"  # the default, auto, resolved here
    precision._auto.cache_clear()
    cpu(["AMX"], NATIVE)
    assert m.enable_precision(PrecisionArgs(dtype="auto")).args.dtype == "bf16"
