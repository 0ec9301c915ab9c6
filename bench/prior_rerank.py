"""Which pick binds: CLIP's cosine, the prior as a classifier, or both, among the same candidates.

The demo's evaluation draws 16 candidates per caption; the reader's pick (a candidate with every
attribute right wherever there is one) shows that the prior draws a right image for nearly every
held-out caption, and that CLIP's pick misses many of them, mostly on shape. This draws the
evaluation's candidates again (the same seed and settings as tools/evaluate.py, so the same images)
and compares, per split, the share of captions whose pick has every attribute right for:

- ``random``: the first candidate; ``clip``: CLIP's best cosine (the demo's pick);
- ``prior_pmi``: the prior's ``log p(x | c) - log p(x | "")`` (sample/likelihood.py);
- ``prior_neighbours``: the prior's ``log p(c | x)`` among the caption and its one-edit neighbours
  in the training captions (train/hard_negatives.py's ``caption_neighbours``: a colour, shape,
  size or place replaced, two words exchanged); a caption without one falls back to the PMI;
- ``clip+pmi`` / ``clip+neighbours``: CLIP's logit (its temperature times the cosine) plus the
  prior's score: two estimates of log p(caption | image) added, with no weight to tune;
- ``reader``: the ceiling.

Every pick is scored over the same candidates, so the differences between picks are paired (the
intervals beside each share are each share's own, Wilson's). A setting that helps one data set and
hurts the other is not kept: run it on the shapes and the strokes demo alike.

Usage: python bench/prior_rerank.py --demo outputs/demo --data data/shapes --seed 0 --out OUT.json
       [--world shapes|strokes] [--captions 96] [--candidates 16]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dalle_repro.core.cli import flag_aliases, parse_cli  # noqa: E402
from dalle_repro.core.config import arg  # noqa: E402
from dalle_repro.core.files import atomic_write_text  # noqa: E402
from dalle_repro.evaluation.evaluate import reader_pick  # noqa: E402

PICKS = ("random", "clip", "prior_pmi", "prior_neighbours", "clip+pmi", "clip+neighbours", "reader")


@dataclass
class PickArgs:
    """The comparison's settings (the demo evaluation's by default)."""

    demo: str = arg("outputs/demo", "The demo's output folder (prior/export, clip).")
    data: str = arg("data/shapes", "The demo's scenes: val/ (seen), heldout/ and train/ (the neighbours).")
    world: Literal["shapes", "strokes"] = arg("shapes", "The data set's grammar and reader.")
    out: str = arg("bench-out/prior_rerank.json", "The JSON written.")
    seed: int = arg(0, "The evaluation's sampling seed (the demo's evaluation.sample.seed).", ge=0)
    captions: int = arg(96, "Distinct captions per split.", gt=0)
    candidates: int = arg(16, "Candidates per caption.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature (the demo evaluation's).", ge=0)
    guidance: float = arg(2.0, "Classifier-free guidance (the demo evaluation's).", ge=0)


def picks(clip: torch.Tensor, scale: float, pmi: torch.Tensor, near: torch.Tensor, right: torch.Tensor) -> dict:
    """Each pick's index per caption from scores (P, C): CLIP's cosines, the prior's two scores, and
    the reader's verdicts (every attribute right)."""
    p = clip.shape[0]
    return {
        "random": torch.zeros(p, dtype=torch.long),
        "clip": clip.argmax(1),
        "prior_pmi": pmi.argmax(1),
        "prior_neighbours": near.argmax(1),
        "clip+pmi": (scale * clip + pmi).argmax(1),
        "clip+neighbours": (scale * clip + near).argmax(1),
        "reader": reader_pick(right, clip.argmax(1)),
    }


def compare(a: PickArgs) -> dict[str, Any]:
    from dalle_repro.data.sources import expand_shards
    from dalle_repro.data.tar import shard_captions
    from dalle_repro.evaluation.evaluate import caption_images, sample_candidates
    from dalle_repro.evaluation.tasks import read_back, summarize
    from dalle_repro.sample.export import load_prior
    from dalle_repro.sample.generate import SampleSettings
    from dalle_repro.sample.likelihood import caption_scores
    from dalle_repro.sample.rerank import Reranker
    from dalle_repro.train.hard_negatives import caption_neighbours

    demo = Path(a.demo)
    prior = load_prior(demo / "prior" / "export")
    prior.use_trained_precision()
    reranker = Reranker(demo / "clip")
    scale = reranker.logit_scale()
    settings = SampleSettings(
        candidates=a.candidates, keep=1, batch_size=None, temperature=a.temperature, guidance=a.guidance, seed=a.seed
    )
    train = set(shard_captions(expand_shards(f"{a.data}/train/*.tar"), 50_000))
    out: dict[str, Any] = {"args": vars(a), "train_captions": len(train), "clip_scale": scale, "splits": {}}
    for split in ("seen", "heldout"):
        sub = "val" if split == "seen" else split
        caps = list(dict.fromkeys(caption_images(f"{a.data}/{sub}/*.tar", a.captions)[0]))
        t = time.perf_counter()
        cands = sample_candidates(prior, caps, reranker, settings)
        seconds = {"sample": time.perf_counter() - t}
        assert cands.tokens is not None
        p, c = cands.scores.shape
        hits = read_back(cands.images.flatten(0, 1), [x for x in caps for _ in range(c)], a.world)
        right = torch.tensor([bool(h["all"]) for h in hits]).view(p, c)
        model, tok = prior.model, prior.tokenizer
        t = time.perf_counter()
        pmi = torch.stack([caption_scores(model, tok, x, cands.tokens[i]) for i, x in enumerate(caps)])
        seconds["prior_pmi"] = time.perf_counter() - t
        t = time.perf_counter()
        near_all = caption_neighbours([*train, *caps])
        near_caps = [[n for n in near_all[x] if n in train] for x in caps]
        near = torch.stack([caption_scores(model, tok, x, cands.tokens[i], near_caps[i]) for i, x in enumerate(caps)])
        seconds["prior_neighbours"] = time.perf_counter() - t
        rows = {}
        for name, idx in picks(cands.scores, scale, pmi, near, right).items():
            s = summarize([hits[i * c + int(j)] for i, j in enumerate(idx)])
            rows[name] = {k: s[k] for k in ("all", "shape", "colour_shape_binding")}
        out["splits"][split] = {
            "captions": p,
            "candidates": c,
            "neighbours_mean": sum(map(len, near_caps)) / p,
            "without_neighbours": sum(1 for n in near_caps if not n),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "picks": rows,
        }
    return out


def table(result: dict[str, Any]) -> str:
    def cell(s: dict) -> str:
        return f"{100 * s['rate']:.1f}% [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"

    lines = ["| pick | seen: all right | held out: all right | held out: shape |", "| --- | --- | --- | --- |"]
    sp = result["splits"]
    for name in PICKS:
        s, h = sp["seen"]["picks"][name], sp["heldout"]["picks"][name]
        lines.append(f"| {name} | {cell(s['all'])} | {cell(h['all'])} | {100 * h['shape']['rate']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(PickArgs, argv, __doc__ or "", aliases=flag_aliases(PickArgs))
    if a is None:
        return 0
    result = compare(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.out), json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
