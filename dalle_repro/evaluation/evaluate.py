"""Evaluation by the numbers the field uses: FID, CLIP score, the paper's protocol, the dVAE's.

- **FID**: torchmetrics' ``FrechetInceptionDistance`` (pinned in pyproject.toml; implementations
  differ by up to 2x on the same images, so the choice is stated) over the features of FID's own
  Inception (evaluation/inception.py), whose weights come from a local file. The same distance over the demo
  CLIP's image embeddings is reported as ``fd_clip``: not FID, and only comparable with itself, but
  available where no Inception weights are.
- **CLIP score**: the mean cosine similarity between each image and its caption, with a local CLIP
  (sample/rerank.py: ours from tools/train_clip.py, or a downloaded Hugging Face one).
- **The paper's protocol** (Ramesh et al. 2021, §3.1): FID against the reference after a Gaussian
  blur of radius 0 to 8 on both sides (:func:`blur`: sigma = the radius, in pixels of the evaluated
  images), and best-of-N by CLIP against a random pick of the same candidates, N = 1, 2, 4, ...
- **The dVAE**: PSNR, bits per dimension (its logit-Laplace likelihood of the original under the
  decoding of its hard tokens) and FID of reconstructions against originals (the tokenizer's rFID).
- **Attributes** (the shapes data set, data/shapes.py, or the strokes set, data/strokes.py: the
  ``world``, data/worlds.py): the share of images whose count, shape, colour, size and place read
  back as their caption says, per attribute and all together.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.images import save_png, to_uint8, to_unit
from dalle_repro.data.shapes import ATTRIBUTES
from dalle_repro.data.worlds import world_name, world_of
from dalle_repro.evaluation.tasks import gain, rates, read_back, summarize
from dalle_repro.models.dvae import (
    DVAE,
    codebook_usage,
    logit_laplace_nll,
    map_pixels,
    nll_to_bits_per_dim,
    unmap_pixels,
)
from dalle_repro.sample.generate import SampleSettings

Features = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) in [0, 1] -> (B, D)


def _zero_shot_sampling() -> SampleSettings:
    """The zero-shot evaluation's sampling defaults: 16 candidates in one batch; the reranked pick
    is CLIP's best of them and the random pick the first, so ``keep`` is 1."""
    return SampleSettings(candidates=16, keep=1, batch_size=None)


@dataclass
class EvalArgs:
    """The zero-shot evaluation (:func:`zero_shot`): samples for seen and for held-out captions, read back."""

    captions: int = arg(
        96,
        "Distinct captions per split: the first of the validation split (seen pairs) and of heldout/ (all of "
        "them where fewer exist). 96 keeps a share's 95% interval within about +-10 points.",
        gt=0,
    )
    pictures: int = arg(6, "Held-out captions drawn beside the nearest training caption.", ge=0)
    inception: str | None = arg(
        None,
        "FID's Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, a local file); with them "
        "FID is added at each blur radius. null: no FID (nothing is downloaded), the Fréchet distance in the "
        "CLIP's space only.",
    )
    sample: SampleSettings = arg(
        factory=_zero_shot_sampling,
        doc="How the evaluation samples (guidance needs a prior trained with caption dropout).",
    )


