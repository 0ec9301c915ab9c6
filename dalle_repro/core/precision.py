"""The paper's mixed-precision *compute* (SPEC §3): fp32 residual stream, half-precision resblocks,
and per-resblock gradient scaling with a non-finite filter (``precision.mode=block_scaled``).

[departure] Not the paper's *storage*: the paper keeps parameters and Adam moments in 16 bits
(gains, biases, embeddings and unembeddings in fp32); here every weight, gradient and moment is
fp32 (16 bytes per parameter with Adam's two moments). ``tools/memory_table.py`` prints what the
paper's storage would take beside it. The mode is named ``block_scaled``, not ``paper``, because
only the compute is the paper's.

Each residual branch (a block's attention and its MLP: each is a "resblock" here) runs under
autocast in fp16 or bf16 while the residual stream, the parameters (gains, biases, embeddings)
and the logits stay fp32. In the backward pass, for branch j with scale s_j:

1. the gradient arriving at the branch output is multiplied by s_j (so that small fp16 gradients
   do not underflow inside the branch);
2. the branch's backward runs in half precision;
3. non-finite values in the gradient leaving the branch are replaced by 0 (the filter), and it is
   divided by s_j before it joins the fp32 residual gradient.

The branch's parameter gradients carry the factor s_j too. A hook on each parameter divides it
out and filters non-finite values as the gradient is produced, before any optimizer or DeepSpeed
sees it, so the same code works at every ZeRO stage and under gradient accumulation. The hooks
also raise a per-branch flag; :meth:`BlockScaler.end_step` reads the flags (agreed across ranks),
skips the flagged branches' updates (their grads are set to None, which torch's optimisers skip)
while every other branch updates, and applies the scale rule. Scale rule: s_j starts at
2^13; a finite step multiplies it by 2^(1/1000); a non-finite one divides it by sqrt(2), at most
once per 125 updates; s_j stays within [2^7, 2^24].

The factor M. SPEC §3 (after the paper) starts the scales at M * 2^13 and clamps them to
[M * 2^7, M * 2^24], M the data-parallel ranks, because there the loss of each rank is its sum
divided by the *global* batch: a rank's gradient is 1/M of a one-rank run's on the same global
batch, and M * s puts the half-precision gradients inside a block back in one rank's range. Here
each rank's loss is the mean over its *own* micro-batch (DeepSpeed averages the ranks' gradients
after the hooks have run, and divides by the accumulation steps G as the paper's global-batch
divisor does), so a rank's gradient already has one rank's range and the same s keeps it there:
``mean_local * s`` equals ``(sum_local / B_global) * (M * s)`` up to the factor G both share. So
the scales carry no M, the rule above is SPEC's rule in SPEC's units, and at M ranks the scales,
and the overflows they cause, follow one rank's on the same global batch (tests/test_exact_skip.py).
With the factor the scales of a 256-rank run started 256x too high and, at one decrease per 125
updates, took some 2,000 updates of skipped blocks to come down.
In bf16 and fp32 there is no scaling (s_j = 1) but the filter and the per-branch skip stay: there
they catch a NaN or inf from bad data or a diverging run rather than an fp16 overflow. Parameters
outside the branches (embeddings, heads, the final LayerNorm) get the filter and a flag of their own.

The filter costs what it must: where a gradient is finite (nearly always) a hook reads it once
(one reduction) and, with s_j = 1 on a CPU, hands it back as it is; only a non-finite gradient
is copied with its non-finite values zeroed. :class:`BlockScaler` lists the cost of each mode.

The skip is exact at every ZeRO stage: at stage 0 the skipped branches' gradients are dropped
(``drop_grads``), at stages 1-3 :func:`dalle_repro.train.exact_skip.step_without` puts their weights and
Adam moments back after DeepSpeed's step (the one exception, Adam's step counter, is shared by a
flat group there; that module says what it changes).

This works with or without DeepSpeed: it is ordinary autograd hooks and a step-time function.

``auto``, the default precision of every trainer and of sampling, is decided once per process by
:func:`pick_precision`: bf16 where the device runs it natively and fast (see :func:`auto_precision`),
fp32 otherwise. The configs keep ``auto``, so a run resumed or sampled on another machine picks again.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as torch_dist

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.core.cpuinfo import describe_cpu, is_x86, torch_bf16_isa

Precision = Literal["fp32", "bf16", "fp16"]  # what runs
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]  # what a config may ask for

# ----------------------------------------------------------------------------------------------
# Denormals


def flushing_denormals() -> bool:
    """Whether this thread flushes denormals now: half of the smallest normal double is denormal,
    and comes out zero where the flush-to-zero flag is set (x86's MXCSR, Arm's FPCR)."""
    return sys.float_info.min / 2 == 0.0


@contextlib.contextmanager
def denormals_flushed() -> Iterator[bool]:
    """Treat denormal floats (below 1.2e-38 in fp32 and bf16) as zero while the block runs (also a
    decorator); yields whether the CPU supports it (x86 with SSE3, Arm). Every trainer and the demo
    run under it.

    A trained dVAE's encoder gives some of its unused codes' logits gradients around 1e-39 (the
    Gumbel softmax at a low temperature: 0.14% of the demo dVAE's gradient entries at update 3000),
    and x86 CPUs take a slow path on each denormal operand: on an Intel Xeon (family 6 model 207)
    the demo dVAE's updates from that checkpoint on its own images took 1.3x as long with denormals
    kept (median of five rounds' ratios, 1.28-1.81; ``bench/denormals.py``, docs/demo.md
    "Denormals"). Values that small move no update measurably.

    The flag is per thread, and a thread inherits it when it starts: PyTorch's intra-op threads
    started inside the block flush for the rest of the process (they run only PyTorch's kernels),
    those started before it do not (then only this thread's share of the work is spared: a process
    that ran a parallel op first, a notebook, gets part of the gain). This thread gets its setting
    back at the end, because the flag also changes Python's own float arithmetic here.
    """
    before = flushing_denormals()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if not before:
            torch.set_flush_denormal(False)


# ----------------------------------------------------------------------------------------------
# Picking the precision

# bf16 is picked on a CPU only if a bf16 matmul runs at least this fast relative to fp32. The two
# kinds of CPU sit far apart: with native bf16 (AVX512-BF16, AMX; Arm's BF16 extension) a 256^3
# bf16 matmul runs 1.5-2.5x as fast as fp32 (1.8-2.0x on this project's AMD EPYC); without it PyTorch
# runs bf16 through a slow path at about 0.02x (50x slower). 0.8 is a factor of ~2 below the
# slowest native case and 40x above the emulated one, so a noisy machine cannot flip the verdict.
BF16_MIN_SPEEDUP = 0.8
PROBE_SIZE = 256  # 34 MFLOP: 37 ms where bf16 runs at 0.9 GFLOP/s, 0.2-1 ms where it is native
PROBE_REPEATS = 5


@dataclass(frozen=True)
class MatmulProbe:
    """The best of a few ``size``^3 matmuls per dtype, on ``threads`` threads (GFLOP/s)."""

    size: int
    threads: int
    fp32_gflops: float
    bf16_gflops: float

    @property
    def speedup(self) -> float:
        """bf16's speed over fp32's (2.0: bf16 runs twice as fast)."""
        return self.bf16_gflops / self.fp32_gflops


@dataclass(frozen=True)
class Pick:
    """The precision that runs and why, e.g. ``bf16: this CPU (...) has AVX512-BF16; ...``."""

    dtype: Precision
    reason: str


@functools.cache
def cpu_matmul_probe(size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> MatmulProbe:
    """bf16 against fp32 matmul speed on this CPU, on one thread (measured once per process).

    One thread, whatever the process uses: the ratio is a property of the instructions, and on a
    loaded machine a multi-threaded 0.2 ms product waits at the thread barrier for a descheduled
    thread. Measured on this project's 2-core machine under load: 2 threads gave 1.4-1.7 GFLOP/s
    in fp32 (100x below the quiet figure) and bf16/fp32 ratios from 1.7 to 6.1 in five probes;
    1 thread gave 93-100 GFLOP/s and 1.98-2.05 in the same minute. fp32 and bf16 alternate, so that
    a burst of load slows both alike, and the best time of each counts. Where bf16 is already 10x
    slower after two tries, it is not repeated: the verdict is clear and each try may take 40 ms.
    """
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        t = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - t

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            seconds(a32, b32), seconds(a16, b16)  # warm-up: kernel selection, first-touch pages
            best32 = best16 = math.inf
            for i in range(repeats):
                best32, best16 = min(best32, seconds(a32, b32)), min(best16, seconds(a16, b16))
                if i >= 1 and best16 > 10 * best32:
                    break
    finally:
        torch.set_num_threads(threads)
    flop = 2 * size**3
    return MatmulProbe(size, 1, flop / best32 / 1e9, flop / best16 / 1e9)


def _times(x: float) -> str:
    """A ratio for a log line: 0.021, 1.8, 50."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _gflops(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _cpu_pick() -> Pick:
    cpu, isa, probe = describe_cpu(), torch_bf16_isa() if is_x86() else [], cpu_matmul_probe()
    fast = probe.speedup >= BF16_MIN_SPEEDUP
    measured = f"bf16 matmul measured {_times(probe.speedup)}x fp32"
    if not is_x86():  # no flag to read: the probe decides
        if fast:
            return Pick("bf16", f"bf16: this CPU ({cpu}) runs bf16 natively ({measured})")
        return Pick("fp32", f"fp32: this CPU ({cpu}) has no fast bf16 ({measured}, below {BF16_MIN_SPEEDUP}x)")
    if not isa:
        return Pick("fp32", f"fp32: this CPU ({cpu}) has no native bf16 (no AVX512-BF16 or AMX; {measured})")
    if not fast:
        return Pick(
            "fp32",
            f"fp32: this CPU ({cpu}) reports {' and '.join(isa)}, but {measured} (bf16 needs {BF16_MIN_SPEEDUP}x)",
        )
    return Pick("bf16", f"bf16: this CPU ({cpu}) has {' and '.join(isa)}; {measured}")


def _cuda_pick(device: torch.device) -> Pick:
    name = torch.cuda.get_device_name(device)
    try:  # without emulation: pre-Ampere GPUs emulate bf16, slowly
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch, whose check has no emulation
        native = torch.cuda.is_bf16_supported()
    if native:
        return Pick("bf16", f"bf16: this GPU ({name}) has native bf16")
    major, minor = torch.cuda.get_device_capability(device)
    return Pick("fp32", f"fp32: this GPU ({name}, compute capability {major}.{minor}) has no native bf16")


@functools.cache
def _auto(device_type: str, index: int | None) -> Pick:
    if device_type == "cpu":
        return _cpu_pick()
    if device_type == "cuda":
        return _cuda_pick(torch.device("cuda", index if index is not None else torch.cuda.current_device()))
    return Pick("fp32", f"fp32: auto picks bf16 only on CUDA or on a CPU with native bf16, not on {device_type}")


def auto_precision(device: torch.device | str) -> Pick:
    """What ``auto`` picks on ``device`` (decided once per process and device).

    bf16 on CUDA with native bf16 (``torch.cuda.is_bf16_supported``, emulation not counted), and on a
    CPU whose PyTorch build reports AVX512-BF16 or AMX and whose bf16 matmul, measured, runs at least
    :data:`BF16_MIN_SPEEDUP` times as fast as fp32 (:func:`cpu_matmul_probe`); on a CPU that is not
    x86 the measurement alone decides. fp32 everywhere else.
    """
    d = torch.device(device)
    return _auto(d.type, d.index)


_warned_slow_bf16 = False


def slow_bf16_note(device: torch.device | str, key: str = "precision") -> str:
    """``""`` where bf16 runs well on ``device``; else the measured slowdown, for a reason string,
    after warning about it (once per process). For an explicit bf16 where ``auto`` would not pick it."""
    global _warned_slow_bf16
    d = torch.device(device)
    if d.type != "cpu" or auto_precision(d).dtype == "bf16":
        return ""
    p = cpu_matmul_probe()
    slow = (
        f"bf16 matmul runs at {_gflops(p.bf16_gflops)} GFLOP/s here against {_gflops(p.fp32_gflops)} GFLOP/s "
        f"in fp32 ({_times(1 / p.speedup)}x slower)"
    )
    if not _warned_slow_bf16:
        _warned_slow_bf16 = True
        warnings.warn(
            f"{key}=bf16 on a CPU without fast bf16 ({describe_cpu()}): {slow}; {key}=auto would pick fp32",
            RuntimeWarning,
            stacklevel=3,
        )
    return f"; this CPU ({describe_cpu()}) has no fast bf16: {slow}"


def pick_precision(requested: str, device: torch.device | str, key: str = "precision") -> Pick:
    """The precision to run for a config's ``requested`` value (``key`` names it in messages).

    ``auto`` is :func:`auto_precision`. fp16 needs CUDA (a :class:`ConfigError` naming ``key``
    otherwise). An explicit bf16 on a CPU where auto would not pick it runs, with a warning (once
    per process) that names the measured slowdown (:func:`slow_bf16_note`).
    """
    d = torch.device(device)
    if requested == "auto":
        return Pick(auto_precision(d).dtype, f"{key}=auto picked {auto_precision(d).reason}")
    if requested not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"{key}: got {requested!r}; expected one of 'auto', 'fp32', 'bf16', 'fp16'")
    if requested == "fp16" and d.type != "cuda":
        raise ConfigError(f"{key}: fp16 needs CUDA; use auto, bf16 or fp32 on {d.type}")
    note = slow_bf16_note(d, key) if requested == "bf16" else ""
    return Pick(requested, f"{key}={requested} (set in the config){note}")  # type: ignore[arg-type]


def agree_across_ranks(pick: Pick) -> Pick:
    """Rank 0's pick on every rank (a measured pick could differ between ranks on a noisy machine;
    the ranks of one run must compute alike). Every rank must call it."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return pick
    box = [pick]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class AutocastArgs:
    """Mixed precision of a trainer that autocasts its whole forward (the dVAE, the CLIP); the prior's
    section (:class:`PrecisionArgs`) has the same ``dtype`` and adds its per-resblock scaling."""

    dtype: PrecisionChoice = arg(
        "auto",
        "Autocast precision. auto: bf16 where the device runs it natively and fast (CUDA with bf16; a CPU with "
        "AVX512-BF16 or AMX, confirmed by a measured matmul), else fp32; the run's config.yaml keeps auto and notes "
        "the pick. fp16: CUDA only, with loss scaling.",
    )


@dataclass
class PrecisionArgs:
    """Mixed precision of the prior (SPEC §3)."""

    dtype: PrecisionChoice = arg(
        "auto",
        "Compute precision of the resblocks; the residual stream stays fp32. auto: bf16 where the device runs it "
        "natively and fast (CUDA with bf16; a CPU with AVX512-BF16 or AMX, confirmed by a measured matmul), "
        "else fp32.",
    )
    mode: Literal["block_scaled", "deepspeed"] = arg(
        "block_scaled",
        "block_scaled: the paper's per-resblock gradient scaling and skip (SPEC §3), half-precision resblocks, an fp32 "
        "residual stream, and fp32 weights, gradients and Adam moments (16 bytes per parameter, not the paper's "
        "16-bit storage; called 'paper' before). deepspeed: DeepSpeed's own bf16/fp16 (half weights, fp32 master "
        "copy and moments, one global loss scale), as the peers do.",
    )
    init_log2: float = arg(
        13.0, "log2 of each branch's initial gradient scale (no factor of the ranks: see core/precision.py)."
    )
    min_log2: float = arg(7.0, "log2 of the smallest scale.")
    max_log2: float = arg(24.0, "log2 of the largest scale.")
    growth_steps: int = arg(1000, "A finite step multiplies the scale by 2^(1/growth_steps).", gt=0)
    decay_every: int = arg(125, "A scale drops (by sqrt 2) at most once per this many updates.", gt=0)


def autocast_dtype(dtype: Precision) -> torch.dtype | None:
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {dtype!r}: resolve it first with pick_precision (enable_precision does)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
