"""Training the dVAE (SPEC §1): schedules, the train step, validation, checkpoints and exact resume.

Data-parallel over ranks with DDP when a launcher (deepspeed, torchrun) starts several processes;
each rank reads its own share of the shards. The dVAE needs no ZeRO sharding (it is small next to
the prior), so the deepspeed launcher is used here only to start and connect the processes.

Exact resume: a checkpoint holds the raw and EMA weights, the optimizer, the step, every rank's
data position and RNG states, and the fp16 scaler. Resuming from it continues with the same
batches and the same Gumbel noise, so N steps + resume + N steps equals 2N steps (CPU, fp32/bf16).

A step whose gradient norm is not finite (a NaN in the data, an fp16 overflow) changes no weight
and no optimizer state; it is counted in ``skipped_steps`` (metrics and checkpoints).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from dalle_repro.core import distributed, faults
from dalle_repro.core.config import ConfigError, arg, save_config
from dalle_repro.core.images import grid, save_png
from dalle_repro.core.precision import PrecisionChoice, agree_across_ranks, pick_precision
from dalle_repro.core.pretrained import load_state_strict, save_pretrained, weights_digest
from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.models.dvae import (
    DVAE,
    DVAEArgs,
    logit_laplace_nll,
    map_pixels,
    nll_to_bits_per_dim,
    unmap_pixels,
)
from dalle_repro.train.checkpoint import Checkpoints, rng_state, save_json, set_rng_state
from dalle_repro.train.metrics import LogArgs, MetricsLogger, last_validation
from dalle_repro.train.optim import EMA, adamw, cosine, load_optimizer_state, set_lr

log = logging.getLogger(__name__)


@dataclass
class ScheduleArgs:
    """The paper's cosine schedules (SPEC §1); step counts scale with the run."""

    tau_start: float = arg(1.0, "Gumbel-softmax temperature at step 0.", gt=0)
    tau_end: float = arg(1 / 16, "Temperature after tau_steps (the paper: 1/16).", gt=0)
    tau_steps: int = arg(150_000, "Steps of the tau anneal (the paper: 150,000).", ge=0)
    beta_start: float = arg(0.0, "KL weight at step 0.", ge=0)
    beta_end: float = arg(6.6, "KL weight after beta_steps (the paper: 6.6).", ge=0)
    beta_steps: int = arg(5_000, "Steps of the beta anneal (the paper: 5,000).", ge=0)
    lr_start: float = arg(1e-4, "Learning rate at step 0.", gt=0)
    lr_end: float = arg(1.25e-6, "Learning rate after lr_steps.", ge=0)
    lr_steps: int = arg(1_200_000, "Steps of the learning-rate anneal (the paper: 1.2M).", ge=0)


@dataclass
class OptimArgs:
    """AdamW and the EMA of weights (the paper's values)."""

    beta1: float = arg(0.9, "Adam beta1.", ge=0, lt=1)
    beta2: float = arg(0.999, "Adam beta2.", ge=0, lt=1)
    eps: float = arg(1e-8, "Adam epsilon.", gt=0)
    weight_decay: float = arg(1e-4, "Decoupled weight decay, on weights only.", ge=0)
    ema_decay: float = arg(0.999, "EMA decay of the weights (warmed up; see optim.EMA).", ge=0, lt=1)
    grad_clip: float | None = arg(None, "Clip the gradient norm to this; null: no clipping (the paper's dVAE).", gt=0)


@dataclass
class RunArgs:
    """Length, precision, checkpoints and validation of a run."""

    run_dir: str = arg("runs/dvae", "Folder for checkpoints, metrics, grids and the exported model.")
    steps: int = arg(1000, "Updates to train for.", gt=0)
    precision: PrecisionChoice = arg(
        "auto",
        "Autocast precision of the convolutions. auto: bf16 where the device runs it natively and fast (CUDA with "
        "bf16; a CPU with AVX512-BF16 or AMX, confirmed by a measured matmul), else fp32; the run's config.yaml "
        "keeps auto and notes the pick. fp16: CUDA only, with loss scaling.",
    )
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "auto: CUDA when there is one.")
    seed: int = arg(0, "Seed of the weights and the Gumbel noise (each rank adds its rank).", ge=0)
    ckpt_every: int = arg(500, "Steps between checkpoints (one is always written at the end).", gt=0)
    keep: int = arg(3, "Checkpoints to keep.", ge=1)
    val_every: int = arg(500, "Steps between validations (one always at the end).", gt=0)
    val_shards: str = arg("data/emoji/val/*.tar", "Validation shards.")
    val_batches: int = arg(8, "Validation batches per validation (0: the whole split).", ge=0)
    grid_images: int = arg(16, "Validation images in the reconstruction grid.", ge=0)


