"""A small CLIP trained contrastively on our own shards, so that the demo reranks with no download.

The model is Hugging Face's ``CLIPModel`` with a small config, and the folder it writes has the
layout of a downloaded CLIP (``config.json``, ``model.safetensors``, ``tokenizer.json`` and its
config, ``preprocessor_config.json``), so the demo exercises the same rerank path (sample/rerank.py) as
a real ``openai/clip-vit-base-patch32``. The text side reuses our BPE (data/tokenizer.py) with three
special tokens appended (bos, eos, pad); CLIP pools the text at the eos token.

It trains on the one loop (train/loop.py), as the dVAE and the prior do: checkpoints in
``RUN/checkpoints/`` (weights, optimizer, loader position, RNG), SIGTERM and ``run.stop_after``
stop with a checkpoint, ``--resume`` continues exactly, and progress goes to ``RUN/metrics.jsonl``
and the terminal. The model is written to ``RUN/clip``.

Reports retrieval accuracy on the validation shards (``RUN/clip/retrieval.json``): for each image,
is its own caption the most similar of all validation captions (top-1, top-5), and the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dalle_repro.core import distributed
from dalle_repro.core.config import ConfigError, arg, save_config
from dalle_repro.core.files import honour_umask
from dalle_repro.core.precision import AutocastArgs, denormals_flushed, pick_precision
from dalle_repro.core.pretrained import check_replaceable
from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.data.sources import expand_shards
from dalle_repro.sample.rerank import CLIP_MEAN, CLIP_STD, clip_pixels
from dalle_repro.train.checkpoint import Checkpoints, save_json
from dalle_repro.train.hard_negatives import HardNegatives
from dalle_repro.train.inputs import check_run_shards
from dalle_repro.train.loop import (
    Counters,
    RNGState,
    RunArgs,
    StopRequested,
    Task,
    TrainState,
    checkpoint_to_resume,
    deterministic,
    fit,
)
from dalle_repro.train.metrics import LogArgs, MetricsLogger, last_validation, read_metrics
from dalle_repro.train.optim import ModuleState, OptimizerState, cosine, set_lr

log = logging.getLogger(__name__)
SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|pad|>")


@dataclass
class ClipModelArgs:
    """Sizes of the small CLIP (a ViT image tower and a text transformer)."""

    image_size: int = arg(64, "Input side in pixels (the emoji are 64).", gt=0)
    patch_size: int = arg(8, "ViT patch side.", gt=0)
    width: int = arg(128, "Width of both towers.", gt=0)
    layers: int = arg(4, "Layers of each tower.", gt=0)
    heads: int = arg(4, "Attention heads.", gt=0)
    embed_dim: int = arg(128, "Dimension of the joint embedding.", gt=0)
    text_len: int = arg(32, "Text positions (captions are cut to this).", gt=2)


@dataclass
class ClipDataArgs:
    """Image shards, as the trainers' ``data.*``."""

    shards: str = arg("data/emoji/train/*.tar", "Training image shards.")
    batch_size: int = arg(64, "Pairs per batch (the contrastive negatives).", gt=1)
    num_workers: int = arg(1, "Loader workers.", ge=0)
    hard_negatives: int = arg(
        0,
        "Per image, this many other training captions one edit from its own (a word replaced, or two words "
        "exchanged) added as negatives to its image->text softmax, so that the CLIP tells which attribute goes "
        "with which object (NegCLIP; train/hard_negatives.py). 0: in-batch negatives only.",
        ge=0,
    )
    hard_negative_pool: int = arg(
        200_000, "Training captions read (from the first shards) to find the hard negatives among.", gt=0
    )


@dataclass
class ClipTextArgs:
    """The tokenizer, as the prior trainer's ``text.*``."""

    path: str = arg("data/emoji/tokenizer.json", "Our BPE tokenizer.json (tools/train_tokenizer.py).")


@dataclass
class ClipOptimArgs:
    """AdamW with a 5% warm-up, then cosine to 0."""

    lr: float = arg(1e-3, "Peak learning rate.", gt=0)
    weight_decay: float = arg(0.1, "AdamW weight decay.", ge=0)


