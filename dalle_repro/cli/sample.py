"""Sample images for captions from an exported prior, reranked by CLIP.

Usage:
  python launch/sample.py --model EXPORT_DIR --prompt "..." [--prompt ...] [--prompts-file F]
      [--candidates 64] [--keep 8] [--clip CLIP_DIR] [--temperature 1.0] [--top-k K] [--top-p P]
      [--guidance S] [--init-image IMG --init-rows R] [--seed 0] [--batch-size B] [--no-dedup] [--output DIR]

EXPORT_DIR is RUN/export from launch/train_prior.py (weights, config, tokenizer and dVAE).
CLIP_DIR is a local Hugging Face CLIP folder (a downloaded openai/clip-vit-base-patch32, or
tools/train_clip.py's output), or open_clip:ARCH:/path/weights.safetensors with open_clip
installed; nothing is ever downloaded. Without --clip the first --keep candidates are kept.

Writes, per prompt, OUTPUT/NNN-caption/: grid.png (the kept images, best first, labelled with
their scores), 00.png, 01.png, ... and result.json (prompt, seed, settings, scores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import ConfigError, arg
from dalle_repro.core.distributed import pick_device
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.images import grid, save_png, to_pil
from dalle_repro.data.samples import crop_resize, decode_caption, decode_image, image_to_tensor
from dalle_repro.sample.export import load_prior
from dalle_repro.sample.generate import PromptResult, SampleSettings, generate
from dalle_repro.sample.rerank import Reranker, RerankError


@dataclass
class SampleArgs:
    """launch/sample.py: what to sample from, for which captions, and where the images go."""

    model: str = arg(doc="The export folder (RUN/export of launch/train_prior.py).")
    prompts: list[str] = arg(factory=list, doc="Captions to sample (--prompt, repeatable).")
    prompts_file: str | None = arg(None, "A text file with one caption per line.")
    clip: str | None = arg(None, "CLIP for reranking: a local HF folder, or open_clip:ARCH:/path.safetensors.")
    init_image: str | None = arg(None, "An image whose top sample.init_rows token rows are kept (image-to-image).")
    output: str = arg("samples", "Output folder.")
    device: str = arg("auto", "auto, cpu or cuda.")
    weights: Literal["model", "raw"] = arg("model", "EMA (model) or raw weights.")
    sample: SampleSettings = arg(factory=SampleSettings, doc="The sampling settings.")

    def __post_init__(self) -> None:
        if self.sample.init_rows and not self.init_image:
            raise ConfigError("sample.init_rows: needs init_image (--init-image)")


FLAGS = (
    flag_aliases(SampleArgs, only=("model", "prompts_file", "clip", "init_image", "output", "device", "weights"))
    | {"--prompt": "prompts"}
    | flag_aliases(SampleSettings, "sample.")
)


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "caption"


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(SampleArgs, argv, __doc__ or "", aliases=FLAGS)
    if a is None:
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")  # generate's notes
    captions = list(a.prompts)
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
    settings = a.sample
    if settings.guidance != 1.0 and not prior.info.get("caption_dropout"):
        print("warning: this prior was trained without caption dropout; guidance may not help", file=sys.stderr)
    init = None
    if a.init_image:
        try:
            im, _ = decode_image(Path(a.init_image).read_bytes())
        except Exception as e:
            print(f"error: cannot read --init-image {a.init_image}: {e}", file=sys.stderr)
            return 2
        init = image_to_tensor(crop_resize(im, prior.dvae.args.image_size, "center")).float() / 255
    print(f"precision: {prior.use_trained_precision().reason}", file=sys.stderr)
    try:
        results = generate(prior.model, prior.dvae, captions, prior.tokenizer, settings, reranker, init)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.output)
    common = {"seed": settings.seed, "settings": dataclasses.asdict(settings), "model": a.model}
    common |= {"clip": a.clip, "init_image": a.init_image}
    for i, r in enumerate(results):
        d = write_prompt(out / f"{i:03d}-{slug(r.caption)}", r, common)
        dropped = f"  ({r.duplicates_dropped} duplicates dropped)" if r.duplicates_dropped else ""
        print(f"{d}/grid.png  {r.caption!r}" + (f"  best {r.scores[0]:.3f}" if r.scores else "") + dropped)
    print(f"wrote {len(results)} folders (grid.png, 00.png, ..., result.json) in {out}")
    return 0


def write_prompt(d: Path, r: PromptResult, info: dict[str, Any]) -> Path:
    """One prompt's folder: grid.png (the kept images, best first, labelled with their scores),
    00.png, 01.png, ... and result.json (``info``, the prompt and the scores); tools/evaluate.py
    --images reads it back."""
    labels = [f"{s:.3f}" for s in r.scores] if r.scores else [f"#{k}" for k in r.kept]
    image = grid(
        list(r.images),
        ncol=min(8, len(r.images)),
        labels=labels,
        scale=max(1, 128 // r.images.shape[-1]),
        title=r.caption,
    )
    save_png(image, d / "grid.png")
    for j, im in enumerate(r.images):
        save_png(to_pil(im), d / f"{j:02d}.png")
    result = {"prompt": r.caption} | info | r.summary()
    atomic_write_text(d / "result.json", json.dumps(result, indent=2) + "\n")
    return d


if __name__ == "__main__":
    sys.exit(main())
