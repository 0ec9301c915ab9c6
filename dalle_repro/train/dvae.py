"""Training the dVAE (SPEC §1): schedules, the train step, validation, checkpoints and exact resume.

Data-parallel over ranks with DDP when a launcher (deepspeed, torchrun) starts several processes;
each rank reads its own share of the shards. The dVAE needs no ZeRO sharding (it is small next to
the prior), so the deepspeed launcher is used here only to start and connect the processes.

Exact resume: a checkpoint holds the raw and EMA weights, the optimizer, the step, every rank's
data position and RNG states, and the fp16 scaler. Resuming from it continues with the same
batches and the same Gumbel noise, so N steps + resume + N steps equals 2N steps (CPU, fp32/bf16).

A step whose gradient norm is not finite (a NaN in the data, an fp16 overflow) changes no weight
and no optimizer state; it is counted in ``skipped_steps`` (metrics and checkpoints).

The schedule of logs, validations and checkpoints, SIGTERM and ``run.stop_after`` (a checkpoint,
then exit 0), ``run.max_nonfinite`` and the end of the run come from the shared loop
(train/loop.py); this module holds the dVAE's own parts: its config, step, validation and export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from dalle_repro.core import distributed
from dalle_repro.core.config import ConfigError, arg, save_config
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.images import grid, save_png
from dalle_repro.core.precision import AutocastArgs, agree_across_ranks, denormals_flushed, pick_precision
from dalle_repro.core.pretrained import load_state_strict, save_pretrained
from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.models.dvae import (
    DVAE,
    DVAEArgs,
    codebook_usage,
    logit_laplace_nll,
    map_pixels,
    nll_to_bits_per_dim,
    unmap_pixels,
)
from dalle_repro.train.checkpoint import Checkpoints
from dalle_repro.train.finetune import DVAEInitArgs, load_dvae_init
from dalle_repro.train.inputs import check_run_shards, warn_long_schedules
from dalle_repro.train.loop import (
    Counters,
    RNGState,
    RunArgs,
    StopRequested,
    Task,
    TrainState,
    any_rank,
    checkpoint_to_resume,
    deterministic,
    fit,
)
from dalle_repro.train.metrics import LogArgs, MetricsLogger
from dalle_repro.train.optim import EMA, ModuleState, OptimizerState, adamw, cosine, set_lr

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
    lr_warmup_steps: int = arg(
        0,
        "Linear warm-up of the learning rate from 0 over this many first updates (0: none, as in the paper). "
        "At the demo's high rate (2e-3) the encoder can fall onto one or two codes in its first 20 updates "
        "and, on some seeds, never leave them (docs/demo.md).",
        ge=0,
    )
    usage_steps: int | None = arg(
        None,
        "Updates over which loss.usage_weight falls to 0 (a cosine, as tau and beta); null: the weight holds for "
        "the whole run. The usage term is needed while the codebook finds its spread (the demo's dVAE fell onto "
        "one code in its first 20 updates without it); held to the end it also rewards spreading patches that no "
        "caption tells apart (paper texture, pixel noise) over many codes, which the prior must then learn; "
        "measured on the demo's shapes, annealing it took a tenth off the background's code perplexity "
        "(bench/code_entropy.py; docs/demo.md).",
        ge=0,
    )


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
class AugmentArgs:
    """Augmentations of the training images (none in the paper, whose dVAE saw random crops only)."""

    channel_shuffle: float = arg(
        0.0,
        "Probability that a training image's R, G and B channels are put in another order (one of the five "
        "others, drawn uniformly). A shape then comes in colours the data never paired it with, so the codes "
        "of an edge need not depend on its colour: on the demo's scenes a dVAE otherwise reconstructs "
        "held-out colour-shape pairs worse than seen ones (docs/demo.md). 0: off, as in the paper.",
        ge=0,
        le=1,
    )


@dataclass
class LossArgs:
    """Terms added to the paper's objective (none by default)."""

    usage_weight: float = arg(
        0.0,
        "Weight of a codebook-usage term: ln V minus the entropy of the batch's mean code distribution, per code "
        "position, added to the loss as the KL term is (models.dvae.DVAE.forward). It keeps the encoder from "
        "putting every position on one code, which the demo's dVAE did in its first 20 updates on most seeds "
        "(docs/demo.md). 0: off, the paper's objective.",
        ge=0,
    )
    collapse_codes: int = arg(
        2,
        "A validation from update 200 on whose reconstructions use at most this many codes stops the run with a "
        "checkpoint and exit status 3: the codebook has collapsed (every position on one code), so the tokens "
        "carry nothing and every later stage would learn nothing. Not part of the objective. 0: never stop.",
        ge=0,
    )