@dataclass
class DVAETrainConfig:
    """Everything a dVAE run reads."""

    model: DVAEArgs = arg(factory=DVAEArgs, doc="The dVAE's sizes.")
    data: DataArgs = arg(factory=DataArgs, doc="Training images.")
    schedule: ScheduleArgs = arg(factory=ScheduleArgs, doc="tau, beta and lr schedules.")
    optim: OptimArgs = arg(factory=OptimArgs, doc="Optimiser and EMA.")
    run: RunArgs = arg(factory=RunArgs, doc="The run.")
    log: LogArgs = arg(factory=LogArgs, doc="Logging.")

    def __post_init__(self) -> None:
        if self.data.image_size is None:  # stated once, as model.image_size
            self.data = dataclasses.replace(self.data, image_size=self.model.image_size)
        elif self.data.image_size != self.model.image_size:
            raise ConfigError(
                f"data.image_size: {self.data.image_size}, but model.image_size is {self.model.image_size}; state it "
                "once, as model.image_size (data.image_size follows it when null)"
            )
        if self.data.kind != "images":
            raise ConfigError(f"data.kind: got {self.data.kind!r}; the dVAE trains on images")


def schedule_at(s: ScheduleArgs, step: int) -> dict[str, float]:
    return {
        "tau": cosine(step, s.tau_start, s.tau_end, s.tau_steps),
        "beta": cosine(step, s.beta_start, s.beta_end, s.beta_steps),
        "lr": cosine(step, s.lr_start, s.lr_end, s.lr_steps),
    }


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of ``run.precision`` (``auto`` resolved by precision.pick_precision; fp16
    on a CPU raises a ConfigError naming the key)."""
    if precision not in ("fp32", "bf16"):
        precision = pick_precision(precision, device, "run.precision").dtype
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def code_stats(counts: torch.Tensor) -> dict[str, float]:
    """Codebook usage (distinct codes) and the perplexity of code frequencies."""
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"codes_used": int((counts > 0).sum().item()), "perplexity": math.exp(entropy)}


@dataclass
class State:
    """What the loop carries between steps."""

    model: DVAE
    net: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    ema: EMA
    scaler: torch.amp.GradScaler | None
    loader: Loader
    step: int = 0
    skipped_steps: int = 0  # updates dropped for a non-finite gradient (bad data, an overflow)


def train_step(st: State, images: torch.Tensor, cfg: DVAETrainConfig, dev: torch.device) -> dict[str, float]:
    """One update: schedules, forward under autocast, backward, clip, step, EMA."""
    sched = schedule_at(cfg.schedule, st.step)
    set_lr(st.opt, sched["lr"])
    with autocast(dev, cfg.run.precision):
        out = st.net(images, tau=sched["tau"], beta=sched["beta"])
    st.opt.zero_grad(set_to_none=True)
    if st.scaler is not None:
        st.scaler.scale(out.loss).backward()
        st.scaler.unscale_(st.opt)
    else:
        out.loss.backward()
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(st.model.parameters(), clip).item()
    finite = math.isfinite(grad_norm)
    if st.scaler is not None:
        st.scaler.step(st.opt)  # skips the update itself when the gradients are not finite
        st.scaler.update()
    elif finite:
        st.opt.step()
    st.skipped_steps += not finite
    st.ema.update(st.model, st.step)
    st.step += 1
    counts = torch.bincount(out.logits.argmax(1).flatten(), minlength=cfg.model.vocab_size)
    return {
        "loss": out.loss.item(),
        "nll_bpd": float(nll_to_bits_per_dim(out.nll.item())),
        "kl": out.kl.item(),
        "grad_norm": grad_norm,
        "batch_codes_used": int((counts > 0).sum()),
        "skipped_steps": float(st.skipped_steps),
        **sched,
    }


@torch.no_grad()
def validate(model: DVAE, cfg: DVAETrainConfig, dev: torch.device) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Metrics of the hard-token reconstruction decode(encode(x)) on the validation shards."""
    args = dataclasses.replace(cfg.data, crop="center", shuffle=False, num_workers=0)
    loader = Loader(cfg.run.val_shards, args, epochs=1)
    counts = torch.zeros(cfg.model.vocab_size, dtype=torch.long)
    nll_sum = sq_sum = n_sub = 0.0
    shown: list[torch.Tensor] = []
    model.eval()
    for i, batch in enumerate(loader):
        if cfg.run.val_batches and i >= cfg.run.val_batches:
            break
        x = batch["image"].to(dev).float() / 255
        tokens = model.encode(x)
        mu, ln_b = model.decode_stats(tokens)
        recon = unmap_pixels(torch.sigmoid(mu))
        nll_sum += logit_laplace_nll(map_pixels(x), mu, ln_b).sum().item()
        sq_sum += ((recon - x) ** 2).sum().item()
        n_sub += x.numel()
        counts += torch.bincount(tokens.flatten().cpu(), minlength=cfg.model.vocab_size)
        for a, b in zip(x, recon, strict=True):
            if len(shown) < 2 * cfg.run.grid_images:
                shown += [a.cpu(), b.cpu()]
    model.train()
    if n_sub == 0:
        raise RuntimeError(f"no validation image in {cfg.run.val_shards}")
    mse = sq_sum / n_sub
    metrics = {
        "val_rec_bpd": float(nll_to_bits_per_dim(nll_sum / n_sub)),
        "val_mse": mse,
        "val_psnr": float("inf") if mse == 0 else 10 * math.log10(1 / mse),
        **{f"val_{k}": v for k, v in code_stats(counts).items()},
    }
    return metrics, shown


