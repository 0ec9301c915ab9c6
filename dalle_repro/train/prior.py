"""Training the prior (SPEC §2-3) under DeepSpeed, on one rank or many nodes, with exact resume.

The input is either token shards (tools/encode_tokens.py; ``data.kind: tokens``) or image shards
encoded on the fly by a dVAE (``data.kind: images`` with ``dvae``). Captions become text tokens with
the BPE tokenizer (with BPE dropout), and with probability ``run.caption_dropout`` the empty caption
(all pads) for classifier-free guidance.

DeepSpeed: the engine's config is generated from ours (ZeRO stage, precision, micro-batch, gradient
accumulation, clipping, optimizer) and written to ``RUN/deepspeed.json``; a JSON of the user's own
is merged over it. The learning-rate schedule (warm-up, then cosine or halve-on-plateau) is a
client scheduler that DeepSpeed steps and checkpoints.

Precision (``precision.mode``):

- ``block_scaled`` (default): the engine keeps fp32 weights; each resblock computes in ``precision.dtype``
  with per-resblock gradient scaling and the non-finite filter (core/precision.py), so an overflow in
  one block skips only that block's update. The scales are part of the train state.
  ``precision.dtype: auto`` (the default) is bf16 where the device runs it natively and fast, else
  fp32 (precision.pick_precision), decided at start; config.yaml keeps ``auto`` and notes the pick.
- ``deepspeed``: DeepSpeed's own bf16/fp16 (half weights, one loss scale), for comparison.

A step whose loss is non-finite on any rank is skipped (no parameter moves and Adam's moments are
untouched, at every ZeRO stage: train/exact_skip.py) and counted; after
``run.max_nonfinite`` in a row the run writes a checkpoint and stops with an error.

Checkpoints (``RUN/checkpoints/``): DeepSpeed's own checkpoint of the engine (weights, optimizer,
scheduler; any ZeRO stage) in ``deepspeed/step_N/``, then ``step_N/`` written atomically by rank 0
with the EMA weights (safetensors), the per-rank data positions and RNG states, the block scales,
the counters and the config. ``step_N/state.json`` exists only once both are whole, and only such
checkpoints are resumed from. DeepSpeed's stock checkpoint engine pickles; the run swaps in
``ds_checkpoint``'s, so DeepSpeed's files are safetensors too (in DeepSpeed's own file layout) and
``--resume`` unpickles nothing. Exports and our own state are safetensors, JSON and YAML.

Sizes (``resolve_sizes``): ``model.text_len``, ``model.text_vocab``, ``model.grid``,
``model.image_vocab`` and, for image shards, ``data.image_size`` are read off their sources when
left null (the default): ``text.text_len``, the tokenizer file, the dVAE folder, the token shards'
``summary.json``. A value given anyway is checked against its source. ``RUN/config.yaml`` holds the
values used, with where each came from in its header.

SIGTERM (a preempted job) finishes the current step, writes a checkpoint and exits with status 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from dalle_repro.core import distributed, faults
from dalle_repro.core.config import ConfigError, load_yaml, save_config, to_dict
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.images import grid, save_png
from dalle_repro.core.precision import Pick, agree_across_ranks, denormals_flushed, pick_precision
from dalle_repro.core.pretrained import load_state_strict, model_shapes, shape_mismatch
from dalle_repro.data.loader import Loader
from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.models.block_scaling import BlockScaler
from dalle_repro.models.dvae import DVAE
from dalle_repro.models.transformer import Transformer
from dalle_repro.sample.export import write_export
from dalle_repro.train.checkpoint import Checkpoints
from dalle_repro.train.deepspeed import (
    check_safe_loading,
    client_optimizer,
    deepspeed_config,
    gathered,
    gradient_clipping_off,
    initialize,
)
from dalle_repro.train.exact_skip import step_without
from dalle_repro.train.finetune import freeze, load_prior_init, prior_init_config
from dalle_repro.train.inputs import check_run_shards, warn_long_schedules
from dalle_repro.train.loop import Counters as LoopCounters
from dalle_repro.train.loop import (
    NonFiniteLosses,
    RNGState,
    StopRequested,
    Task,
    TrainState,
    any_rank,
    checkpoint_to_resume,
    deterministic,
    fit,
)
from dalle_repro.train.metrics import MetricsLogger
from dalle_repro.train.optim import EMA, cosine, param_groups
from dalle_repro.train.prior_config import (
    LENGTH_KEYS,
    PriorScheduleArgs,
    PriorTrainConfig,
    check_token_shards,
    check_tokens_match_dvae,
    resolve_sizes,
)

log = logging.getLogger(__name__)
__all__ = ["Counters", "NonFiniteLosses", "StopRequested", "train"]  # the loop's names the CLI and tests import here


# ----------------------------------------------------------------------------------------------
# Learning rate


class LRSchedule:
    """Warm-up, then cosine / plateau / constant. DeepSpeed calls :meth:`step` after each update and
    saves :meth:`state_dict` in its checkpoint; :meth:`report` feeds the plateau rule."""

    def __init__(self, optimizer: torch.optim.Optimizer, args: PriorScheduleArgs, total_steps: int):
        self.optimizer, self.args, self.total = optimizer, args, total_steps
        self.last_step = 0
        self.factor = 1.0
        self.best = math.inf
        self.stale = 0
        self.apply()

    def lr_at(self, step: int) -> float:
        a = self.args
        if step < a.warmup_steps:
            return a.lr * (step + 1) / a.warmup_steps
        if a.decay == "cosine":
            steps = a.decay_steps if a.decay_steps is not None else max(1, self.total - a.warmup_steps)
            return cosine(step - a.warmup_steps, a.lr, a.lr_end, steps)
        if a.decay == "plateau":
            return max(a.lr * self.factor, a.lr_end)
        return a.lr

    def apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.last_step)

    def step(self, **_: Any) -> None:
        self.last_step += 1
        self.apply()

    def report(self, val_loss: float) -> None:
        """The plateau rule: after ``plateau_patience`` validations without a new best, lower the rate."""
        if val_loss < self.best:
            self.best, self.stale = val_loss, 0
            return
        self.stale += 1
        if self.args.decay == "plateau" and self.last_step >= self.args.warmup_steps:
            if self.stale >= self.args.plateau_patience:
                self.factor *= self.args.plateau_factor
                self.stale = 0
                log.info("validation loss stalled: learning rate now %.3g", self.lr_at(self.last_step))
                self.apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "factor": self.factor, "best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.factor = int(state["last_step"]), float(state["factor"])
        self.best, self.stale = float(state["best"]), int(state["stale"])
        self.apply()


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class Counters(LoopCounters):
    """The loop's counters, and the events only the prior has; part of the train state."""

    skipped_blocks: int = 0
    caption_dropped: int = 0
    captions_seen: int = 0
    captions_truncated: int = 0  # longer than text.text_len: the tokenizer cut them