COLLAPSE_FROM = 200  # before this update a codebook may still be finding its spread (docs/demo.md, "Seeds")


class CodebookCollapsed(RuntimeError):
    """The dVAE's validation reconstructions use at most ``loss.collapse_codes`` codes (the run wrote
    a checkpoint first): a dead run, like too many non-finite losses."""


def collapse_message(val: dict[str, Any], cfg: DVAETrainConfig, step: int) -> str:
    psnr = val.get("val_psnr")
    return (
        f"the dVAE's codebook collapsed: at update {step} its validation reconstructions use "
        f"{int(val.get('val_codes_used', 0))} of {cfg.model.vocab_size} codes"
        + (f" (PSNR {psnr:.1f} dB)" if isinstance(psnr, float) else "")
        + f", so its tokens carry nothing and a prior trained on them learns nothing. A checkpoint is in "
        f"{cfg.run.run_dir}/checkpoints. What has kept it spread (docs/demo.md): optim.grad_clip=1.0, a lower "
        "schedule.lr_start, schedule.lr_warmup_steps, loss.usage_weight; or another run.seed. "
        "(loss.collapse_codes=0 trains on regardless.)"
    )


# The five orders of (R, G, B) other than the identity.
_PERMUTATIONS = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def shuffle_channels(images: torch.Tensor, p: float) -> torch.Tensor:
    """Each image of a (B, 3, H, W) batch with its channels in another order with probability ``p``.

    Draws from torch's global generator (saved in checkpoints, so a resumed run draws the same).
    """
    if p <= 0:
        return images
    b = images.shape[0]
    pick = torch.randint(0, len(_PERMUTATIONS), (b,))
    order = torch.where((torch.rand(b) < p)[:, None], _PERMUTATIONS[pick], torch.arange(3))
    index = order.to(images.device)[:, :, None, None].expand_as(images)
    return torch.gather(images, 1, index)


@dataclass
class DVAERunArgs(RunArgs):
    """The run (train/loop.py's RunArgs), with the dVAE's defaults and its reconstruction grid."""

    run_dir: str = arg("runs/dvae", "Folder for checkpoints, metrics, grids and the exported model.")
    seed: int = arg(0, "Seed of the weights and the Gumbel noise (each rank adds its rank).", ge=0)
    val_shards: str | None = arg("data/emoji/val/*.tar", "Validation shards; null: no validation.")
    grid_images: int = arg(16, "Validation images in the reconstruction grid.", ge=0)


@dataclass
class DVAETrainConfig:
    """Everything a dVAE run reads."""

    model: DVAEArgs = arg(factory=DVAEArgs, doc="The dVAE's sizes.")
    data: DataArgs = arg(factory=DataArgs, doc="Training images.")
    augment: AugmentArgs = arg(factory=AugmentArgs, doc="Augmentations of the training images.")
    loss: LossArgs = arg(factory=LossArgs, doc="Terms added to the paper's objective.")
    init: DVAEInitArgs = arg(factory=DVAEInitArgs, doc="Start from a trained dVAE's weights (fine-tuning).")
    schedule: ScheduleArgs = arg(factory=ScheduleArgs, doc="tau, beta and lr schedules.")
    optim: OptimArgs = arg(factory=OptimArgs, doc="Optimiser and EMA.")
    precision: AutocastArgs = arg(factory=AutocastArgs, doc="Autocast precision of the convolutions.")
    run: DVAERunArgs = arg(factory=DVAERunArgs, doc="The run.")
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


def usage_weight_at(cfg: DVAETrainConfig, step: int) -> float:
    """loss.usage_weight at ``step``: held, or annealed to 0 over schedule.usage_steps."""
    steps = cfg.schedule.usage_steps
    return cfg.loss.usage_weight if steps is None else cosine(step, cfg.loss.usage_weight, 0.0, steps)