@dataclass
class ClipRunArgs(RunArgs):
    """The run (train/loop.py's RunArgs), with the small CLIP's defaults."""

    run_dir: str = arg(
        "outputs/demo/clip", "Folder for checkpoints and metrics; the model goes to RUN/clip (Hugging Face's layout)."
    )
    overwrite: bool = arg(False, "Replace RUN/clip even if it holds files that are not a CLIP folder of ours.")
    steps: int = arg(600, "Updates.", gt=0)
    seed: int = arg(0, "Seed of the weights and the data order.", ge=0)
    ckpt_every: int = arg(200, "Updates between checkpoints (one is always written at the end).", gt=0)
    val_every: int = arg(1000, "Updates between retrieval validations (one always at the end).", gt=0)
    val_shards: str | None = arg("data/emoji/val/*.tar", "Validation shards for the retrieval accuracy.")
    val_batches: int = arg(0, "Batches of 128 pairs per validation (0: the whole split).", ge=0)


@dataclass
class ClipTrainConfig:
    """tools/train_clip.py's settings, in the trainers' sections (data.shards=, run.steps=, ...)."""

    model: ClipModelArgs = arg(factory=ClipModelArgs, doc="The small CLIP.")
    data: ClipDataArgs = arg(factory=ClipDataArgs, doc="Image shards.")
    text: ClipTextArgs = arg(factory=ClipTextArgs, doc="The tokenizer.")
    optim: ClipOptimArgs = arg(factory=ClipOptimArgs, doc="The optimiser.")
    precision: AutocastArgs = arg(factory=AutocastArgs, doc="Autocast precision (fp32 or bf16).")
    run: ClipRunArgs = arg(factory=ClipRunArgs, doc="The run.")
    log: LogArgs = arg(factory=LogArgs, doc="Logging.")

    def __post_init__(self) -> None:
        if self.precision.dtype == "fp16":
            raise ConfigError("precision.dtype: the CLIP trainer runs fp32 or bf16 (it has no loss scaling)")


def hf_tokenizer(bpe_path: str | Path, text_len: int) -> Any:
    """Our BPE as a ``PreTrainedTokenizerFast`` that appends eos and pads to ``text_len``."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(bpe_path))
    tok.add_special_tokens(list(SPECIALS))
    bos, eos = tok.token_to_id(SPECIALS[0]), tok.token_to_id(SPECIALS[1])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A {SPECIALS[1]}", special_tokens=[(SPECIALS[0], bos), (SPECIALS[1], eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        pad_token=SPECIALS[2],
        model_max_length=text_len,
    )


def build_clip(args: ClipModelArgs, tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.text_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.embed_dim))


def clip_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images from the loader -> CLIP's normalised input."""
    return clip_pixels(images.float() / 255, size)


@torch.no_grad()
def retrieval(model: Any, tokenizer: Any, shards: str, args: ClipModelArgs, batches: int = 0) -> dict[str, float]:
    """Image->text and text->image retrieval accuracy over the validation split (its first
    ``batches`` batches of 128 when not 0)."""
    loader = Loader(
        shards, DataArgs(image_size=args.image_size, batch_size=128, num_workers=0, shuffle=False), epochs=1
    )
    device = next(model.parameters()).device
    imgs, txts = [], []
    model.eval()
    for i, batch in enumerate(loader):
        if batches and i >= batches:
            break
        t = tokenizer_batch(tokenizer, batch["caption"], args.text_len)
        out = model(
            input_ids=t["input_ids"].to(device),
            attention_mask=t["attention_mask"].to(device),
            pixel_values=clip_input(batch["image"], args.image_size).to(device),
        )
        imgs.append(out.image_embeds.float().cpu())
        txts.append(out.text_embeds.float().cpu())
    model.train()
    if not imgs:
        raise RuntimeError(f"no validation sample in {shards}")
    sim = torch.cat(imgs) @ torch.cat(txts).T  # (N images, N captions); the match is the diagonal
    n = sim.shape[0]
    target = torch.arange(n)
    top5 = sim.topk(min(5, n), dim=1).indices
    return {
        "val_pairs": n,
        "image_to_text_top1": float((sim.argmax(1) == target).float().mean()),
        "image_to_text_top5": float((top5 == target[:, None]).any(1).float().mean()),
        "text_to_image_top1": float((sim.argmax(0) == target).float().mean()),
        "chance_top1": 1.0 / n,
    }


