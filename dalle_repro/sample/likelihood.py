"""The prior as a classifier: how well a caption explains an image's tokens, by the prior's own likelihood.

CLIP reads a caption much as a bag of words (Yuksekgonul et al. 2023), so between two images of a
held-out caption "a small green circle" it cannot tell the green circle from the green square
reliably: both hold "green" and a shape. The prior drew those images token by token from the
caption, and its likelihood of an image's tokens under a caption, ``log p(x | c)``, compared with
their likelihood under other captions, is a classifier of its own (generative classifiers bound
attributes better than contrastive ones in some studies: Li et al. 2023, "Your diffusion model is
secretly a zero-shot classifier"; Krojer et al. 2023). Two comparisons:

- against the empty caption (the unconditional prior that classifier-free guidance trains):
  ``log p(x | c) - log p(x | "")``, the pointwise mutual information of caption and image, which by
  Bayes is ``log p(c | x) - log p(c)``: how much the caption explains the image beyond what any
  caption would;
- against ``alternatives``, captions one edit away from the caption (the training captions that
  :func:`~dalle_repro.train.hard_negatives.caption_neighbours` finds: a colour or a shape replaced,
  two words exchanged): ``log p(c | x)`` among the caption and those, with equal priors, the
  softmax of the log-likelihoods.

Each is one teacher-forced forward of the prior per (image, caption) pair, in batches: at the
demo's size (64 image tokens) far cheaper than drawing the images was.

Measured on the demo's three seeds (bench/prior_rerank.py, docs/demo.md "The prior as a
classifier"): neither picks better than CLIP's cosine, and the mutual information picks worse than
a random candidate, so sampling does not use them; they are here to measure a prior with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.models.transformer import Transformer


@torch.no_grad()
def image_log_likelihood(
    model: Transformer, text: torch.Tensor, tokens: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    """``sum_i log p(x_i | x_<i, text)`` of image tokens ``tokens`` (B, grid^2) under captions ``text``
    (B or 1, text_len), the prior's teacher-forced forward at temperature 1; (B,) float32 on the CPU."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, grid^2), got {tuple(tokens.shape)}")
    if text.dim() != 2 or text.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(f"text must be (1 or {tokens.shape[0]}, text_len), got {tuple(text.shape)}")
    dev = next(model.parameters()).device
    text = text.to(dev).expand(tokens.shape[0], -1)
    tokens = tokens.to(dev)
    out = []
    for lo in range(0, tokens.shape[0], batch):
        t, x = text[lo : lo + batch], tokens[lo : lo + batch]
        _, logits = model(t, x)
        out.append(F.log_softmax(logits.float(), -1).gather(2, x[..., None]).squeeze(2).sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def caption_scores(
    model: Transformer,
    tokenizer: TextTokenizer,
    caption: str,
    tokens: torch.Tensor,
    alternatives: Sequence[str] = (),
    batch: int = 256,
) -> torch.Tensor:
    """How well ``caption`` explains each image of ``tokens`` (C, grid^2) by the prior (see the module
    docstring): ``log p(caption | x)`` among the caption and ``alternatives`` where there are any,
    else the mutual information ``log p(x | caption) - log p(x | "")``. (C,) float32, higher is better."""
    others = [a for a in dict.fromkeys(alternatives) if a != caption]
    names = [caption, *(others or [""])]
    rows = torch.tensor([tokenizer.encode(c) for c in names], dtype=torch.long)
    n = tokens.shape[0]
    flat = tokens.reshape(n, -1)
    ll = image_log_likelihood(model, rows.repeat_interleave(n, 0), flat.repeat(len(names), 1), batch).view(
        len(names), n
    )
    if others:
        return ll[0] - torch.logsumexp(ll, 0)
    return ll[0] - ll[1]