def schedule_at(s: ScheduleArgs, step: int) -> dict[str, float]:
    return {
        "tau": cosine(step, s.tau_start, s.tau_end, s.tau_steps),
        "beta": cosine(step, s.beta_start, s.beta_end, s.beta_steps),
        "lr": cosine(step, s.lr_start, s.lr_end, s.lr_steps) * min(1.0, (step + 1) / max(1, s.lr_warmup_steps)),
    }


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of ``precision.dtype`` (``auto`` resolved by precision.pick_precision;
    fp16 on a CPU raises a ConfigError naming the key)."""
    if precision not in ("fp32", "bf16"):
        precision = pick_precision(precision, device, "precision.dtype").dtype
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class State:
    """What the loop carries between steps."""

    model: DVAE
    net: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    ema: EMA
    scaler: torch.amp.GradScaler | None
    loader: Loader
    counters: Counters = field(default_factory=Counters)  # the step, and updates dropped for a non-finite gradient

    @property
    def step(self) -> int:
        return self.counters.step

    def train_state(self) -> TrainState:
        """The registered objects a checkpoint holds (loop.TrainState)."""
        ts = TrainState(self.counters)
        ts.register("model", ModuleState(self.model), "file")
        ts.register("ema", self.ema, "file")
        ts.register("optimizer", OptimizerState(self.opt))
        ts.register("scaler", self.scaler)
        ts.register("loader", self.loader, "rank")
        ts.register("rng", RNGState(), "rank")
        return ts


def train_step(st: State, images: torch.Tensor, cfg: DVAETrainConfig, dev: torch.device) -> dict[str, float]:
    """One update: schedules, forward under autocast, backward, clip, step, EMA."""
    sched = schedule_at(cfg.schedule, st.step) | {"usage_weight": usage_weight_at(cfg, st.step)}
    set_lr(st.opt, sched["lr"])
    images = shuffle_channels(images, cfg.augment.channel_shuffle)
    with autocast(dev, cfg.precision.dtype):
        out = st.net(images, tau=sched["tau"], beta=sched["beta"], usage_weight=sched["usage_weight"])
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
    st.counters.skipped_steps += not finite
    st.counters.nonfinite_in_row = 0 if finite else st.counters.nonfinite_in_row + 1
    st.ema.update(st.model, st.step)
    st.counters.step += 1
    counts = torch.bincount(out.logits.argmax(1).flatten(), minlength=cfg.model.vocab_size)
    return {
        "loss": out.loss.item(),
        "nll_bpd": float(nll_to_bits_per_dim(out.nll.item())),
        "kl": out.kl.item(),
        "grad_norm": grad_norm,
        **{f"batch_{k}": v for k, v in codebook_usage(counts).items() if k != "codebook_size"},
        "skipped_steps": float(st.counters.skipped_steps),
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
        **{f"val_{k}": v for k, v in codebook_usage(counts).items() if k != "codebook_size"},
    }
    return metrics, shown


def build(cfg: DVAETrainConfig, d: distributed.Dist, load_init: bool = True) -> State:
    """Model (from ``init.dvae``'s weights when set and ``load_init``: a resumed run reads its own
    checkpoint instead), optimizer, EMA (from the loaded weights), loader."""
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = DVAE(cfg.model)
    if cfg.init.dvae is not None and load_init:
        record = load_dvae_init(model, cfg.init, cfg.model)
        if d.is_main:
            atomic_write_text(Path(cfg.run.run_dir) / "init.json", json.dumps(record, indent=2) + "\n")
    # channels_last: oneDNN's and cuDNN's fast conv layout (1.4-1.65x on this CPU, bf16 and fp32)
    model = model.to(d.device, memory_format=torch.channels_last)
    opt = adamw(
        model,
        cfg.schedule.lr_start,
        (cfg.optim.beta1, cfg.optim.beta2),
        cfg.optim.eps,
        cfg.optim.weight_decay,
    )
    ema = EMA(model, cfg.optim.ema_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision.dtype == "fp16" else None
    loader = Loader(cfg.data.shards, cfg.data, rank=d.rank, world_size=d.world_size)
    torch.manual_seed(cfg.run.seed + 1000 * (d.rank + 1))  # a different Gumbel noise stream per rank
    net = DistributedDataParallel(model) if d.world_size > 1 else model
    return State(model, net, opt, ema, scaler, loader)


def export(st: State, cfg: DVAETrainConfig, run_dir: Path) -> Path:
    """``RUN/dvae``: the EMA weights as model.safetensors (what from_pretrained loads) and the raw ones."""
    model = DVAE(cfg.model)
    load_state_strict(model, st.ema.state_dict(), "EMA")
    files = {"model": model.state_dict(), "raw": st.model.state_dict()}
    return save_pretrained(run_dir / "dvae", cfg.model, files, full_config=cfg)


# The update counts of the config that scale with the run's length (the demo's time plan, run.end_by).
LENGTH_KEYS = (
    "run.steps",
    "schedule.tau_steps",
    "schedule.beta_steps",
    "schedule.lr_steps",
    "schedule.usage_steps",
    "run.ckpt_every",
    "run.val_every",
)


class DVAETask(Task):
    """The dVAE's part of the loop (train/loop.py): its step, validation with a grid, and export."""

    show = ("loss", "nll_bpd", "tau", "beta")
    val_key = "val_psnr"
    length_keys = LENGTH_KEYS

    def __init__(self, cfg: DVAETrainConfig, run_cfg: DVAETrainConfig, d: distributed.Dist, st: State) -> None:
        self.config, self.run_cfg, self.d, self.st = cfg, run_cfg, d, st
        self.state = st.train_state()
        self.ckpts = Checkpoints(cfg.run.run_dir, cfg.run.keep)
        self.run_dir = Path(cfg.run.run_dir)
        self.seen = 0

    def batches(self) -> Iterator[Any]:
        return iter(self.st.loader)

    def train_step(self, it: Iterator[Any]) -> dict[str, float]:
        images = next(it)["image"].to(self.d.device, non_blocking=True).float().div_(255)
        images = images.contiguous(memory_format=torch.channels_last)
        self.seen += images.shape[0]
        return train_step(self.st, images, self.run_cfg, self.d.device)

    def rate(self, updates: int, seconds: float) -> dict[str, float]:
        seen, self.seen = self.seen, 0
        return {"img_per_s": seen * self.d.world_size / seconds}

    def data_errors(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.st.loader.errors.items()}

    def replica(self) -> torch.nn.Module:
        return self.st.model

    def evaluate(self, validate: bool, sample: bool) -> dict[str, Any]:
        if not validate:
            return {}
        val = _validate_and_show(self.st, self.run_cfg, self.d, self.run_dir)
        limit = self.config.loss.collapse_codes
        dead = bool(limit) and self.step >= COLLAPSE_FROM and val.get("val_codes_used", limit + 1) <= limit
        if any_rank(self.d.is_main and dead, self.d.device):  # rank 0 validates; every rank stops
            self.save()
            raise CodebookCollapsed(collapse_message(val, self.config, self.step))
        return val

    def export(self) -> Path | None:
        return export(self.st, self.config, self.run_dir) if self.d.is_main else None