@dataclass
class ClipState:
    """What the loop carries between the small CLIP's steps."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any
    opt: torch.optim.Optimizer
    loader: Loader
    negatives: HardNegatives | None = None
    counters: Counters = field(default_factory=Counters)

    def train_state(self) -> TrainState:
        """The registered objects a checkpoint holds (loop.TrainState)."""
        ts = TrainState(self.counters)
        ts.register("model", ModuleState(self.model), "file")
        ts.register("optimizer", OptimizerState(self.opt))
        ts.register("loader", self.loader, "rank")
        ts.register("rng", RNGState(), "rank")
        return ts


def build(cfg: ClipTrainConfig, device: torch.device) -> ClipState:
    torch.manual_seed(cfg.run.seed)
    a = cfg.model
    tokenizer = hf_tokenizer(cfg.text.path, a.text_len)
    model = build_clip(a, tokenizer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=(0.9, 0.98))
    data = DataArgs(
        image_size=a.image_size, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.run.seed
    )
    data = dataclasses.replace(data, crop="random_square", random_crop_min=0.85)
    negatives = None
    if cfg.data.hard_negatives:
        paths = expand_shards(cfg.data.shards)
        negatives = HardNegatives.from_shards(paths, cfg.data.hard_negatives, cfg.run.seed, cfg.data.hard_negative_pool)
    return ClipState(model, tokenizer, opt, Loader(cfg.data.shards, data), negatives)


def lr_at(cfg: ClipTrainConfig, step: int) -> float:
    """A 5% linear warm-up, then cosine to 0 at ``run.steps``."""
    warm = max(1, cfg.run.steps // 20)
    if step < warm:
        return cfg.optim.lr * (step + 1) / warm
    return cosine(step - warm, cfg.optim.lr, 0.0, cfg.run.steps - warm)


def train_step(st: ClipState, batch: dict[str, Any], cfg: ClipTrainConfig, device: torch.device) -> dict[str, float]:
    """One contrastive update; a non-finite loss or gradient changes nothing and is counted."""
    lr = lr_at(cfg, st.counters.step)
    set_lr(st.opt, lr)
    a = cfg.model
    captions = list(batch["caption"])
    mask = None
    if st.negatives is not None:
        extra, mask = st.negatives.draw(captions, st.counters.step)
        captions += extra
    t = tokenizer_batch(st.tokenizer, captions, a.text_len)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision.dtype == "bf16"):
        out = st.model(
            input_ids=t["input_ids"].to(device),
            attention_mask=t["attention_mask"].to(device),
            pixel_values=clip_input(batch["image"], a.image_size).to(device),
        )
    loss = contrastive_loss(out.logits_per_image.float(), None if mask is None else torch.from_numpy(mask).to(device))
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(st.model.parameters(), 1.0))
    finite = math.isfinite(grad_norm) and bool(torch.isfinite(loss))
    if finite:
        st.opt.step()
    st.counters.skipped_steps += not finite
    st.counters.nonfinite_in_row = 0 if finite else st.counters.nonfinite_in_row + 1
    st.counters.step += 1
    return {"loss": loss.item(), "grad_norm": grad_norm, "lr": lr}


def contrastive_loss(logits: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over ``logits`` (B images, B captions + B * K hard negatives),
    the match on the diagonal. Image i's softmax runs over the batch's captions and its own K
    negatives where ``negatives`` (B, K) is True; each caption's over the B images only."""
    b = logits.shape[0]
    target = torch.arange(b, device=logits.device)
    per_text = torch.nn.functional.cross_entropy(logits[:, :b].T, target)
    if negatives is None:
        return (torch.nn.functional.cross_entropy(logits[:, :b], target) + per_text) / 2
    k = negatives.shape[1]
    own = logits[:, b:].view(b, b, k)[target, target]  # (B, K): image i against its own negatives
    per_image = torch.cat([logits[:, :b], own.masked_fill(~negatives, float("-inf"))], dim=1)
    return (torch.nn.functional.cross_entropy(per_image, target) + per_text) / 2


def tokenizer_batch(tokenizer: Any, captions: list[str], text_len: int) -> Any:
    return tokenizer(captions, padding="max_length", truncation=True, max_length=text_len, return_tensors="pt")


# The update counts of the config that scale with the run's length (the demo's time plan, run.end_by):
# the warm-up and the cosine follow run.steps (lr_at).
LENGTH_KEYS = ("run.steps",)