def build(cfg: DVAETrainConfig, d: distributed.Dist) -> State:
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    # channels_last: oneDNN's and cuDNN's fast conv layout (1.4-1.65x on this CPU, bf16 and fp32)
    model = DVAE(cfg.model).to(d.device, memory_format=torch.channels_last)
    opt = adamw(
        model,
        cfg.schedule.lr_start,
        (cfg.optim.beta1, cfg.optim.beta2),
        cfg.optim.eps,
        cfg.optim.weight_decay,
    )
    ema = EMA(model, cfg.optim.ema_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.run.precision == "fp16" else None
    loader = Loader(cfg.data.shards, cfg.data, rank=d.rank, world_size=d.world_size)
    torch.manual_seed(cfg.run.seed + 1000 * (d.rank + 1))  # a different Gumbel noise stream per rank
    net = DistributedDataParallel(model) if d.world_size > 1 else model
    return State(model, net, opt, ema, scaler, loader)


def save(st: State, cfg: DVAETrainConfig, d: distributed.Dist, ckpts: Checkpoints) -> None:
    """A checkpoint of everything needed to continue exactly (rank 0 writes, all ranks contribute)."""
    per_rank = distributed.gather_objects(
        {"loader": st.loader.state_dict(), "rng": rng_state(), "weights": weights_digest(st.model)}, d
    )
    if len({r["weights"] for r in per_rank}) != 1:  # DDP keeps replicas equal; a difference is a bug
        raise RuntimeError(f"data-parallel replicas diverged at step {st.step}: {[r['weights'] for r in per_rank]}")
    if d.is_main:
        state = {
            "step": st.step,
            "optimizer": st.opt.state_dict(),
            "ranks": per_rank,
            "scaler": st.scaler.state_dict() if st.scaler is not None else None,
            "skipped_steps": st.skipped_steps,
        }
        ckpts.save(st.step, {"model": st.model.state_dict(), "ema": st.ema.state_dict()}, state, cfg)
    distributed.barrier()


def resume(st: State, path: Path, d: distributed.Dist) -> None:
    files, state = Checkpoints.load(path)
    load_state_strict(st.model, files["model"], str(path / "model.safetensors"))
    st.ema.load_state_dict(files["ema"])
    load_optimizer_state(st.opt, state["optimizer"])
    if len(state["ranks"]) != d.world_size:
        raise ValueError(f"{path} was written by {len(state['ranks'])} ranks; this run has {d.world_size}")
    mine = state["ranks"][d.rank]
    st.loader.load_state_dict(mine["loader"])
    set_rng_state(mine["rng"])
    if st.scaler is not None and state["scaler"]:
        st.scaler.load_state_dict(state["scaler"])
    st.step = int(state["step"])
    st.skipped_steps = int(state.get("skipped_steps", 0))


def export(st: State, cfg: DVAETrainConfig, run_dir: Path) -> Path:
    """``RUN/dvae``: the EMA weights as model.safetensors (what from_pretrained loads) and the raw ones."""
    model = DVAE(cfg.model)
    load_state_strict(model, st.ema.state_dict(), "EMA")
    files = {"model": model.state_dict(), "raw": st.model.state_dict()}
    return save_pretrained(run_dir / "dvae", cfg.model, files, full_config=cfg)


def train(cfg: DVAETrainConfig, resume_run: bool = False) -> dict[str, Any]:
    """Train (or continue) a dVAE run; returns the last validation metrics (rank 0).

    ``cfg`` is what the run's config.yaml, checkpoints and export keep (``auto`` stays ``auto``); the
    loop runs a copy with the picked precision, noted in config.yaml's header and the log."""
    d = distributed.init(cfg.run.device)
    pick = agree_across_ranks(pick_precision(cfg.run.precision, d.device, "run.precision"))  # fp16 on CPU fails
    if d.is_main:
        log.info("precision: %s", pick.reason)
    run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, precision=pick.dtype))
    run_dir = Path(cfg.run.run_dir)
    ckpts = Checkpoints(run_dir, cfg.run.keep)
    st = build(run_cfg, d)
    latest = ckpts.latest()
    if resume_run and latest is not None:
        resume(st, latest, d)
        log.info("resumed from %s at step %d", latest, st.step)
    elif latest is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints ({latest.name}); pass --resume, or set another run.run_dir"
        )
    if d.is_main:
        save_config(cfg, run_dir, header=f"precision: {pick.reason}")
    logger = MetricsLogger(run_dir, cfg.log, cfg, cfg.run.steps, st.step, d.is_main)
    val: dict[str, Any] = {}
    it = iter(st.loader)
    t0, seen = time.perf_counter(), 0
    while st.step < cfg.run.steps:
        batch = next(it)
        images = batch["image"].to(d.device, non_blocking=True).float().div_(255)
        images = images.contiguous(memory_format=torch.channels_last)
        metrics = train_step(st, images, run_cfg, d.device)
        faults.point("after_step", st.step)
        seen += images.shape[0]
        logger.advance()
        last = st.step == cfg.run.steps
        if st.step % cfg.log.every == 0 or last:
            metrics = distributed.mean(metrics, None)
            rate = seen * d.world_size / (time.perf_counter() - t0)
            errors = distributed.total({k: float(v) for k, v in st.loader.errors.items()})
            logger.log(
                st.step,
                metrics | {"img_per_s": rate} | {f"data_{k}": v for k, v in errors.items()},
                show=("loss", "nll_bpd", "tau", "beta"),
            )
            t0, seen = time.perf_counter(), 0
        if st.step % cfg.run.val_every == 0 or last:
            val = _validate_and_show(st, cfg, d, run_dir, logger)
        if st.step % cfg.run.ckpt_every == 0 or last:
            save(st, cfg, d, ckpts)
    if d.is_main:
        export(st, cfg, run_dir)
        save_json(run_dir / "final_metrics.json", (val or last_validation(run_dir, "val_psnr")) | {"step": st.step})
    logger.close()
    distributed.barrier()
    return val


def _validate_and_show(
    st: State, cfg: DVAETrainConfig, d: distributed.Dist, run_dir: Path, logger: MetricsLogger
) -> dict[str, Any]:
    """Rank 0 validates the EMA weights and writes a grid of originals beside reconstructions."""
    val: dict[str, Any] = {}
    if d.is_main:
        model = DVAE(cfg.model).to(d.device, memory_format=torch.channels_last)
        model.load_state_dict(st.ema.state_dict())
        val, shown = validate(model, cfg, d.device)
        logger.log(st.step, val)
        if shown:
            path = run_dir / "grids" / f"recon_{st.step:08d}.png"
            save_png(grid(shown, ncol=8, scale=2), path)
            save_png(grid(shown, ncol=8, scale=2), run_dir / "recon_latest.png")
    distributed.barrier()
    return val