@denormals_flushed()
def train(cfg: DVAETrainConfig, resume_run: bool = False, stop: StopRequested | None = None) -> dict[str, Any]:
    """Train (or continue) a dVAE run; returns the last validation metrics (rank 0), the step and
    how the run ended.

    ``cfg`` is what the run's config.yaml, checkpoints and export keep (``auto`` stays ``auto``); the
    loop runs a copy with the picked precision, noted in config.yaml's header and the log."""
    d = distributed.init(cfg.run.device)
    pick = agree_across_ranks(pick_precision(cfg.precision.dtype, d.device, "precision.dtype"))  # fp16 on CPU fails
    if d.is_main:
        log.info("precision: %s", pick.reason)
    run_cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype=pick.dtype))
    latest = checkpoint_to_resume(cfg.run, resume_run)
    check_run_shards(cfg.data.shards, cfg.run.val_shards, d.world_size, cfg.data.num_workers)
    warn_long_schedules(cfg.schedule, ("tau_steps", "beta_steps", "lr_steps"), cfg.run.steps, d.is_main)
    with deterministic(cfg.run.deterministic, d.device):
        task = DVAETask(cfg, run_cfg, d, build(run_cfg, d, load_init=latest is None))
        if latest is not None:
            task.resume(latest)
            log.info("resumed from %s at step %d", latest, task.step)
        if d.is_main:
            save_config(cfg, task.run_dir, header=f"precision: {pick.reason}")
        logger = MetricsLogger(task.run_dir, cfg.log, cfg, cfg.run.steps, task.step, d.is_main)
        try:
            return fit(task, cfg.run, logger, stop)
        finally:
            logger.close()


def _validate_and_show(st: State, cfg: DVAETrainConfig, d: distributed.Dist, run_dir: Path) -> dict[str, Any]:
    """Rank 0 validates the EMA weights and writes a grid of originals beside reconstructions."""
    val: dict[str, Any] = {}
    if d.is_main and cfg.run.val_shards is not None:
        model = DVAE(cfg.model).to(d.device, memory_format=torch.channels_last)
        model.load_state_dict(st.ema.state_dict())
        val, shown = validate(model, cfg, d.device)
        if shown:
            path = run_dir / "grids" / f"recon_{st.step:08d}.png"
            save_png(grid(shown, ncol=8, scale=2), path)
            save_png(grid(shown, ncol=8, scale=2), run_dir / "recon_latest.png")
    distributed.barrier()
    return val
