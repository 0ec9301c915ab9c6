"""A prior train step alone and beside busy processes, at the old and the new default thread count.

The demo trains the prior with 2 CPU ranks on 2 cores. PyTorch's default gives each process every
core it may run on, so the two ranks ran 2 x 2 OpenMP threads; distributed.set_cpu_threads now
gives each rank ``usable cores // ranks on this node`` (distributed.cpu_threads). This script
stands in for one rank: one process training the demo prior's shape (configs/demo/emoji-prior.yaml: dim
256, 8 layers, 8 heads, 24 text tokens + 8x8 image tokens, batch 16) in fp32, with the paper's
per-branch hooks (precision mode block_scaled) and AdamW, while ``--competitors`` busy processes (default
``--ranks`` - 1; each a Python spin loop, pinned to nothing) stand in for the other ranks. It times
a train step in four settings:

  old_alone, old_contended   threads = every usable core (PyTorch's default)
  new_alone, new_contended   threads = distributed.cpu_threads with LOCAL_WORLD_SIZE = --ranks

and prints one JSON line: the median step time of each (``step_ms``) and the ratios

  old_slowdown  old_contended / old_alone
  new_slowdown  new_contended / old_alone  (the fair comparison: the fastest a lone process runs)
  new_over_new_alone  new_contended / new_alone
  old_over_new  old_contended / new_contended

On 2 cores with one competitor, a step that shares the machine fairly takes about twice as long
as alone (new_slowdown near 2: one of two cores is gone); old_slowdown well above 2 means the
oversubscribed threads collapse (each parallel region waits at its barrier for a thread that is
off its core). Numbers taken on a machine others are using are noise: measure on a quiet one.

Usage: python bench/contention.py [--steps 10] [--warmup 2] [--ranks 2] [--competitors N] [--batch 16]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import arg
from dalle_repro.core.distributed import cpu_threads, usable_cores
from dalle_repro.core.precision import PrecisionArgs
from dalle_repro.models.transformer import Transformer, TransformerArgs

DEMO_PRIOR = dict(dim=256, depth=8, heads=8, text_len=24, text_vocab=1859, grid=8, image_vocab=512, conv_kernel=11)
SPIN = "while True: pass"


@contextmanager
def competitors(n: int) -> Iterator[None]:
    """``n`` busy processes (a Python spin loop each) for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    try:
        time.sleep(0.3)  # let them start spinning
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def step_ms(threads: int, steps: int, warmup: int, batch: int) -> float:
    """Median ms of ``steps`` train steps (after ``warmup``) on ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(TransformerArgs(**DEMO_PRIOR))
    scaler = model.enable_precision(PrecisionArgs(dtype="fp32"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, DEMO_PRIOR["text_vocab"], (batch, DEMO_PRIOR["text_len"]), generator=gen)
    image = torch.randint(0, DEMO_PRIOR["image_vocab"], (batch, DEMO_PRIOR["grid"] ** 2), generator=gen)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(text, image).loss.backward()
        scaler.end_step(model.branch_params(), i + 1)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@dataclass
class ContentionArgs:
    """The contention benchmark's settings."""

    steps: int = arg(10, "Timed train steps per setting (the median counts).", gt=0)
    warmup: int = arg(2, "Untimed steps before them.", ge=0)
    ranks: int = arg(2, "Ranks on this node the new default divides the cores by.", gt=0)
    competitors: int | None = arg(None, "Busy processes beside the step; null: ranks - 1.", ge=0)
    batch: int = arg(16, "Batch size (the demo's: 16).", gt=0)


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(ContentionArgs, argv, __doc__ or "", aliases=flag_aliases(ContentionArgs))
    if a is None:
        return 0
    n_comp = a.ranks - 1 if a.competitors is None else a.competitors
    cores = usable_cores()
    old = cores
    new, why = cpu_threads({"LOCAL_WORLD_SIZE": str(a.ranks)}, cores)
    assert new is not None
    ms = {}
    for label, threads in (("old", old), ("new", new)):
        ms[f"{label}_alone"] = step_ms(threads, a.steps, a.warmup, a.batch)
    with competitors(n_comp):
        for label, threads in (("old", old), ("new", new)):
            ms[f"{label}_contended"] = step_ms(threads, a.steps, a.warmup, a.batch)
    result = {
        "bench": "contention",
        "usable_cores": cores,
        "ranks": a.ranks,
        "competitors": n_comp,
        "old_threads": old,
        "new_threads": new,
        "new_threads_why": why,
        "steps": a.steps,
        "batch": a.batch,
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "step_ms": {k: round(v, 2) for k, v in ms.items()},
        "old_slowdown": round(ms["old_contended"] / ms["old_alone"], 3),
        "new_slowdown": round(ms["new_contended"] / ms["old_alone"], 3),
        "new_over_new_alone": round(ms["new_contended"] / ms["new_alone"], 3),
        "old_over_new": round(ms["old_contended"] / ms["new_contended"], 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