@dataclass
class EvaluateConfig:
    """tools/evaluate.py: one of a prior export (model), a folder of generated images (images) or a
    dVAE (dvae), evaluated into ``output``."""

    output: str = arg(doc="Folder for evaluation.json and the plots.")
    model: str | None = arg(None, "A prior export (RUN/export): the zero-shot evaluation on the shapes set.")
    images: str | None = arg(
        None,
        "Generated images: launch/sample.py's output folder (NNN-caption/ folders with result.json and "
        "00.png, ...), or a folder of KEY.png with KEY.txt captions.",
    )
    dvae: str | None = arg(None, "A dVAE model folder (RUN/dvae): its reconstructions of the reference.")
    clip: str | None = arg(None, "A CLIP folder (tools/train_clip.py's, or a Hugging Face download).")
    reference: str | None = arg(None, "Reference shards (with images or dvae).")
    attributes: bool = arg(False, "Read the captions' attributes back from the pixels (with images or dvae).")
    world: Literal["shapes", "strokes"] = arg(
        "shapes", "The data set whose grammar the captions follow and whose reader reads them back."
    )
    limit: int | None = arg(None, "At most this many reference images (with dvae); null: all.", gt=0)
    blur_radii: list[float] = arg(factory=lambda: [0, 1, 2, 4, 8], doc="FID blur radii.", ge=0, sep=",")
    seen: str | None = arg(None, "Shards whose captions use pairs seen in training (the validation split).")
    heldout: str | None = arg(None, "Shards whose captions use held-out pairs.")
    train: str | None = arg(None, "Training shards, for the picture of the nearest training captions.")
    evaluation: EvalArgs = arg(factory=EvalArgs, doc="The zero-shot evaluation of a prior (with model).")

    def __post_init__(self) -> None:
        given = [k for k in ("model", "images", "dvae") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"{'/'.join(given) or 'model'}: give exactly one of --model, --images and --dvae")
        if self.model and not (self.clip and self.seen and self.heldout):
            raise ConfigError("model: --model needs --clip, --seen and --heldout")
        if not self.model and not self.reference:
            raise ConfigError(f"reference: --{given[0]} needs --reference shards")
        if not self.blur_radii:
            raise ConfigError("blur_radii: give at least one radius, e.g. 0,1,2,4,8")


class _Given(nn.Module):
    """torchmetrics' extractor slot, for features computed beforehand."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N, D), by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"a covariance needs at least 2 samples a side, got {len(real)} and {len(fake)}")
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), reset_real_features=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


@torch.no_grad()
def features(images: torch.Tensor, extract: Features, batch_size: int = 64) -> torch.Tensor:
    """``extract`` over ``images`` (N, 3, H, W) in [0, 1] (or uint8), in batches; (N, D) float64."""
    x = to_unit(images)
    return torch.cat([extract(x[i : i + batch_size]).double().cpu() for i in range(0, len(x), batch_size)])


def blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """A Gaussian blur with sigma = ``radius`` pixels (the kernel reaches 3 sigma), reflected at the
    edges; radius 0 returns the images unchanged."""
    if radius <= 0:
        return images
    x = to_unit(images)
    half = max(1, math.ceil(3 * radius))
    half = min(half, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * radius**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def fid_by_blur(
    real: torch.Tensor, fake: torch.Tensor, extract: Features, radii: Sequence[float] = (0, 1, 2, 4, 8)
) -> dict[str, float]:
    """The distance between blurred reference and blurred samples at each radius ("0", "1", ...)."""
    return {
        f"{r:g}": frechet_distance(features(blur(real, r), extract), features(blur(fake, r), extract)) for r in radii
    }


def clip_score(images: torch.Tensor, captions: Sequence[str], reranker: Any, batch_size: int = 64) -> float:
    """The mean cosine similarity of each image with its caption under ``reranker``'s CLIP."""
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    x = to_unit(images)
    sims = [
        reranker.scores(x[i : i + batch_size], list(captions[i : i + batch_size])) for i in range(0, len(x), batch_size)
    ]
    return float(torch.cat(sims).mean())


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself."""
    out = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return out if out[-1] == n else [*out, n]


def best_of_n(scores: torch.Tensor, ns: Sequence[int]) -> dict[int, torch.Tensor]:
    """For candidates in generation order with CLIP ``scores`` (P, C): the index of the best of the
    first N per prompt, for each N. The random pick of N is the first candidate (generation order is
    already random), the same at every N: best-of-1."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (prompts, candidates), got {tuple(scores.shape)}")
    if max(ns) > scores.shape[1]:
        raise ValueError(f"N up to {max(ns)}, but only {scores.shape[1]} candidates")
    return {n: scores[:, :n].argmax(1) for n in ns}


