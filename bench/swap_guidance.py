"""Guidance against the swapped caption: does pushing away from the bag-of-words reading bind shapes?

The demo prior's held-out misses are mostly swaps: "a big red triangle left of a small blue circle"
drawn as a red circle and a blue triangle, each colour on the shape it was trained with
(evaluation/tasks.py counts them as ``shapes_swapped``). Classifier-free guidance pushes a sample
away from the empty caption; this adds a second push, away from the caption with its two shapes
swapped, which names the wrong drawing exactly:

    logits = c + (g - 1) * (c - u) + h * (c - s)

(c: the caption, u: the empty caption, s: the swapped caption; h = 0 is the demo's sampling;
``Transformer.generate``'s ``negatives``). It
samples every setting for the same captions of two objects of two shapes and two colours, held-out
ones (a held-out pair in one slot) and seen ones (to see what it costs where the prior binds), reads
every sample back and writes the shares of all candidates (no reranking) to ``--out``.

Usage: python bench/swap_guidance.py --model RUN/export --out F.json [--settings 2:0 2:1 2:2]
       [--captions 40] [--candidates 16] [--world shapes|strokes] [--seed 0]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import arg
from dalle_repro.data.worlds import world_of
from dalle_repro.evaluation.tasks import read_back, summarize

KEYS = ("all", "shape", "colour", "size", "place", "shapes_swapped")


def two_shape_captions(world_name: str, held_out: bool, n: int, seed: int) -> list[str]:
    """``n`` distinct captions of two objects of two shapes and two colours (with a held-out pair, or
    of seen pairs only)."""
    world = world_of(world_name)
    rng = np.random.default_rng([seed, int(held_out)])
    out: list[str] = []
    for _ in range(100 * n):
        s = world.random_scene(rng, held_out, two=1.0)
        if s.shapes_swapped() is not None and s.caption() not in out:
            out.append(s.caption())
        if len(out) == n:
            return out
    raise ValueError(f"fewer than {n} such captions in the {world_name} grammar")


@dataclass
class SwapArgs:
    """The benchmark's settings."""

    model: str = arg(doc="A prior export (RUN/export, with its dVAE).")
    out: str = arg(doc="JSON file for the results.")
    settings: list[str] = arg(factory=lambda: ["2:0", "2:1", "2:2"], doc="G:H pairs: guidance, swapped-caption weight.")
    captions: int = arg(40, "Distinct captions per split.", gt=0)
    candidates: int = arg(16, "Samples per caption.", gt=0)
    temperature: float = arg(0.7, "Softmax temperature (the demo's evaluation: 0.7).", ge=0)
    world: Literal["shapes", "strokes"] = arg("shapes", "The grammar of the captions and the reader.")
    seed: int = arg(0, "Seed of the captions and the samples.", ge=0)
    batch: int = arg(256, "Rows sampled together.", gt=0)


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(SwapArgs, argv, __doc__ or "", aliases=flag_aliases(SwapArgs))
    if a is None:
        return 0
    from dalle_repro.sample.export import load_prior

    prior = load_prior(a.model)
    pick = prior.use_trained_precision()
    model, tok, dvae = prior.model.eval(), prior.tokenizer, prior.dvae
    if dvae is None:
        raise SystemExit(f"{a.model} has no dVAE to decode with")
    dvae.eval()
    world = world_of(a.world)
    result = {"args": vars(a), "precision": pick.dtype, "splits": {}}
    for split, held in (("heldout", True), ("seen", False)):
        caps = [c for c in two_shape_captions(a.world, held, a.captions, a.seed) for _ in range(a.candidates)]
        text = torch.tensor([tok.encode(c) for c in caps])
        neg = torch.tensor([tok.encode(world.parse_caption(c).shapes_swapped().caption()) for c in caps])
        empty = torch.tensor([tok.encode("")])
        result["splits"][split] = {}
        for setting in a.settings:
            g, h = (float(x) for x in setting.split(":"))
            gen = torch.Generator().manual_seed(a.seed)
            tokens = torch.cat(
                [
                    model.generate(
                        t, temperature=a.temperature, generator=gen, uncond=empty, guidance=g, negatives=[(s, h)]
                    )
                    for t, s in zip(text.split(a.batch), neg.split(a.batch), strict=True)
                ]
            )
            grid = model.args.grid
            images = torch.cat([dvae.decode(t.view(-1, grid, grid)) for t in tokens.split(a.batch)])
            s = summarize(read_back(images, caps, world))
            result["splits"][split][setting] = {k: s[k] for k in KEYS}
            brief = {k: round(s[k]["rate"], 3) for k in KEYS}
            print(json.dumps({"split": split, "guidance": g, "swap_weight": h, **brief}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"[swap_guidance] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
