"""What flushing denormals buys a trained dVAE's updates on this CPU, side by side in one run.

A trained dVAE's encoder gives some of its unused codes' logits gradients below fp32's and bf16's
smallest normal number (1.2e-38; the Gumbel softmax at its final temperature), and x86 CPUs take a
slow path on such operands. The trainers and the demo flush them to zero since 2026-12-06
(core.precision.denormals_flushed). This benchmark continues a dVAE run from one of its checkpoints
(weights, optimizer state and step, so the schedules' temperature and learning rate) on the run's
own training images, and times its updates (train_dvae's train_step: autocast at auto's pick,
channels_last, AdamW, EMA) with denormals kept and flushed, beside a fresh model's updates on the
same images with each setting. Each case runs in its own process, because the setting is per
thread and PyTorch's intra-op threads inherit it only when they start; the cases alternate over
``--rounds``; the best round of each counts, and each round's own kept / flushed ratio is kept
beside it (with their median), because a VM's speed drifts between rounds.

Usage: python bench/denormals.py [--run outputs/demo/dvae] [--checkpoint STEP] [--threads 2]
       [--rounds 3] [--out F.json]   (run it where the run was trained: its shard paths are relative)
Prints one JSON line: ms per update of each case, the share of the model's gradient entries that
were denormal (with them kept), and the ratios (trained / fresh with each setting; kept / flushed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("fresh_kept", "fresh_flushed", "trained_kept", "trained_flushed")


def worker(case: str, checkpoint: Path, threads: int, warm: int, timed: int, images: int) -> dict[str, Any]:
    """ms per update (median of ``timed``) of one case, in this fresh process, cycling over the run's
    first ``images`` batches."""
    import torch

    torch.set_flush_denormal(case.endswith("flushed"))  # before the first parallel op starts the pool
    torch.set_num_threads(threads)
    from dalle_repro.core.config import load_config
    from dalle_repro.data.loader import Loader
    from dalle_repro.demo.plan import dvae_update_state
    from dalle_repro.train.checkpoint import Checkpoints
    from dalle_repro.train.dvae import DVAETrainConfig, train_step
    from dalle_repro.train.optim import EMA, load_optimizer_state

    torch.manual_seed(0)
    cfg, st = dvae_update_state(load_config(DVAETrainConfig, checkpoint / "config.yaml", []))
    model = st.model
    if case.startswith("trained"):
        files, state = Checkpoints.load(checkpoint)
        model.load_state_dict(files["model"])
        load_optimizer_state(st.opt, state["optimizer"])
        st.ema = EMA(model, cfg.optim.ema_decay)
        st.counters.step = int(state["step"])
    batches = []
    for batch in Loader(cfg.data.shards, dataclasses.replace(cfg.data, num_workers=0), epochs=1):
        batches.append((batch["image"].float() / 255).contiguous(memory_format=torch.channels_last))
        if len(batches) == images:
            break
    if not batches:
        raise SystemExit(f"error: no training image in {cfg.data.shards} (run this where the run was trained)")
    dev = torch.device("cpu")
    times, denormal, entries = [], 0, 0
    tiny = torch.finfo(torch.float32).tiny
    for i in range(warm + timed):
        t = time.perf_counter()
        train_step(st, batches[i % len(batches)], cfg, dev)
        if i >= warm:
            times.append(time.perf_counter() - t)
        if case.endswith("kept"):  # the gradients of the update just made (zero_grad runs at the next one's start)
            for g in (p.grad.float() for p in model.parameters() if p.grad is not None):
                denormal += int(((g != 0) & (g.abs() < tiny)).sum())
                entries += g.numel()
    return {
        "ms": 1000 * statistics.median(times),
        "denormal_share": denormal / entries if entries else None,
        "precision": cfg.precision.dtype,
        "step": st.counters.step - warm - timed,
        "batch": cfg.data.batch_size,
        "image_size": cfg.model.image_size,
    }


def checkpoint_of(run: Path, step: int | None) -> Path:
    """``run``'s checkpoint at ``step`` (its latest when None)."""
    from dalle_repro.train.checkpoint import Checkpoints

    ckpts = Checkpoints(run)
    done = [p for p in ckpts.all() if (p / "state.json").is_file()]
    if not done:
        raise SystemExit(f"error: {run}/checkpoints holds no finished checkpoint (train a dVAE there first)")
    if step is None:
        return done[-1]
    found = [p for p in done if ckpts.step_of(p) == step]
    if not found:
        raise SystemExit(f"error: {run}/checkpoints has no step {step}; it has {[ckpts.step_of(p) for p in done]}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--run", type=Path, default=Path("outputs/demo/dvae"), help="a dVAE run folder (default: the demo's)"
    )
    p.add_argument("--checkpoint", type=int, help="the checkpoint's step (default: the run's latest)")
    p.add_argument("--images", type=int, default=20, help="batches of the run's training images cycled over")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each case (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the four cases; the best of each counts")
    p.add_argument("--warm", type=int, default=3, help="untimed updates before the timed ones")
    p.add_argument("--timed", type=int, default=40, help="timed updates per round (their median counts)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-path", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.checkpoint_path, a.threads, a.warm, a.timed, a.images)))
        return 0

    from dalle_repro.core.cpuinfo import cpu_record
    from dalle_repro.core.files import atomic_write_text

    checkpoint = checkpoint_of(a.run, a.checkpoint)
    rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    for r in range(a.rounds):
        for case in CASES if r % 2 == 0 else CASES[::-1]:
            cmd = [sys.executable, __file__, "--worker", case, "--checkpoint-path", str(checkpoint)]
            for flag in ("threads", "warm", "timed", "images"):
                cmd += [f"--{flag}", str(getattr(a, flag))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"error: case {case} failed:\n{out.stderr[-2000:]}")
            rounds[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {case}: {rounds[case][-1]['ms']:.1f} ms", file=sys.stderr, flush=True)
    best = {c: min(rounds[c], key=lambda x: x["ms"]) for c in CASES}
    pairs = zip(rounds["trained_kept"], rounds["trained_flushed"], strict=True)
    per_round = [round(k["ms"] / f["ms"], 3) for k, f in pairs]
    ms = {c: round(best[c]["ms"], 1) for c in CASES}
    result = {
        "benchmark": "denormals",
        "checkpoint": str(checkpoint),
        "step": best["trained_kept"]["step"],
        "precision": best["trained_kept"]["precision"],
        "batch": best["fresh_kept"]["batch"],
        "image_size": best["fresh_kept"]["image_size"],
        "threads": a.threads,
        "rounds": a.rounds,
        "ms_per_update": ms,
        "ms_per_update_rounds": {c: [round(x["ms"], 1) for x in rounds[c]] for c in CASES},
        "grad_denormal_share": {
            "fresh": best["fresh_kept"]["denormal_share"],
            "trained": best["trained_kept"]["denormal_share"],
        },
        "trained_over_fresh_kept": round(ms["trained_kept"] / ms["fresh_kept"], 3),
        "trained_over_fresh_flushed": round(ms["trained_flushed"] / ms["fresh_flushed"], 3),
        "trained_kept_over_flushed": round(ms["trained_kept"] / ms["trained_flushed"], 3),
        # each round's own ratio: the machine's speed drifts between rounds (a VM's by a quarter)
        "trained_kept_over_flushed_per_round": per_round,
        "trained_kept_over_flushed_median_of_rounds": round(statistics.median(per_round), 3),
        "machine": cpu_record(),
    }
    line = json.dumps(result)
    print(line)
    if a.out:
        atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
