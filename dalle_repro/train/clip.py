"""A small CLIP trained contrastively on our own shards, so that the demo reranks with no download.

The model is Hugging Face's ``CLIPModel`` with a small config, and the folder it writes has the
layout of a downloaded CLIP (``config.json``, ``model.safetensors``, ``tokenizer.json`` and its
config, ``preprocessor_config.json``), so the demo exercises the same rerank path (sample/rerank.py) as
a real ``openai/clip-vit-base-patch32``. The text side reuses our BPE (data/tokenizer.py) with three
special tokens appended (bos, eos, pad); CLIP pools the text at the eos token.

Reports retrieval accuracy on the validation shards: for each image, is its own caption the most
similar of all validation captions (top-1, top-5), and the reverse.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from dalle_repro.core.config import arg, save_config
from dalle_repro.core.files import honour_umask
from dalle_repro.core.precision import pick_precision
from dalle_repro.core.pretrained import check_replaceable
from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.sample.rerank import CLIP_MEAN, CLIP_STD, clip_pixels
from dalle_repro.train.optim import cosine

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
    val_shards: str = arg("data/emoji/val/*.tar", "Validation shards for the retrieval accuracy.")
    batch_size: int = arg(64, "Pairs per batch (the contrastive negatives).", gt=1)
    num_workers: int = arg(1, "Loader workers.", ge=0)


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
class ClipRunArgs:
    """The run, as the trainers' ``run.*``."""

    output: str = arg("outputs/demo/clip", "Folder to write (Hugging Face's CLIP layout).")
    overwrite: bool = arg(False, "Replace output even if it holds files that are not a CLIP folder of ours.")
    steps: int = arg(600, "Updates.", gt=0)
    precision: Literal["auto", "fp32", "bf16"] = arg(
        "auto", "Autocast precision (CPU): fp32, bf16, or auto: bf16 where the CPU runs it natively and fast."
    )
    seed: int = arg(0, "Seed of the weights and the data order.", ge=0)


@dataclass
class ClipTrainConfig:
    """tools/train_clip.py's settings, in the trainers' sections (data.shards=, run.steps=, ...)."""

    model: ClipModelArgs = arg(factory=ClipModelArgs, doc="The small CLIP.")
    data: ClipDataArgs = arg(factory=ClipDataArgs, doc="Image shards.")
    text: ClipTextArgs = arg(factory=ClipTextArgs, doc="The tokenizer.")
    optim: ClipOptimArgs = arg(factory=ClipOptimArgs, doc="The optimiser.")
    run: ClipRunArgs = arg(factory=ClipRunArgs, doc="The run.")


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
def retrieval(model: Any, tokenizer: Any, shards: str, args: ClipModelArgs) -> dict[str, float]:
    """Image->text and text->image retrieval accuracy over the whole validation split."""
    loader = Loader(
        shards, DataArgs(image_size=args.image_size, batch_size=128, num_workers=0, shuffle=False), epochs=1
    )
    imgs, txts = [], []
    model.eval()
    for batch in loader:
        t = tokenizer(
            batch["caption"], padding="max_length", truncation=True, max_length=args.text_len, return_tensors="pt"
        )
        out = model(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            pixel_values=clip_input(batch["image"], args.image_size),
        )
        imgs.append(out.image_embeds)
        txts.append(out.text_embeds)
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


def train_clip(cfg: ClipTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and save the small CLIP; returns the retrieval metrics."""
    out = Path(cfg.run.output)  # before any work: a folder of someone's other files is never replaced
    if not cfg.run.overwrite and not (out / "train_clip.yaml").is_file():  # ours has it; save_clip checks again
        check_replaceable(out, set(), False)
    torch.manual_seed(cfg.run.seed)
    pick = pick_precision(cfg.run.precision, "cpu", "run.precision")
    log.info("precision: %s", pick.reason)
    a = cfg.model
    tokenizer = hf_tokenizer(cfg.text.path, a.text_len)
    model = build_clip(a, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=(0.9, 0.98))
    data = DataArgs(
        image_size=a.image_size, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.run.seed
    )
    data = dataclasses.replace(data, crop="random_square", random_crop_min=0.85)
    it = iter(Loader(cfg.data.shards, data))
    warm = max(1, cfg.run.steps // 20)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.run.steps), desc="clip", disable=not progress or None)
    losses = []
    for step in bar:
        lr = (
            cfg.optim.lr * (step + 1) / warm
            if step < warm
            else cosine(step - warm, cfg.optim.lr, 0.0, cfg.run.steps - warm)
        )
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(it)
        t = tokenizer(
            batch["caption"], padding="max_length", truncation=True, max_length=a.text_len, return_tensors="pt"
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=pick.dtype == "bf16"):
            out = model(
                input_ids=t["input_ids"],
                attention_mask=t["attention_mask"],
                pixel_values=clip_input(batch["image"], a.image_size),
                return_loss=True,
            )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    metrics = retrieval(model, tokenizer, cfg.data.val_shards, a) | {
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": cfg.run.steps,
        "precision": pick.reason,
    }
    save_clip(model, tokenizer, cfg, metrics)
    return metrics


def save_clip(model: Any, tokenizer: Any, cfg: ClipTrainConfig, metrics: dict[str, Any]) -> Path:
    """Write the folder under a temporary name, then rename it into place."""
    import json

    final = Path(cfg.run.output)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        pre = {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "size": cfg.model.image_size}
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        (tmp / "retrieval.json").write_text(json.dumps(metrics, indent=2))
        save_config(cfg, tmp, "train_clip.yaml", header=f"precision: {metrics.get('precision', cfg.run.precision)}")
        for p in (tmp, *tmp.rglob("*")):
            honour_umask(p)
        check_replaceable(final, set(os.listdir(tmp)), cfg.run.overwrite)
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
