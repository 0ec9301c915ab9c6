"""Sample images for captions from an exported prior, reranked by CLIP.

Usage:
  python launch/sample.py --model EXPORT_DIR --prompt "..." [--prompt ...] [--prompts-file F]
      [--candidates 64] [--keep 8] [--clip CLIP_DIR] [--temperature 1.0] [--top-k K] [--top-p P]
      [--guidance S] [--init-image IMG [--init-rows R | --edit-box x0,y0,x1,y1]] [--seed 0] [--batch-size B]
      [--no-dedup] [--output DIR]

Image edits, each reranked as text-to-image is, plus similarity to the input image (--image-weight):
  variations / completion: --init-image IMG --init-rows R keeps the image's top R token rows and
      draws the rest for the caption;
  region edits: --init-image IMG --edit-box x0,y0,x1,y1 redraws the box (pixels of IMG; x1, y1
      exclusive) for the caption and keeps every token outside it. In raster order a token in the box
      sees only what precedes it, so candidates are first ranked by how well the kept tokens after the
      box follow from them (the prior's likelihood; --fit-share of them go on to CLIP).
  IMG is center-cropped and resized to the dVAE's size (said when it is); a box needs a square image.
  Each edit also writes edit.png: the input (box or kept rows marked) beside the kept results.

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
from dalle_repro.data.samples import decode_caption, decode_image
from dalle_repro.sample.export import load_prior
from dalle_repro.sample.generate import Box, PromptResult, SampleSettings, edit_input, generate
from dalle_repro.sample.rerank import Reranker, RerankError


@dataclass
class SampleArgs:
    """launch/sample.py: what to sample from, for which captions, and where the images go."""

    model: str = arg(doc="The export folder (RUN/export of launch/train_prior.py).")
    prompts: list[str] = arg(factory=list, doc="Captions to sample (--prompt, repeatable).")
    prompts_file: str | None = arg(None, "A text file with one caption per line.")
    clip: str | None = arg(None, "CLIP for reranking: a local HF folder, or open_clip:ARCH:/path.safetensors.")
    init_image: str | None = arg(
        None, "An image to edit: keep its top sample.init_rows token rows, or redraw edit_box in it."
    )
    edit_box: str | None = arg(
        None, "x0,y0,x1,y1: the region of init_image to redraw, in its pixels (x1, y1 exclusive)."
    )
    output: str = arg("samples", "Output folder.")
    device: str = arg("auto", "auto, cpu or cuda.")
    weights: Literal["model", "raw"] = arg("model", "EMA (model) or raw weights.")
    sample: SampleSettings = arg(factory=SampleSettings, doc="The sampling settings.")

    def __post_init__(self) -> None:
        if self.sample.init_rows and not self.init_image:
            raise ConfigError("sample.init_rows: needs init_image (--init-image)")
        if self.edit_box and not self.init_image:
            raise ConfigError("edit_box: needs init_image (--init-image), the image to edit")
        if self.edit_box and self.sample.init_rows:
            raise ConfigError("edit_box: and sample.init_rows are two edits; give one")
        if self.edit_box:
            try:
                Box.parse(self.edit_box)
            except ValueError as e:
                raise ConfigError(f"edit_box: {e}") from None


FLAGS = (
    flag_aliases(
        SampleArgs, only=("model", "prompts_file", "clip", "init_image", "edit_box", "output", "device", "weights")
    )
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
        what = "an image edit needs one to encode the image" if a.init_image else "images need one to be decoded"
        print(f"error: {a.model} has no dVAE (its export.json names none): {what}", file=sys.stderr)
        return 2
    settings = a.sample
    if settings.guidance != 1.0 and not prior.info.get("caption_dropout"):
        print("warning: this prior was trained without caption dropout; guidance may not help", file=sys.stderr)
    init, box = None, None
    if a.init_image:
        try:
            im, _ = decode_image(Path(a.init_image).read_bytes())
        except Exception as e:
            print(f"error: cannot read --init-image {a.init_image}: {e}", file=sys.stderr)
            return 2
        size = prior.dvae.args.image_size
        try:
            box = Box.parse(a.edit_box) if a.edit_box else None
            init, box = edit_input(im, box, size, prior.model.args.grid, ("--init-image", "--edit-box"))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if im.size != (size, size):
            print(f"note: --init-image {im.size[0]}x{im.size[1]} resized to the dVAE's {size}x{size}", file=sys.stderr)
    print(f"precision: {prior.use_trained_precision().reason}", file=sys.stderr)
    try:
        results = generate(prior.model, prior.dvae, captions, prior.tokenizer, settings, reranker, init, box=box)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.output)
    common = {"seed": settings.seed, "settings": dataclasses.asdict(settings), "model": a.model}
    common |= {"clip": a.clip, "init_image": a.init_image, "edit_box": a.edit_box}
    for i, r in enumerate(results):
        d = write_prompt(out / f"{i:03d}-{slug(r.caption)}", r, common)
        if init is not None:
            save_png(edit_sheet(init, r, box, settings.init_rows, prior.model.args.grid), d / "edit.png")
        dropped = f"  ({r.duplicates_dropped} duplicates dropped)" if r.duplicates_dropped else ""
        print(f"{d}/grid.png  {r.caption!r}" + (f"  best {r.scores[0]:.3f}" if r.scores else "") + dropped)
    print(f"wrote {len(results)} folders (grid.png, 00.png, ..., result.json) in {out}")
    return 0


def edit_sheet(init: Any, r: PromptResult, box: Box | None, init_rows: int, grid_side: int, side: int = 128) -> Any:
    """The input (the box, or the line under the kept rows, drawn in red) beside the kept results."""
    from PIL import Image, ImageDraw

    first = to_pil(init).resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(first)
    k = side / init.shape[-1]
    if box is not None:
        draw.rectangle([box.x0 * k, box.y0 * k, box.x1 * k - 1, box.y1 * k - 1], outline=(255, 0, 0), width=2)
    elif init_rows:
        y = init_rows * side / grid_side
        draw.line([0, y, side, y], fill=(255, 0, 0), width=2)
    pics = [first] + [to_pil(im).resize((side, side), Image.Resampling.NEAREST) for im in r.images]
    labels = ["input"] + ([f"{v:.3f}" for v in r.scores] if r.scores else [f"#{j}" for j in r.kept])
    return grid(pics, ncol=len(pics), labels=labels, title=r.caption)


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