@dataclass
class Run:
    cfg: PriorTrainConfig
    d: distributed.Dist
    model: Transformer
    engine: Any
    scheduler: LRSchedule
    scaler: BlockScaler | None
    ema: EMA | None  # rank 0 only
    loader: Loader
    tokenizer: TextTokenizer
    dvae: DVAE | None
    empty_text: torch.Tensor
    run_dir: Path
    counters: Counters = field(default_factory=Counters)
    written_cfg: PriorTrainConfig | None = None  # what checkpoints and the export store (precision auto kept)
    init_record: dict[str, Any] | None = None  # what a fine-tuning run started from (RUN/init.json)

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def zero(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def train_state(self) -> TrainState:
        """Our part of a checkpoint as registered objects (DeepSpeed's engine saves the rest itself)."""
        ts = TrainState(self.counters)
        ts.register("ema", self.ema, "file")
        ts.register("block_scaler", self.scaler)
        ts.register("loader", self.loader, "rank")
        ts.register("rng", RNGState(), "rank")
        return ts


def build(cfg: PriorTrainConfig, d: distributed.Dist, load_init: bool = True) -> Run:
    """The model (from ``init.export``'s weights when set and ``load_init``: a run that resumes reads
    its own checkpoint instead), DeepSpeed's engine, the loader, the EMA."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = Transformer(cfg.model)
    init_record = load_prior_init(model, cfg.init) if cfg.init.export is not None and load_init else None
    model = model.to(d.device)
    scaler = model.enable_precision(cfg.precision) if cfg.precision.mode == "block_scaled" else None
    freeze(model, cfg.init.freeze)  # after the block scaler's hooks: a frozen tensor takes none
    tokenizer = TextTokenizer(cfg.text.path, cfg.text.text_len)
    dvae = DVAE.from_pretrained(cfg.dvae).to(d.device).eval() if cfg.dvae is not None else None
    ds_config = deepspeed_config(cfg, d.world_size)
    optimizer = client_optimizer(model, cfg)
    if d.is_main:
        for note in distributed.extension_notes(d.device):
            log.warning(note)
    engine = initialize(
        model,
        optimizer,
        param_groups(model, cfg.optim.weight_decay) if optimizer is None else None,
        lambda opt: LRSchedule(opt, cfg.schedule, cfg.run.steps),
        ds_config,
    )
    if d.is_main:
        atomic_write_text(Path(cfg.run.run_dir) / "deepspeed.json", json.dumps(ds_config, indent=2) + "\n")
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the optimizer
        log.info(
            "optimizer: %s (optim.impl=%s), ZeRO stage %d",
            type(base).__name__,
            cfg.optim.impl,
            cfg.deepspeed.zero_stage,
        )
    loader = Loader(
        cfg.data.shards,
        cfg.data,
        tokenizer,
        text_dropout=cfg.text.dropout,
        rank=d.rank,
        world_size=d.world_size,
        token_grid=cfg.model.grid,
        token_vocab=cfg.model.image_vocab,
    )
    ema = gathered(engine, lambda: EMA(model, cfg.optim.ema_decay), d)  # rank 0 keeps the EMA
    empty = torch.tensor(tokenizer.encode(""), dtype=torch.long)
    torch.manual_seed(cfg.run.seed + 1000 * (d.rank + 1))  # caption dropout and model dropout differ per rank
    run = Run(
        cfg, d, model, engine, engine.lr_scheduler, scaler, ema, loader, tokenizer, dvae, empty, Path(cfg.run.run_dir)
    )
    init_file = run.run_dir / "init.json"
    if init_record is not None and d.is_main:
        atomic_write_text(init_file, json.dumps(init_record, indent=2) + "\n")
    run.init_record = init_record or (json.loads(init_file.read_text()) if init_file.is_file() else None)
    return run


def batch_tokens(r: Run, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, image) LongTensors on the device; image shards go through the dVAE; caption dropout."""
    a = r.cfg.model
    text = batch["text"].to(r.d.device)
    if "image_tokens" in batch:
        image = batch["image_tokens"].to(r.d.device)
    else:
        assert r.dvae is not None
        with torch.no_grad():
            image = r.dvae.encode(batch["image"].to(r.d.device).float() / 255)
    if tuple(image.shape[1:]) != (a.grid, a.grid):
        raise ValueError(
            f"image tokens of shape {tuple(image.shape[1:])} in shards {r.cfg.data.shards}, but model.grid is {a.grid}"
        )
    if train and "caption" in batch:
        count_truncated(r, batch["caption"], text)
    if train and r.cfg.run.caption_dropout > 0:
        drop = torch.rand(text.shape[0]) < r.cfg.run.caption_dropout
        if drop.any():
            text = torch.where(drop.to(text.device)[:, None], r.empty_text.to(text.device), text)
            r.counters.caption_dropped += int(drop.sum())
    return text, image.flatten(1).long()


def count_truncated(r: Run, captions: list[str], text: torch.Tensor) -> None:
    """Count the captions the tokenizer cut at ``text.text_len``: only a row whose last position is
    not a pad can have been cut, so only those are encoded again, whole."""
    tok = r.tokenizer
    full = (text[:, -1] < tok.bpe_vocab_size).tolist()
    cut = sum(1 for c, f in zip(captions, full, strict=True) if f and len(tok.bpe_ids(c)) > tok.text_len)
    r.counters.captions_seen += len(captions)
    r.counters.captions_truncated += cut


def train_step(r: Run, it: Any) -> dict[str, float]:
    """One update: ``grad_accum`` micro-batches through the engine, the block scaler, the skip rules."""
    engine = r.engine
    gas = engine.gradient_accumulation_steps()
    sums = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
    nonfinite = False
    for micro in range(gas):
        text, image = batch_tokens(r, next(it), train=True)
        out = r.model.loss_from_logits(text, image, *engine(text, image))
        loss_ok = bool(torch.isfinite(out.loss))
        nonfinite |= not loss_ok
        for k, v in (("loss", out.loss), ("text_loss", out.text), ("image_loss", out.image)):
            sums[k] += v.item() / gas if loss_ok else 0.0
        engine.backward(out.loss)
        if micro < gas - 1:
            engine.step()  # DeepSpeed counts micro-batches; it updates only at the boundary
    skipped: list[int] = []
    rest_bad = False
    if r.scaler is not None:
        skipped, rest_bad = r.scaler.end_step(r.model.branch_params(), r.step, drop_grads=False)
    skip = any_rank(nonfinite, r.d.device)
    if skip:  # a non-finite loss: the whole update is skipped
        frozen = list(r.model.parameters())
    else:  # the skipped branches, and the parameters outside them if they saw a non-finite gradient
        frozen = [p for j in skipped for p in r.model.branch_params()[j]] + (r.model.other_params() if rest_bad else [])
    lr = r.scheduler.get_last_lr()[0]
    grad_norm = float("nan")
    if r.zero == 0:
        for p in frozen:
            p.grad = None
        grads = [p.grad for p in r.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    # DeepSpeed's clip fails when no parameter has a gradient
    nothing_left = r.zero == 0 and len(frozen) == sum(1 for _ in r.model.parameters())
    with gradient_clipping_off(engine, nothing_left):
        step_without(engine, frozen)  # exact at every ZeRO stage (dalle_repro/train/exact_skip.py)
    if r.zero > 0:
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
    r.counters.step += 1
    if skip:
        r.counters.skipped_steps += 1
        r.counters.nonfinite_in_row += 1
    else:
        r.counters.nonfinite_in_row = 0
        gathered(engine, lambda: r.ema.update(r.model, r.step - 1), r.d)  # type: ignore[union-attr]
    r.counters.skipped_blocks += len(skipped)
    return sums | {
        "lr": lr,
        "grad_norm": grad_norm,
        "skipped_step": float(skip),
        "blocks_skipped": float(len(skipped)),
    }


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save(r: Run, ts: TrainState, ckpts: Checkpoints) -> Path:
    """DeepSpeed's checkpoint (every rank), then our state folder (rank 0), which completes it."""
    tag = f"step_{r.step:08d}"
    ds_root = ckpts.root / "deepspeed"
    files, state = ts.gather(r.d, r.model if r.zero < 3 else None)  # below ZeRO 3 every rank holds all weights
    r.engine.save_checkpoint(str(ds_root), tag=tag, save_latest=False)
    distributed.barrier()
    faults.point("deepspeed_saved", tag)
    path = ckpts.root / tag
    if r.d.is_main:
        state |= {"deepspeed_tag": tag, "zero_stage": r.zero}
        path = ckpts.save(r.step, files, state, r.written_cfg or r.cfg)
        kept = {p.name for p in ckpts.all()}
        for old in ds_root.iterdir():
            if old.is_dir() and old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return path


def resume(r: Run, ts: TrainState, latest: Path) -> None:
    files, state = Checkpoints.load(latest)
    theirs = {k: tuple(v.shape) for k, v in files["ema"].items()}
    problem = shape_mismatch(model_shapes(r.model), theirs, f"{latest} (written with {latest / 'config.yaml'})")
    if problem:
        was = load_yaml(latest / "config.yaml").get("model", {})
        now = to_dict(r.cfg.model)
        changed = [f"model.{k}: {was.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now if was.get(k) != now[k]]
        raise ValueError(
            problem
            + "\n  settings that differ: "
            + ("; ".join(changed) or "none in model.*")
            + "\nResume with the model settings the run was started with."
        )
    if len(state["ranks"]) != r.d.world_size:
        raise ValueError(f"{latest} was written by {len(state['ranks'])} ranks; this run has {r.d.world_size}")
    tag = state["deepspeed_tag"]
    ds_root = latest.parent / "deepspeed"
    if not (ds_root / tag).is_dir():
        raise FileNotFoundError(f"{latest} needs DeepSpeed's checkpoint {ds_root / tag}, which is missing")
    check_safe_loading(r.engine)
    load_path, _ = r.engine.load_checkpoint(
        str(ds_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ds_root / tag}")
    ts.restore(latest, files, state, r.d)


# ----------------------------------------------------------------------------------------------
# Validation, samples, export


def _eval_model(r: Run) -> Transformer | None:
    """A plain copy of the model with the EMA weights, on rank 0 (half-precision blocks as in training)."""
    if not r.d.is_main:
        return None
    assert r.ema is not None
    m = Transformer(r.cfg.model).to(r.d.device)
    load_state_strict(m, {k: v.to(r.d.device) for k, v in r.ema.state_dict().items()}, "EMA")
    if r.cfg.precision.dtype != "fp32":
        m.enable_precision(r.cfg.precision)
    return m.eval()


def _val_loader(r: Run) -> Loader | None:
    if r.cfg.run.val_shards is None:
        return None
    args = dataclasses.replace(r.cfg.data, crop="center", shuffle=False, num_workers=0)
    m = r.cfg.model
    return Loader(r.cfg.run.val_shards, args, r.tokenizer, epochs=1, token_grid=m.grid, token_vocab=m.image_vocab)


@torch.no_grad()
def validate(r: Run, model: Transformer) -> dict[str, float]:
    loader = _val_loader(r)
    if loader is None:
        return {}
    sums, n = {"val_loss": 0.0, "val_text_loss": 0.0, "val_image_loss": 0.0}, 0
    for i, batch in enumerate(loader):
        if r.cfg.run.val_batches and i >= r.cfg.run.val_batches:
            break
        text, image = batch_tokens(r, batch, train=False)
        out = model.loss(text, image)
        b = text.shape[0]
        sums["val_loss"] += out.loss.item() * b
        sums["val_text_loss"] += out.text.item() * b
        sums["val_image_loss"] += out.image.item() * b
        n += b
    if n == 0:
        raise RuntimeError(f"no validation sample in {r.cfg.run.val_shards}")
    return {k: v / n for k, v in sums.items()}


def sample_captions(r: Run) -> list[str]:
    """The grid's fixed captions: the first ``run.sample_captions`` of the validation split, then the prompts."""
    captions: list[str] = []
    loader = _val_loader(r)
    if loader is not None and r.cfg.run.sample_captions:
        for batch in loader:
            captions += batch["caption"]
            if len(captions) >= r.cfg.run.sample_captions:
                break
    return captions[: r.cfg.run.sample_captions] + list(r.cfg.run.sample_prompts)


@torch.no_grad()
def sample_grid(r: Run, model: Transformer, captions: list[str]) -> Path | None:
    if r.dvae is None or not captions:
        return None
    text = torch.tensor([r.tokenizer.encode(c) for c in captions], dtype=torch.long, device=r.d.device)
    gen = torch.Generator(device=r.d.device).manual_seed(r.cfg.run.seed)
    tokens = model.generate(text, temperature=1.0, generator=gen)
    images = r.dvae.decode(tokens.view(-1, r.cfg.model.grid, r.cfg.model.grid)).cpu()
    sheet = grid(list(images), ncol=min(8, len(captions)), labels=captions, scale=2)
    path = save_png(sheet, r.run_dir / "samples" / f"step_{r.step:08d}.png")
    save_png(sheet, r.run_dir / "samples_latest.png")
    return path


def export(r: Run) -> Path | None:
    """``RUN/export``: what launch/sample.py loads (sample/export.py); rank 0 writes."""
    raw = gathered(r.engine, lambda: {k: v.detach().cpu().clone() for k, v in r.model.state_dict().items()}, r.d)
    if not r.d.is_main:
        return None
    assert r.ema is not None
    info = {"step": r.step, "text_len": r.cfg.model.text_len, "caption_dropout": r.cfg.run.caption_dropout}
    if r.init_record is not None:
        info["fine_tuned_from"] = r.init_record
    cfg = r.written_cfg or r.cfg  # precision auto stays auto: the sampler picks on its own machine
    ema = r.ema.state_dict()
    return write_export(r.run_dir / "export", cfg, ema, raw, cfg.text.path, cfg.dvae, info, cfg.run.copy_dvae)


# ----------------------------------------------------------------------------------------------
# The prior's part of the loop


class PriorTask(Task):
    """The prior's part of the loop (train/loop.py): its step, DeepSpeed's checkpoints, validation,
    sample grids and the export."""

    show = ("loss", "text_loss", "image_loss", "lr")
    val_key = "val_loss"
    length_keys = LENGTH_KEYS

    def __init__(self, r: Run) -> None:
        self.r, self.d = r, r.d
        self.state = r.train_state()
        self.ckpts = Checkpoints(r.run_dir, r.cfg.run.keep)
        self.config = r.written_cfg or r.cfg
        self.sample_every = r.cfg.run.sample_every
        self.captions = sample_captions(r) if r.d.is_main else []
        gas = r.engine.gradient_accumulation_steps()
        self.tokens_per_update = r.cfg.data.batch_size * r.cfg.model.seq_len * gas * r.d.world_size

    def batches(self) -> Iterator[Any]:
        return iter(self.r.loader)

    def train_step(self, it: Iterator[Any]) -> dict[str, float]:
        return train_step(self.r, it)

    def rate(self, updates: int, seconds: float) -> dict[str, float]:
        return {"tok_per_s": updates * self.tokens_per_update / seconds}

    def data_errors(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.loader.errors.items()}

    def save(self) -> Path:
        return save(self.r, self.state, self.ckpts)

    def resume(self, path: Path) -> None:
        resume(self.r, self.state, path)

    def evaluate(self, validate: bool, sample: bool) -> dict[str, Any]:
        return _validate_and_sample(self.r, self.captions, validate, sample)

    def export(self) -> Path | None:
        return export(self.r)

    def length_changed(self) -> None:
        """run.end_by changed the run's length: the cosine's length (when it follows run.steps) and the
        samples' interval follow it, from this update on."""
        self.r.scheduler.total = self.r.cfg.run.steps
        self.r.scheduler.apply()
        self.sample_every = self.r.cfg.run.sample_every

    def finish(self, val: dict[str, Any]) -> dict[str, Any]:
        """The share of training captions the tokenizer cut, said once at the end of the run."""
        c = self.r.counters
        share = c.captions_truncated / c.captions_seen if c.captions_seen else 0.0
        if self.d.is_main and c.captions_truncated:
            log.warning(
                "%d of %d training captions (%.1f%%) were longer than text.text_len=%d tokens and were cut; "
                "a larger text.text_len keeps them whole",
                c.captions_truncated,
                c.captions_seen,
                100 * share,
                self.r.cfg.text.text_len,
            )
        return {"captions_truncated": c.captions_truncated, "captions_truncated_share": share}


@denormals_flushed()
def train(cfg: PriorTrainConfig, resume_run: bool = False, stop: StopRequested | None = None) -> dict[str, Any]:
    """Train (or continue) a prior run; returns the last validation metrics on rank 0."""
    d = distributed.init(cfg.run.device, require_group=True)
    with deterministic(cfg.run.deterministic, d.device):
        return _train(cfg, d, resume_run, stop)


def picked_precision(cfg: PriorTrainConfig, d: distributed.Dist) -> Pick:
    """``precision.dtype`` resolved on this machine (rank 0's pick on every rank), logged on rank 0."""
    pick = agree_across_ranks(pick_precision(cfg.precision.dtype, d.device, "precision.dtype"))
    if cfg.precision.mode == "deepspeed" and pick.dtype == "fp32":
        raise ConfigError(f"precision.dtype: precision.mode 'deepspeed' needs bf16 or fp16, and {pick.reason}")
    if d.is_main:
        log.info("precision: %s (mode %s)", pick.reason, cfg.precision.mode)
    return pick


def _train(cfg: PriorTrainConfig, d: distributed.Dist, resume_run: bool, stop: StopRequested | None) -> dict[str, Any]:
    latest = checkpoint_to_resume(cfg.run, resume_run)
    check_run_shards(cfg.data.shards, cfg.run.val_shards, d.world_size, cfg.data.num_workers)
    warn_long_schedules(cfg.schedule, ("warmup_steps", "decay_steps"), cfg.run.steps, d.is_main)
    cfg = prior_init_config(cfg)
    check_tokens_match_dvae(cfg)
    cfg, sizes = resolve_sizes(cfg)
    pick = picked_precision(cfg, d)
    if cfg.data.kind == "tokens":
        check_token_shards(cfg)  # the first shard's grid, where no summary.json says which dVAE made them
    picked = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype=pick.dtype))
    r = build(picked, d, load_init=latest is None)
    r.written_cfg = cfg
    task = PriorTask(r)
    if latest is not None:
        task.resume(latest)
        log.info("resumed from %s at step %d", latest, r.step)
    if d.is_main:  # after resume, so a config that cannot resume does not overwrite the run's own
        save_config(cfg, r.run_dir, header="\n".join([f"precision: {pick.reason}", *sizes]))
    logger = MetricsLogger(r.run_dir, cfg.log, cfg, cfg.run.steps, r.step, d.is_main)
    try:
        return fit(task, cfg.run, logger, stop)
    finally:
        logger.close()


def _validate_and_sample(r: Run, captions: list[str], validate_now: bool, sample_now: bool) -> dict[str, Any]:
    model = _eval_model(r)
    val: dict[str, Any] = {}
    if model is not None:
        if validate_now:
            val = validate(r, model)
        if sample_now:
            sample_grid(r, model, captions)
    loss = [val.get("val_loss", math.nan)]
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.broadcast_object_list(loss, src=0)
    if validate_now and not math.isnan(loss[0]):
        r.scheduler.report(loss[0])  # every rank, so the plateau rule stays in step
    return val
