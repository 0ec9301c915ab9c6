"""The demo's time plan: how many updates each training stage can afford on this machine.

The demo should finish in about half an hour on any 2-core x86 machine, and machines differ more
than any fixed profile allows: a CPU with native bf16 runs the demo's steps several times faster
than an AVX2-only one in fp32. So before training, the demo times a few real updates of each
training stage (the dVAE's ``train_step``, the prior's forward, backward and AdamW on as many
threads as each rank gets, the small CLIP's step), predicts each stage's minutes at its configured
length, and, when the three together would exceed ``train_minutes``, shortens all three by the
same fraction, their schedules with them (:func:`scaled_overrides`). The plan is a demo stage
(``OUT/plan.json``), skipped on a rerun; when another setting makes it run again, it keeps each
stage's timing whose subject is unchanged (demo.stage_plan's ``timing_keys``), so the stages'
fingerprints do not move with timing noise. A machine fast enough keeps the configured runs: the
plan only ever shortens. With CUDA the plan times nothing and keeps the configured runs (the timers
run CPU paths).

The timings are synthetic (random inputs, no data loader, no DeepSpeed engine), so each is
multiplied by a factor measured on the real stages (``STAGE_FACTORS``): what the loader worker
beside the trainer, DeepSpeed's gradient all-reduce, EMA and logging add per update.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import threading
import time
from typing import Any

import torch

from dalle_repro.train.clip import LENGTH_KEYS as CLIP_KEYS
from dalle_repro.train.dvae import LENGTH_KEYS as DVAE_KEYS
from dalle_repro.train.loop import scaled_count as scaled
from dalle_repro.train.prior_config import LENGTH_KEYS as PRIOR_KEYS

log = logging.getLogger(__name__)

# Real seconds per update over the timed ones, per stage: the stage's whole time over its updates,
# divided by this module's estimate, as measured on whole demo runs (docs/demo.md: AMD EPYC family 26
# model 2, 2 cores): bf16 (native) dVAE 0.95, prior 1.22, CLIP 0.93; fp32 (AVX2 code paths) dVAE 0.91,
# prior 1.05, CLIP 1.03; on one core with AVX2 paths (a machine about 2x slower) 0.91, 1.11, 1.05.
# Each factor was the largest, rounded up: the prior's covers DeepSpeed's start (and its one-time op
# build), the all-reduce, validation, samples and checkpoints. Three whole runs on AMD EPYC family 25
# model 17 (bf16, 2 cores, nothing else running; 2026-12-04, docs/demo.md "Seeds") measured dVAE
# 0.89-1.09, prior 1.08-1.15, CLIP 1.00-1.16: the prior's and CLIP's factors are their means since.
# (Factors fitted on runs that shared the cores with other jobs had said 1.17 for the dVAE.)
# The bf16 prior on Intel Xeon family 6 model 207 (AMX; three runs with denormals flushed, alone,
# 2026-12-06: docs/demo.md "The time plan across CPUs"): 1.28, 1.29, 1.34, so 1.15 put one at 1.17 of
# its prediction. Its factor is now the mean of the CPUs' means (AMD EPYC family 25 1.12, family 26
# 1.22, this Xeon 1.30), 1.2: every recorded run within 15% (AMD 0.90-1.02, Xeon 1.07-1.12). The
# dVAE's (Xeon 0.95-1.06) and CLIP's (0.84-1.27: a one-minute stage, timed on seven steps) stay.
STAGE_FACTORS = {"dvae": 1.0, "prior": 1.2, "clip": 1.1}
# Where the stage's timer ran fp32 (auto's pick without native bf16; AVX2 code paths), the prior's
# whole run over its timed update was 1.05 (AMD EPYC family 26 model 2), 1.11 (the same on one core),
# 1.12, 0.95 and 1.14 (Intel Xeon family 6 model 207 on its AVX2 paths, 2026-12-05 and twice -06;
# docs/demo.md "On AVX2 code paths"): bf16's 1.15 had put one at 0.82 of its prediction. Their mean
# is fp32's factor; the dVAE's and CLIP's (0.91-1.07 and 1.03-1.20 in fp32) stay as they are.
STAGE_FACTORS_FP32 = STAGE_FACTORS | {"prior": 1.07}


def stage_factors(dtypes: dict[str, str]) -> dict[str, float]:
    """Each stage's factor for the dtype its timer ran (``auto`` resolved): fp32's own where it ran fp32."""
    return {k: (STAGE_FACTORS_FP32 if dtypes.get(k) == "fp32" else STAGE_FACTORS)[k] for k in STAGE_FACTORS}


MIN_FRACTION = 0.2  # below this the demo's models learn too little to show anything


def _timed(step: Any, warm: int, timed: int) -> float:
    """The median seconds of ``timed`` calls of ``step`` after ``warm`` untimed ones: one slow call
    (another process waking, an allocator growing) moves a mean of five by 10-30%, which then moved
    the whole plan (docs/demo.md, "Seeds"); the median does not follow it."""
    for _ in range(warm):
        step()
    times = []
    for _ in range(timed):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dvae_update_state(dcfg: Any) -> tuple[Any, Any]:
    """(the config at its picked precision, a fresh train_dvae.State) for calling ``train_step`` on
    the CPU outside the trainer: the model channels_last, AdamW and EMA as train_dvae builds them, no
    loader or scaler (also bench/denormals.py)."""
    from dalle_repro.models.dvae import DVAE
    from dalle_repro.train.dvae import State
    from dalle_repro.train.optim import EMA, adamw

    precision = dataclasses.replace(dcfg.precision, dtype=picked_dtype(dcfg.precision.dtype))
    cfg = dataclasses.replace(dcfg, precision=precision)
    model = DVAE(cfg.model).to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = adamw(model, cfg.schedule.lr_start, (o.beta1, o.beta2), o.eps, o.weight_decay)
    return cfg, State(model, model, opt, EMA(model, o.ema_decay), None, None)  # type: ignore[arg-type]


def dvae_step_seconds(dcfg: Any, warm: int = 2, timed: int = 9) -> float:
    """Seconds of one dVAE update as train_dvae runs it (autocast at its pick, channels_last, AdamW,
    EMA), on random images of the config's size and batch, in this process's threads."""
    from dalle_repro.train.dvae import train_step

    cfg, st = dvae_update_state(dcfg)
    size, batch = cfg.model.image_size, cfg.data.batch_size
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    return _timed(lambda: train_step(st, x, cfg, torch.device("cpu")), warm, timed)


def prior_update(model: Any, scaler: Any, opt: Any, text: torch.Tensor, image: torch.Tensor, n: int) -> None:
    """One prior update without DeepSpeed: the loss, backward, the per-branch scaling's end of
    update ``n`` (precision.BlockScaler) and AdamW (also bench/run.py's prior_train)."""
    loss = model.loss(text, image).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    scaler.end_step(model.branch_params(), n)
    opt.step()


def prior_step_seconds(model_args: Any, precision: str, batch: int, ranks: int, warm: int = 1, timed: int = 3) -> float:
    """Seconds of one prior update with ``ranks`` CPU ranks on this machine: each rank's forward,
    backward and AdamW, all ranks at once (one Python thread each, the intra-op threads split as
    distributed.cpu_threads splits them), on random tokens."""
    from dalle_repro.core.distributed import cpu_threads, usable_cores
    from dalle_repro.core.precision import PrecisionArgs
    from dalle_repro.models.transformer import Transformer

    dtype = picked_dtype(precision)
    m = model_args
    runs = []
    for r in range(ranks):
        torch.manual_seed(r)
        model = Transformer(m)
        scaler = model.enable_precision(PrecisionArgs(dtype=dtype))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        text = torch.randint(0, m.text_vocab, (batch, m.text_len))
        image = torch.randint(0, m.image_vocab, (batch, m.grid * m.grid))
        runs.append((model, scaler, opt, text, image))

    seconds = [0.0] * ranks
    errors: list[BaseException] = []

    def rank(i: int) -> None:
        count = iter(range(1, 1 << 30))
        try:
            seconds[i] = _timed(lambda: prior_update(*runs[i], next(count)), warm, timed)
        except BaseException as e:  # a thread's exception would only be printed: hand it to the caller
            errors.append(e)

    # the threads each rank would run (distributed.cpu_threads: the user's OMP_NUM_THREADS, else cores / ranks)
    n, _ = cpu_threads(os.environ | {"LOCAL_WORLD_SIZE": str(ranks), "LOCAL_SIZE": str(ranks)}, usable_cores())
    before = torch.get_num_threads()
    torch.set_num_threads(n if n is not None else before)
    try:
        threads = [threading.Thread(target=rank, args=(i,)) for i in range(ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    if errors:
        raise RuntimeError(f"timing the prior's update failed: {errors[0]!r}") from errors[0]
    return max(seconds)


def clip_step_seconds(ccfg: Any, tokenizer_path: str, warm: int = 2, timed: int = 7) -> float:
    """Seconds of one step of the small CLIP (clip_train.train_clip's loop body) on random images,
    with its hard negative captions (``data.hard_negatives`` more captions per image) where set."""
    from dalle_repro.train.clip import build_clip, clip_input, contrastive_loss, hf_tokenizer

    a = ccfg.model
    tokenizer = hf_tokenizer(tokenizer_path, a.text_len)
    model = build_clip(a, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=ccfg.optim.lr)
    b, k = ccfg.data.batch_size, ccfg.data.hard_negatives
    negatives = torch.ones(b, k, dtype=torch.bool) if k else None
    t = tokenizer(
        ["a big red circle on the left"] * (b * (1 + k)),
        padding="max_length",
        truncation=True,
        max_length=a.text_len,
        return_tensors="pt",
    )
    images = torch.rand(b, 3, a.image_size, a.image_size)
    bf16 = picked_dtype(ccfg.precision.dtype) == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(
                input_ids=t["input_ids"],
                attention_mask=t["attention_mask"],
                pixel_values=clip_input(images, a.image_size),
            )
        loss = contrastive_loss(out.logits_per_image.float(), negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed(step, warm, timed)


def picked_dtype(requested: str) -> str:
    """The dtype a CPU stage trains in for ``precision.dtype`` = ``requested`` (auto resolved here)."""
    from dalle_repro.core.precision import pick_precision

    return pick_precision(requested, "cpu").dtype


def fraction_to_fit(minutes: dict[str, float], budget: float | None) -> float:
    """The share of their configured updates all stages keep so that their predicted ``minutes``
    sum to at most ``budget`` (1 when they fit or no budget is set; never below MIN_FRACTION)."""
    total = sum(minutes.values())
    if budget is None or total <= budget:
        return 1.0
    return max(MIN_FRACTION, budget / total)


def scaled_overrides(config: Any, keys: tuple[str, ...], fraction: float) -> list[str]:
    """``key=value`` overrides setting each dotted key of ``config`` (an update count: run.steps, a
    schedule's length, an every-N interval) to ``fraction`` of its value; none at fraction 1."""
    if fraction >= 1:
        return []
    out = []
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None:
            out.append(f"{key}={scaled(value, fraction)}")
    return out


# The update counts of each stage's config that scale with its length: the trainers' own lists (the
# same that run.end_by scales during a run).
SCALED_KEYS = {"dvae": DVAE_KEYS, "prior": PRIOR_KEYS, "clip": CLIP_KEYS}
