"""Evaluation by the numbers the field uses: FID, CLIP score, the paper's protocol, the dVAE's.

- **FID**: torchmetrics' ``FrechetInceptionDistance`` (pinned in pyproject.toml; implementations
  differ by up to 2x on the same images, so the choice is stated) over the features of FID's own
  Inception (inception.py), whose weights come from a local file. The same distance over the demo
  CLIP's image embeddings is reported as ``fd_clip``: not FID, and only comparable with itself, but
  available where no Inception weights are.
- **CLIP score**: the mean cosine similarity between each image and its caption, with a local CLIP
  (rerank.py: ours from tools/train_clip.py, or a downloaded Hugging Face one).
- **The paper's protocol** (Ramesh et al. 2021, §3.1): FID against the reference after a Gaussian
  blur of radius 0 to 8 on both sides (:func:`blur`: sigma = the radius, in pixels of the evaluated
  images), and best-of-N by CLIP against a random pick of the same candidates, N = 1, 2, 4, ...
- **The dVAE**: PSNR, bits per dimension (its logit-Laplace likelihood of the original under the
  decoding of its hard tokens) and FID of reconstructions against originals (the tokenizer's rFID).
- **Attributes** (the shapes data set, shapes.py): the share of images whose count, shape, colour,
  size and place read back as their caption says, per attribute and all together.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_repro.dvae import DVAE, logit_laplace_nll, map_pixels, nll_to_bits_per_dim, unmap_pixels
from dalle_repro.shapes import ATTRIBUTES, parse_caption, read_scene, score

Features = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) in [0, 1] -> (B, D)


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
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return torch.cat([extract(x[i : i + batch_size]).double().cpu() for i in range(0, len(x), batch_size)])


def blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """A Gaussian blur with sigma = ``radius`` pixels (the kernel reaches 3 sigma), reflected at the
    edges; radius 0 returns the images unchanged."""
    if radius <= 0:
        return images
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
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
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
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


def attribute_accuracy(images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """The share of images (N, 3, S, S) whose every attribute (shapes.ATTRIBUTES) reads back as its
    shapes-grammar caption says, per attribute and ``all``; ``n`` is the count."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    hits: Counter = Counter()
    for im, caption in zip(images, captions, strict=True):
        a = im if im.dtype == torch.uint8 else (im.float().clamp(0, 1) * 255).round().to(torch.uint8)
        hits.update(
            {
                k: int(v)
                for k, v in score(parse_caption(caption), read_scene(a.permute(1, 2, 0).numpy()), a.shape[-1]).items()
            }
        )
    n = len(captions)
    return {k: hits[k] / n for k in (*ATTRIBUTES, "all")} | {"n": n}


@torch.no_grad()
def dvae_reconstructions(dvae: DVAE, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """PSNR, bits/dim (the likelihood of each original under the decoding of its hard tokens) and the
    reconstructions themselves, over batches of images (B, 3, S, S) uint8."""
    dev = next(dvae.parameters()).device
    originals, recons = [], []
    nll = sq = dims = 0.0
    for batch in batches:
        x = batch.to(dev).float() / 255
        mu, ln_b = dvae.decode_stats(dvae.encode(x))
        r = unmap_pixels(torch.sigmoid(mu))
        nll += float(logit_laplace_nll(map_pixels(x), mu, ln_b).sum())
        sq += float(((r - x) ** 2).sum())
        dims += x.numel()
        originals.append(batch.cpu())
        recons.append((r.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    if not dims:
        raise ValueError("no image to reconstruct")
    mse = sq / dims
    return {
        "psnr": float("inf") if mse == 0 else 10 * math.log10(1 / mse),
        "bits_per_dim": float(nll_to_bits_per_dim(nll / dims)),
        "originals": torch.cat(originals),
        "reconstructions": torch.cat(recons),
    }