def attribute_accuracy(
    images: torch.Tensor, captions: Sequence[str], world: str | ModuleType = "shapes"
) -> dict[str, float]:
    """The share of images (N, 3, S, S) whose every attribute (shapes.ATTRIBUTES) reads back as its
    caption of ``world``'s grammar says, per attribute and ``all``; ``n`` is the count. With intervals and
    tasks: :func:`dalle_repro.evaluation.tasks.summarize` of :func:`~dalle_repro.evaluation.tasks.read_back`."""
    return rates(summarize(read_back(images, captions, world)))


@torch.no_grad()
def dvae_reconstructions(dvae: DVAE, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """PSNR, bits/dim (the likelihood of each original under the decoding of its hard tokens) and the
    reconstructions themselves, over batches of images (B, 3, S, S) uint8."""
    dev = next(dvae.parameters()).device
    originals, recons = [], []
    nll = sq = dims = 0.0
    counts = torch.zeros(dvae.args.vocab_size, dtype=torch.long)
    for batch in batches:
        x = to_unit(batch.to(dev))
        tokens = dvae.encode(x)
        counts += torch.bincount(tokens.flatten().cpu(), minlength=len(counts))
        mu, ln_b = dvae.decode_stats(tokens)
        r = unmap_pixels(torch.sigmoid(mu))
        nll += float(logit_laplace_nll(map_pixels(x), mu, ln_b).sum())
        sq += float(((r - x) ** 2).sum())
        dims += x.numel()
        originals.append(batch.cpu())
        recons.append(to_uint8(r).cpu())
    if not dims:
        raise ValueError("no image to reconstruct")
    mse = sq / dims
    return {
        "psnr": float("inf") if mse == 0 else 10 * math.log10(1 / mse),
        "bits_per_dim": float(nll_to_bits_per_dim(nll / dims)),
        **codebook_usage(counts),
        "originals": torch.cat(originals),
        "reconstructions": torch.cat(recons),
    }


# ----------------------------------------------------------------------------------------------
# A prior on caption sets: the attribute accuracy with and without rerank, best-of-N, CLIP score


def caption_images(shards: str | Sequence[str], limit: int | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """Every (caption, image) of some shards in shard order, images as (3, H, W) uint8 at their own
    size; at most ``limit`` distinct captions (each caption's images are all kept)."""
    from dalle_repro.data.samples import IMAGE_EXTS, SampleError, clean_caption, decode_image, image_to_tensor
    from dalle_repro.data.sources import expand_shards
    from dalle_repro.data.tar import iter_shard_samples

    captions, images, distinct = [], [], set()
    for _, members in iter_shard_samples(expand_shards(shards)):
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        caption = clean_caption(members.get("txt", b""))
        if ext is None or not caption:
            continue
        if limit is not None and caption not in distinct and len(distinct) >= limit:
            continue
        try:
            im, _ = decode_image(members[ext])
        except SampleError:
            continue
        distinct.add(caption)
        captions.append(caption)
        images.append(image_to_tensor(im))
    return captions, images


@dataclass
class CandidateSet:
    """Every candidate of every prompt in generation order: images (P, C, 3, S, S) uint8 and the
    reranker's scores (P, C); the random pick of a prompt is candidate 0, the reranked pick its best
    score. ``cosines``: CLIP's cosines with the caption where the scores are something else (ranked
    against reference captions); the CLIP score metrics are the cosines."""

    captions: list[str]
    images: torch.Tensor
    scores: torch.Tensor
    cosines: torch.Tensor | None = None
    tokens: torch.Tensor | None = None  # (P, C, grid^2): what the prior drew


def sample_candidates(prior: Any, captions: list[str], reranker: Any, settings: Any, rows: int = 256) -> CandidateSet:
    """``settings.candidates`` samples per caption from a loaded export (prior_export.Prior), scored
    by ``reranker``, with the sampler's settings (temperature, top-k/top-p, guidance).

    Several captions are drawn in one cached generate call, up to ``rows`` sequences (their
    candidates side by side): at the demo's size a decoding step costs little more for 256 rows
    than for 16, so this is several times faster than one call per caption. Each call draws from a
    generator seeded with (seed, its first caption's index): a rerun with the same ``rows`` gives
    the same images."""
    model, dvae, tok = prior.model, prior.dvae, prior.tokenizer
    s, c = settings, settings.candidates
    s.check(model)
    dev = next(model.parameters()).device
    grid = model.args.grid
    per = max(1, rows // c)  # captions per call; a caption with more than ``rows`` candidates takes several
    uncond = torch.tensor([tok.encode("")], dtype=torch.long, device=dev) if s.guidance != 1.0 else None
    reranker.use_reference(s.rerank_reference)
    images, scores, cosines, drawn = [], [], [], []
    with torch.no_grad():
        for k in range(0, len(captions), per):
            chunk = captions[k : k + per]
            text = torch.tensor([tok.encode(cap) for cap in chunk for _ in range(c)], dtype=torch.long, device=dev)
            gen = torch.Generator(device=dev).manual_seed(s.seed * 1_000_003 + k)
            tokens = torch.cat(
                [
                    model.generate(
                        t, s.temperature, s.top_k, generator=gen, top_p=s.top_p, uncond=uncond, guidance=s.guidance
                    )
                    for t in text.split(max(rows, 1))
                ]
            )
            decoded = torch.cat([dvae.decode(t.view(-1, grid, grid)) for t in tokens.split(64)]).cpu()
            drawn.append(tokens.cpu().view(len(chunk), c, -1))
            for j, cap in enumerate(chunk):
                ims = decoded[j * c : (j + 1) * c]
                images.append(to_uint8(ims))
                pick, cos = reranker.pick_and_cosine(ims, cap)
                scores.append(pick.float())
                if s.rerank_reference is not None:
                    cosines.append(cos.float())
    return CandidateSet(
        captions, torch.stack(images), torch.stack(scores), torch.stack(cosines) if cosines else None, torch.cat(drawn)
    )


def reader_pick(right: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """The reader's pick per prompt, from ``right`` (P, C): whether each candidate has every
    attribute right. The first right candidate where one exists, else ``fallback``'s (CLIP's pick):
    the most any reranker could get from these candidates."""
    return torch.where(right.any(1), right.float().argmax(1), fallback)


def candidate_report(cands: CandidateSet, attributes: bool, world: str | ModuleType = "shapes") -> dict[str, Any]:
    """CLIP score and (with ``attributes``) what the samples got right, for the random pick (candidate
    0), the reranked pick (CLIP's best), over all candidates, and the reader's pick (a candidate with
    every attribute right where there is one: the ceiling of any reranker), and best-of-N for N = 1, 2, 4, ...
    Every candidate is read once; ``tasks`` holds the GenEval-style breakdown with 95% intervals
    (:mod:`dalle_repro.evaluation.tasks`) and ``clip_gain`` what CLIP's pick adds over a random one.
    The captions are of ``world``'s grammar, read back by its reader."""
    p, c = cands.scores.shape
    best_idx = cands.scores.argmax(1)
    cos = cands.scores if cands.cosines is None else cands.cosines
    out: dict[str, Any] = {
        "prompts": p,
        "candidates": c,
        "clip_score": {
            "random_pick": float(cos[:, 0].mean()),
            "reranked": float(cos[torch.arange(p), best_idx].mean()),
            "all_candidates": float(cos.mean()),
        },
    }
    ns = powers_of_two(c)
    picks = best_of_n(cands.scores, ns)
    out["best_of_n"] = {str(n): {"clip_score": float(cos[torch.arange(p), picks[n]].mean())} for n in ns}
    if attributes:
        repeated = [cap for cap in cands.captions for _ in range(c)]
        hits = read_back(cands.images.flatten(0, 1), repeated, world)  # (prompt, candidate) in row-major order

        def picked(idx: torch.Tensor) -> list[dict[str, bool | None]]:
            return [hits[i * c + int(j)] for i, j in enumerate(idx)]

        right = torch.tensor([bool(h["all"]) for h in hits]).view(p, c)
        # what CLIP's pick falls short of the reader's is the reranker's
        reader_idx = reader_pick(right, best_idx)
        tasks = {
            "random_pick": summarize(picked(torch.zeros(p, dtype=torch.long))),
            "reranked": summarize(picked(best_idx)),
            "all_candidates": summarize(hits),
            "reader_pick": summarize(picked(reader_idx)),
        }
        out["tasks"] = tasks
        out["attributes"] = {k: rates(v) for k, v in tasks.items()}
        out["clip_gain"] = gain(tasks["reranked"], tasks["random_pick"])
        for n in ns:
            out["best_of_n"][str(n)]["all_attributes_right"] = summarize(picked(picks[n]))["all"]["rate"]
    return out


def nearest_training(
    captions: Sequence[str], train_captions: Sequence[str], world: str | ModuleType = "shapes"
) -> list[int]:
    """For each caption of ``world``'s grammar, the index of the training caption sharing most attributes with it."""
    w = world_of(world)
    train = [w.parse_caption(c) for c in train_captions]
    out = []
    for c in captions:
        scene = w.parse_caption(c)
        out.append(max(range(len(train)), key=lambda j: w.similarity(scene, train[j])))  # noqa: B023 (used at once)
    return out


def zero_shot(
    prior: Any,
    reranker: Any,
    seen_shards: str,
    heldout_shards: str,
    settings: Any,
    captions: int = 96,
    train_shards: str | None = None,
    pictures: int = 6,
    out_dir: str | Path | None = None,
    inception: str | Path | None = None,
    blur_radii: Sequence[float] = (0, 1, 2, 4, 8),
    world: str | ModuleType = "shapes",
) -> dict[str, Any]:
    """The zero-shot report on the shapes set (or the strokes set: ``world``): for the first
    ``captions`` distinct captions of the seen split (pairs seen in training) and of the held-out one,
    ``settings.candidates`` samples each, read back (:func:`candidate_report`), beside the reader's
    accuracy on the splits' own renders (its ceiling) and on their dVAE reconstructions (what the
    tokens keep), with the Fréchet distance in the CLIP's image space against those renders.
    With ``out_dir``: evaluation.json, plots and a picture of held-out captions beside the nearest
    training caption (``train_shards``) go there. With ``inception`` (FID's weights, a local file):
    FID of all candidates against the renders at each of ``blur_radii``."""
    result: dict[str, Any] = {
        "world": world_name(world),  # before any sampling: an unknown world fails at once
        "settings": {"captions": captions, **dataclasses.asdict(settings)},
        "splits": {},
    }
    kept: dict[str, tuple[CandidateSet, list[str], list[torch.Tensor]]] = {}
    net = None
    if inception is not None:
        from dalle_repro.evaluation.inception import FIDInception

        net = FIDInception.from_file(inception)  # before any sampling: a wrong file fails at once
    for split, shards in (("seen", seen_shards), ("heldout", heldout_shards)):
        caps, ims = caption_images(shards, captions)
        first: dict[str, torch.Tensor] = {}
        for c, im in zip(caps, ims, strict=True):
            first.setdefault(c, im)
        cands = sample_candidates(prior, list(first), reranker, settings)
        rep = candidate_report(cands, attributes=True, world=world)
        reader = summarize(read_back(torch.stack(ims), caps, world))
        rep["ceilings"] = {"reader": reader}
        rep["reader_ceiling"] = rates(reader)
        if prior.dvae is not None:  # what the tokens keep: the same renders through the dVAE and back
            rec = dvae_reconstructions(prior.dvae, torch.stack(ims).split(64))
            dvae = summarize(read_back(rec["reconstructions"], caps, world))
            usage = {k: rec[k] for k in ("psnr", "codes_used", "codebook_size", "perplexity")}
            rep["ceilings"]["dvae"] = dvae | usage
            rep["dvae_ceiling"] = rates(dvae) | usage
        embed = reranker.embed_images
        rep["fd_clip"] = frechet_distance(
            features(torch.stack(ims), embed), features(cands.images.flatten(0, 1), embed)
        )
        if net is not None:
            rep["fid_by_blur"] = fid_by_blur(torch.stack(ims), cands.images.flatten(0, 1), net, blur_radii)
        result["splits"][split] = rep
        kept[split] = (cands, caps, ims)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = {
            "attributes": str(plot_attributes(result, out / "attributes.png")),
            "best_of_n": str(plot_best_of_n(result, out / "best_of_n.png")),
        }
        if net is not None:
            fids = {split: rep["fid_by_blur"] for split, rep in result["splits"].items()}
            result["plots"]["fid_by_blur"] = str(plot_fid_by_blur(fids, out / "fid_by_blur.png"))
        if train_shards and pictures:
            cands = kept["heldout"][0]
            t_caps, t_ims = caption_images(train_shards)
            near = nearest_training(cands.captions[:pictures], t_caps, world)
            rows = [
                (cap, cands.images[i, int(cands.scores[i].argmax())], cands.images[i, 0], t_caps[j], t_ims[j])
                for i, (cap, j) in enumerate(zip(cands.captions[:pictures], near, strict=True))
            ]
            result["plots"]["heldout_vs_nearest"] = str(plot_nearest(rows, out / "heldout_vs_nearest.png"))
        atomic_write_text(out / "evaluation.json", json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, drawn off screen)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attributes(result: dict[str, Any], path: Path) -> Path:
    """Per attribute: the share right for seen and held-out captions, random pick and reranked, with
    the reader's ceiling on the splits' own renders as a tick."""
    plt = _pyplot()
    keys = [*ATTRIBUTES, "all"]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    bars = [(split, pick) for split in result["splits"] for pick in ("random_pick", "reranked")]
    width = 0.8 / len(bars)
    for b, (split, pick) in enumerate(bars):
        acc = result["splits"][split]["attributes"][pick]
        xs = [i + (b - (len(bars) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [acc[k] for k in keys], width, label=f"{split}, {pick.replace('_', ' ')}")
        ceiling = result["splits"][split]["reader_ceiling"]
        ax.scatter(xs, [ceiling[k] for k in keys], marker="_", color="black", s=60, zorder=3)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share right")
    ax.set_title("Attributes read back from samples (black ticks: the reader on the data's own renders)")
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def plot_best_of_n(result: dict[str, Any], path: Path) -> Path:
    """All attributes right and CLIP score of CLIP's best of the first N candidates, against N."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for split, rep in result["splits"].items():
        ns = sorted(int(n) for n in rep["best_of_n"])
        a2.plot(ns, [rep["best_of_n"][str(n)]["clip_score"] for n in ns], marker="o", label=split)
        if "all_attributes_right" in rep["best_of_n"][str(ns[0])]:
            a1.plot(ns, [rep["best_of_n"][str(n)]["all_attributes_right"] for n in ns], marker="o", label=split)
    for ax, title in ((a1, "all attributes right"), (a2, "CLIP score")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (candidates reranked)")
        ax.set_title(f"best of N: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_fid_by_blur(fids: dict[str, dict[str, float]], path: Path, name: str = "FID") -> Path:
    """``fids``: series name -> {radius: distance}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for label, by_radius in fids.items():
        rs = sorted(by_radius, key=float)
        ax.plot([float(r) for r in rs], [by_radius[r] for r in rs], marker="o", label=label)
    ax.set_xlabel("Gaussian blur radius (pixels)")
    ax.set_ylabel(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_nearest(rows: Sequence[tuple[str, torch.Tensor, torch.Tensor, str, torch.Tensor]], path: Path) -> Path:
    """Rows of: held-out caption, its reranked and random samples, the nearest training caption and its image."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.1 * len(rows)), dpi=100, squeeze=False)
    for (caption, best, first, near_caption, near_image), ax in zip(rows, axes, strict=True):
        for a, im, title in (
            (ax[0], best, f"held out: {caption}\n(reranked sample)"),
            (ax[1], first, "(random sample)"),
            (ax[2], near_image, f"nearest training caption:\n{near_caption}"),
        ):
            a.imshow(im.permute(1, 2, 0).numpy(), interpolation="nearest")
            a.set_title(textwrap.fill(title, 34), fontsize=7)
            a.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """The figure as a PNG, written as every picture here is (viz.save_png: atomic, honouring the umask)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return save_png(Image.open(buf), path)