class ClipTask(Task):
    """The small CLIP's part of the loop (train/loop.py): its step, retrieval validation and export."""

    show = ("loss", "lr")
    val_key = "image_to_text_top1"
    length_keys = LENGTH_KEYS

    def __init__(self, cfg: ClipTrainConfig, run_cfg: ClipTrainConfig, d: distributed.Dist, pick: str) -> None:
        self.config, self.run_cfg, self.d, self.pick = cfg, run_cfg, d, pick
        self.st = build(run_cfg, d.device)
        self.state = self.st.train_state()
        self.ckpts = Checkpoints(cfg.run.run_dir, cfg.run.keep)
        self.run_dir = Path(cfg.run.run_dir)
        self.seen = 0

    def batches(self) -> Iterator[Any]:
        return iter(self.st.loader)

    def train_step(self, it: Iterator[Any]) -> dict[str, float]:
        batch = next(it)
        self.seen += len(batch["caption"])
        return train_step(self.st, batch, self.run_cfg, self.d.device)

    def rate(self, updates: int, seconds: float) -> dict[str, float]:
        seen, self.seen = self.seen, 0
        return {"img_per_s": seen / seconds}

    def data_errors(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.st.loader.errors.items()}

    def evaluate(self, validate: bool, sample: bool) -> dict[str, Any]:
        c = self.config
        if not validate or c.run.val_shards is None:
            return {}
        return retrieval(self.st.model, self.st.tokenizer, c.run.val_shards, c.model, c.run.val_batches)

    def export(self) -> Path:
        return save_clip(self.st.model, self.st.tokenizer, self.config, self.pick)

    def finish(self, val: dict[str, Any]) -> dict[str, Any]:
        """RUN/clip/retrieval.json: the final retrieval accuracy, the training loss and the precision."""
        losses = [r["loss"] for r in read_metrics(self.run_dir) if isinstance(r.get("loss"), float)]
        metrics = (val or last_validation(self.run_dir, self.val_key)) | {
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "steps": self.step,
            "precision": self.pick,
        }
        save_json(clip_folder(self.config) / "retrieval.json", metrics)
        return {}


def clip_folder(cfg: ClipTrainConfig) -> Path:
    """Where the trained CLIP goes: RUN/clip, the folder launch/sample.py --clip loads."""
    return Path(cfg.run.run_dir) / "clip"


@denormals_flushed()
def train_clip(cfg: ClipTrainConfig, resume_run: bool = False, stop: StopRequested | None = None) -> dict[str, Any]:
    """Train (or continue), evaluate and save the small CLIP; returns the retrieval metrics, the
    step and how the run ended."""
    out = clip_folder(cfg)  # before any work: a folder of someone's other files is never replaced
    if not cfg.run.overwrite and not (out / "train_clip.yaml").is_file():  # ours has it; save_clip checks again
        check_replaceable(out, set(), False)
    latest = checkpoint_to_resume(cfg.run, resume_run)
    check_run_shards(cfg.data.shards, cfg.run.val_shards, 1, cfg.data.num_workers)
    d = distributed.init(cfg.run.device)
    if d.world_size > 1:
        raise ConfigError(f"the CLIP trainer runs in one process; it was started as {d.world_size} ranks")
    pick = pick_precision(cfg.precision.dtype, d.device, "precision.dtype")
    log.info("precision: %s", pick.reason)
    run_cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype=pick.dtype))
    with deterministic(cfg.run.deterministic, d.device):
        task = ClipTask(cfg, run_cfg, d, pick.reason)
        if latest is not None:
            task.resume(latest)
            log.info("resumed from %s at step %d", latest, task.step)
        save_config(cfg, task.run_dir, header=f"precision: {pick.reason}")
        logger = MetricsLogger(task.run_dir, cfg.log, cfg, cfg.run.steps, task.step)
        try:
            result = fit(task, cfg.run, logger, stop)
        finally:
            logger.close()
    saved = clip_folder(cfg) / "retrieval.json"
    return (json.loads(saved.read_text()) if result["ended"] == "done" else {}) | result


def save_clip(model: Any, tokenizer: Any, cfg: ClipTrainConfig, precision: str) -> Path:
    """Write RUN/clip under a temporary name, then rename it into place."""
    final = clip_folder(cfg)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        pre = {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "size": cfg.model.image_size}
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        save_config(cfg, tmp, "train_clip.yaml", header=f"precision: {precision}")
        for p in (tmp, *tmp.rglob("*")):
            honour_umask(p)
        check_replaceable(final, {*os.listdir(tmp), "retrieval.json"}, cfg.run.overwrite)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def chance_note(metrics: dict[str, Any]) -> str:
    return (
        f"image->text top-1 {metrics['image_to_text_top1']:.1%} (chance {metrics['chance_top1']:.1%}), "
        f"top-5 {metrics['image_to_text_top5']:.1%}; text->image top-1 {metrics['text_to_image_top1']:.1%} "
        f"over {metrics['val_pairs']} validation pairs"
    )
