"""Sample images for captions from an exported prior, reranked by CLIP.

Usage:
  python launch/sample.py --model EXPORT_DIR --prompt "..." [--prompt ...] [--prompts-file F]
      [--candidates 64] [--keep 8] [--clip CLIP_DIR] [--temperature 1.0] [--top-k K] [--top-p P]
      [--guidance S] [--init-image IMG --init-rows R] [--seed 0] [--batch-size B] [--output DIR]

EXPORT_DIR is RUN/export from launch/train_prior.py (weights, config, tokenizer and dVAE).
CLIP_DIR is a local Hugging Face CLIP folder (a downloaded openai/clip-vit-base-patch32, or
tools/train_clip.py's output), or open_clip:ARCH:/path/weights.safetensors with open_clip
installed; nothing is ever downloaded. Without --clip the first --keep candidates are kept.

Writes, per prompt, OUTPUT/NNN-caption/: grid.png (the kept images, best first, labelled with
their scores), 00.png, 01.png, ... and result.json (prompt, seed, settings, scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from dalle_repro.core.distributed import pick_device
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.images import grid, save_png, to_pil
from dalle_repro.data.samples import crop_resize, decode_caption, decode_image, image_to_tensor
from dalle_repro.sample.export import load_prior
from dalle_repro.sample.generate import SampleSettings, generate
from dalle_repro.sample.rerank import Reranker, RerankError


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the export folder (RUN/export of launch/train_prior.py)")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one caption per line")
    p.add_argument(
        "--candidates", type=int, default=64, help="images generated per caption (default 64; the paper reranks 512)"
    )
    p.add_argument("--keep", type=int, default=8, help="images kept per caption, best CLIP score first (default 8)")
    p.add_argument("--clip", help="CLIP for reranking: a local HF folder, or open_clip:ARCH:/path.safetensors")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely codes")
    p.add_argument("--top-p", type=float, default=None, help="sample within the nucleus of probability P")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--init-image", help="an image whose top --init-rows token rows are kept (image-to-image)")
    p.add_argument("--init-rows", type=int, default=0, help="token rows of --init-image to keep")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed and settings give the same images")
    p.add_argument("--batch-size", type=int, default=16, help="candidates decoded together (default 16)")
    p.add_argument("--output", default="samples", help="output folder (default samples/)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--weights", default="model", choices=["model", "raw"], help="EMA (model) or raw weights")
    return p.parse_args(argv)


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "caption"


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    captions = list(a.prompt)
    if a.prompts_file:
        path = Path(a.prompts_file)
        if not path.is_file():
            print(f"error: --prompts-file {path} not found", file=sys.stderr)
            return 2
        text, _ = decode_caption(path.read_bytes())  # UTF-8, UTF-16 or UTF-8 with a BOM, or Latin-1
        captions += [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        print("error: give at least one --prompt or a --prompts-file", file=sys.stderr)
        return 2
    if a.init_rows and not a.init_image:
        print("error: --init-rows needs --init-image", file=sys.stderr)
        return 2
    try:
        device = pick_device(a.device)
        reranker = Reranker(a.clip, device) if a.clip else None  # fails here, before any sampling
        prior = load_prior(a.model, a.weights, device)
    except (RerankError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if prior.dvae is None:
        print(f"error: {a.model} has no dVAE (its export.json names none)", file=sys.stderr)
        return 2
    if a.guidance != 1.0 and not prior.info.get("caption_dropout"):
        print("warning: this prior was trained without caption dropout; guidance may not help", file=sys.stderr)
    init = None
    if a.init_image:
        try:
            im, _ = decode_image(Path(a.init_image).read_bytes())
        except Exception as e:
            print(f"error: cannot read --init-image {a.init_image}: {e}", file=sys.stderr)
            return 2
        init = image_to_tensor(crop_resize(im, prior.dvae.args.image_size, "center")).float() / 255
    settings = SampleSettings(
        candidates=a.candidates,
        keep=a.keep,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        guidance=a.guidance,
        init_rows=a.init_rows,
        seed=a.seed,
        batch_size=a.batch_size,
    )
    print(f"precision: {prior.use_trained_precision().reason}", file=sys.stderr)
    try:
        results = generate(prior.model, prior.dvae, captions, prior.tokenizer, settings, reranker, init)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.output)
    for i, r in enumerate(results):
        d = out / f"{i:03d}-{slug(r.caption)}"
        labels = [f"{s:.3f}" for s in r.scores] if r.scores else [f"#{k}" for k in r.kept]
        save_png(
            grid(
                list(r.images),
                ncol=min(8, len(r.images)),
                labels=labels,
                scale=max(1, 128 // r.images.shape[-1]),
                title=r.caption,
            ),
            d / "grid.png",
        )
        for j, im in enumerate(r.images):
            save_png(to_pil(im), d / f"{j:02d}.png")
        info = {"prompt": r.caption, "seed": a.seed, "settings": dataclasses.asdict(settings), "model": a.model}
        info |= {"clip": a.clip, "init_image": a.init_image} | r.summary()
        atomic_write_text(d / "result.json", json.dumps(info, indent=2) + "\n")
        print(f"{d}/grid.png  {r.caption!r}" + (f"  best {r.scores[0]:.3f}" if r.scores else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
