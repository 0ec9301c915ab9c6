"""Sampling (SPEC §5): candidates from the cached decoder, decoded by the dVAE, reranked by CLIP.

:func:`generate` is the library call; launch/sample.py is a thin command line over it. For each
caption it draws ``candidates`` image-token grids in batches with :meth:`Transformer.generate`
(the model's own forward with the per-layer caches of every mask kind), optionally with
classifier-free guidance (conditional and unconditional rows in one batch) and image priming
(the top rows of an init image's tokens), decodes them with the dVAE, scores them with a
:class:`~dalle_repro.sample.rerank.Reranker` when one is given, and keeps the best ``keep``.

[departure] The paper draws 512 candidates per caption and reranks them; ``candidates`` defaults to
64 (keep 8), which is what a CPU can draw in minutes at the demo's size. ``--candidates 512`` gives
the paper's setting.

Determinism: caption ``i`` draws from a generator seeded with ``(seed, i)``, so a result depends on
the seed, the settings and the batch size, not on the other captions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.models.dvae import DVAE
from dalle_repro.models.transformer import Transformer
from dalle_repro.sample.rerank import Reranker

log = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """How captions are sampled: the config section ``sample`` of launch/sample.py, of the demo, and of
    the zero-shot evaluation (``evaluation.sample``), each with its own defaults."""

    candidates: int = arg(64, "Images generated per caption (the paper reranks 512).", ge=1)
    keep: int = arg(8, "Images kept per caption, best CLIP score first (without CLIP: the first ones).", ge=1)
    temperature: float = arg(1.0, "Softmax temperature; 0 is greedy.", ge=0)
    top_k: int | None = arg(None, "Sample among the K most likely codes; null: the whole codebook.", gt=0)
    top_p: float | None = arg(None, "Sample within the nucleus of probability P; null: no nucleus.", gt=0, le=1)
    guidance: float = arg(
        1.0, "Classifier-free guidance scale (1: none; needs a prior trained with caption dropout).", ge=0
    )
    init_rows: int = arg(0, "Token rows of the init image kept at the top (image-to-image); 0: none.", ge=0)
    image_weight: float = arg(
        1.0,
        "With an init image (variations, region edits) and CLIP: the rerank score is CLIP's caption score plus "
        "this times the cosine of CLIP's embeddings of the candidate and the init image (0: the caption only).",
        ge=0,
    )
    fit_share: float = arg(
        0.5,
        "Region edits: the share of candidates kept by how well the fixed tokens after the box follow from the "
        "redrawn ones (the prior's mean log-likelihood of them), before CLIP ranks those; 1: all pass.",
        gt=0,
        le=1,
    )
    rerank_reference: str | None = arg(
        None,
        "Shards whose captions the reranker ranks against (the training set's, say): it then picks by log "
        "p(caption | image) among the caption and those, so an image that fits every caption about as well (a "
        "typical one) does not win on its cosine; null: CLIP's cosine with the caption alone.",
    )
    seed: int = arg(0, "Seed; the same seed and settings give the same images.", ge=0)
    batch_size: int | None = arg(16, "Candidates drawn and decoded together; null: all of a caption's at once.", gt=0)
    dedup: bool = arg(
        True,
        "Pass over a candidate whose image tokens equal a better kept one's, keeping the next best instead "
        "(fewer than keep when too few differ); result.json counts them (duplicates_dropped).",
    )

    def __post_init__(self) -> None:
        if self.keep > self.candidates:
            raise ConfigError(f"keep: got {self.keep}; it cannot exceed candidates ({self.candidates})")

    @property
    def batch(self) -> int:
        """Candidates per batch (``batch_size``, or all of them)."""
        return self.batch_size or self.candidates

    def check(self, model: Transformer) -> None:
        a = model.args
        if self.candidates < 1 or not 1 <= self.keep:
            raise ValueError(f"candidates ({self.candidates}) and keep ({self.keep}) must be >= 1")
        if self.keep > self.candidates:
            raise ValueError(f"keep ({self.keep}) cannot exceed candidates ({self.candidates})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k <= a.image_vocab:
            raise ValueError(f"top_k must be in [1, {a.image_vocab}], got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.init_rows <= a.grid:
            raise ValueError(f"init_rows must be in [0, {a.grid}], got {self.init_rows}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PromptResult:
    caption: str
    images: torch.Tensor  # (keep, 3, H, W) in [0, 1], best first
    tokens: torch.Tensor  # (keep, grid, grid)
    scores: list[float] | None  # CLIP scores of the kept images, best first (None without a reranker)
    candidate_scores: list[float] | None = None  # every candidate's score, in generation order
    kept: list[int] = field(default_factory=list)  # indices of the kept candidates
    duplicates_dropped: int = 0  # candidates passed over because a kept one had the same tokens
    fit: list[float] | None = None  # region edits: each kept image's fit (mean log-likelihood of the kept rest)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"caption": self.caption, "kept": self.kept, "scores": self.scores}
        out["duplicates_dropped"] = self.duplicates_dropped
        if self.fit is not None:
            out["fit"] = self.fit
        if self.candidate_scores:
            cs = self.candidate_scores
            out |= {
                "mean_score_all": sum(cs) / len(cs),
                "mean_score_kept": sum(self.scores or []) / max(1, len(self.kept)),
            }
        return out


@dataclass(frozen=True)
class Box:
    """A region to redraw, in pixels of the image as the dVAE sees it: x0, y0 inclusive, x1, y1 exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def parse(cls, text: str) -> Box:
        """``x0,y0,x1,y1`` (the command line's ``--edit-box``)."""
        parts = text.replace(" ", "").split(",")
        try:
            x0, y0, x1, y1 = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"edit box {text!r}: expected four integers x0,y0,x1,y1 (pixels)") from None
        return cls(x0, y0, x1, y1)

    def scaled(self, factor: float) -> Box:
        return Box(*(int(round(v * factor)) for v in (self.x0, self.y0, self.x1, self.y1)))

    def mask(self, image_size: int, grid: int) -> torch.Tensor:
        """The grid positions (grid^2, raster order) whose cells overlap the box; ValueError naming the
        box when it leaves the image, is empty, or covers no whole token cell's worth of pixels."""
        cell = image_size / grid
        if not (0 <= self.x0 < self.x1 <= image_size and 0 <= self.y0 < self.y1 <= image_size):
            raise ValueError(
                f"edit box {self.x0},{self.y0},{self.x1},{self.y1} is not inside the {image_size}x{image_size} "
                "image (x0 < x1 and y0 < y1, all within it)"
            )
        if self.x1 - self.x0 < cell or self.y1 - self.y0 < cell:
            raise ValueError(
                f"edit box {self.x0},{self.y0},{self.x1},{self.y1} is smaller than one token ({cell:g}x{cell:g} "
                f"pixels at this image size): make it at least that wide and tall"
            )
        cols = torch.arange(grid)
        cx = (cols * cell < self.x1) & ((cols + 1) * cell > self.x0)
        cy = (cols * cell < self.y1) & ((cols + 1) * cell > self.y0)
        return (cy[:, None] & cx[None, :]).flatten()


def edit_input(
    image: Any, box: Box | None, size: int, grid: int, names: tuple[str, str] = ("init_image", "edit_box")
) -> tuple[torch.Tensor, Box | None]:
    """An edit's input as :func:`generate` takes it: the PIL ``image`` center-cropped and resized to
    the dVAE's ``size`` ((3, size, size) in [0, 1]), and ``box``, given in the image's own pixels,
    checked there (inside, at least one token cell of ``grid``) and scaled to ``size``. A box needs a
    square image, so that its pixels mean the same after resizing. ValueError otherwise, its message
    using ``names`` (the caller's words for the image and the box: flags or API fields)."""
    from dalle_repro.data.samples import crop_resize, image_to_tensor

    image_name, box_name = names
    if box is not None:
        w, h = image.size
        if w != h:
            raise ValueError(
                f"{box_name} needs a square {image_name} ({w}x{h}): crop it square first, so that the box's "
                "pixels mean the same after resizing"
            )
        try:
            box.mask(w, grid)
        except ValueError as e:
            raise ValueError(f"{box_name}: {e}") from None
        box = box.scaled(size / w) if w != size else box
    return image_to_tensor(crop_resize(image, size, "center")).float() / 255, box


def pick_distinct(ranked: list[int], tokens: torch.Tensor, keep: int, dedup: bool) -> tuple[list[int], int]:
    """The first ``keep`` candidates of ``ranked`` (best first) and how many were passed over: with
    ``dedup``, one whose token grid equals an already kept one's (a low temperature or a small top-k
    draws the same image again, and a grid of copies shows less than it seems)."""
    if not dedup:
        return ranked[:keep], 0
    kept: list[int] = []
    seen: set[bytes] = set()
    dropped = 0
    for j in ranked:
        grid = tokens[j].cpu().numpy().tobytes()
        if grid in seen:
            dropped += 1
            continue
        seen.add(grid)
        kept.append(j)
        if len(kept) == keep:
            break
    return kept, dropped


@torch.no_grad()
def generate(
    model: Transformer,
    dvae: DVAE,
    captions: list[str],
    tokenizer: TextTokenizer,
    settings: SampleSettings | None = None,
    reranker: Reranker | None = None,
    init_image: torch.Tensor | None = None,
    progress: bool = True,
    box: Box | None = None,
) -> list[PromptResult]:
    """Images (and scores) for each caption; see the module docstring.

    With ``init_image`` (3, S, S) in [0, 1] at the dVAE's size: ``init_rows`` keeps its top token rows
    and samples the rest (variations, completion); ``box`` redraws the token cells under the box and
    keeps every other token (a region edit; candidates ranked by fit first, see ``fit_share``). With
    a reranker, both add the candidates' similarity to the init image (``image_weight``)."""
    s = settings or SampleSettings()
    s.check(model)
    if reranker is not None:
        reranker.use_reference(s.rerank_reference)
    elif s.rerank_reference is not None:
        log.warning("rerank_reference is set but there is no CLIP to rerank with: it is not used")
    a = model.args
    dev = next(model.parameters()).device
    prime = None
    source = None
    redraw = None
    if s.init_rows or box is not None:
        if init_image is None:
            raise ValueError("init_rows > 0 and an edit box need an init image")
        if s.init_rows and box is not None:
            raise ValueError("init_rows and an edit box are two edits: give one")
        size = dvae.args.image_size
        if tuple(init_image.shape[-2:]) != (size, size):
            raise ValueError(f"the init image is {tuple(init_image.shape[-2:])}; the dVAE takes {size}x{size}")
        grid = dvae.encode(init_image.to(dev).float()[None] if init_image.dim() == 3 else init_image.to(dev).float())
        if tuple(grid.shape[1:]) != (a.grid, a.grid):
            raise ValueError(f"the init image encodes to a {tuple(grid.shape[1:])} grid; the prior has {a.grid}")
        source = grid[:1].flatten(1)
        if s.init_rows:
            prime = source[:, : s.init_rows * a.grid]
        else:
            assert box is not None
            redraw = box.mask(size, a.grid).to(dev)
    uncond = torch.tensor([tokenizer.encode("")], dtype=torch.long, device=dev) if s.guidance != 1.0 else None
    results = []
    total = len(captions) * s.candidates * a.n_image
    bar = tqdm(total=total, desc="sample", unit="tok", disable=not progress or None)
    for i, caption in enumerate(captions):
        if not caption.strip():
            log.warning("caption %d is empty: its images are sampled unconditionally (no text to follow)", i)
        gen = torch.Generator(device=dev).manual_seed(s.seed * 1_000_003 + i)
        text_row = torch.tensor([tokenizer.encode(caption)], dtype=torch.long, device=dev)
        grids, fits = [], []
        for start in range(0, s.candidates, s.batch):
            b = min(s.batch, s.candidates - start)
            common = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, generator=gen, uncond=uncond)
            common |= dict(guidance=s.guidance, progress=lambda _, b=b: bar.update(b))
            if redraw is not None:
                assert source is not None
                tokens, fit = model.edit(text_row.expand(b, -1), source.expand(b, -1), redraw, **common)
                fits.append(fit.float().cpu())
            else:
                tokens = model.generate(
                    text_row.expand(b, -1), prime=None if prime is None else prime.expand(b, -1), **common
                )
            grids.append(tokens.view(b, a.grid, a.grid))
        tokens = torch.cat(grids)
        images = torch.cat([dvae.decode(t) for t in tokens.split(s.batch)]).cpu()
        fit_all = torch.cat(fits) if fits else None
        scores = None
        pool = list(range(s.candidates))
        if fit_all is not None:  # a region edit: the best-fitting share first (NaN: nothing after the box)
            by_fit = torch.argsort(torch.nan_to_num(fit_all, nan=0.0), descending=True, stable=True).tolist()
            pool = by_fit[: max(s.keep, round(s.fit_share * s.candidates))]
        if reranker is not None:
            scores = reranker.pick_scores(images, caption)
            if init_image is not None and s.image_weight:
                target = reranker.embed_images(init_image.float().reshape(1, *init_image.shape[-3:]))
                # against a reference the caption's part is CLIP's temperature times its cosine, less the image's
                # log-sum over the captions: the image's cosine is scaled alike, so image_weight keeps its meaning
                w = s.image_weight * (reranker.logit_scale() if s.rerank_reference is not None else 1.0)
                scores = scores + w * (reranker.embed_images(images) @ target.T).squeeze(1).cpu()
            ranked = sorted(pool, key=lambda j: -float(scores[j]))
        else:
            ranked = pool
        kept, dropped = pick_distinct(ranked, tokens, s.keep, s.dedup)
        result = PromptResult(
            caption,
            images[kept],
            tokens[kept].cpu(),
            None if scores is None else [float(scores[j]) for j in kept],
            None if scores is None else scores.tolist(),
            kept,
            dropped,
            None if fit_all is None else [float(fit_all[j]) for j in kept],
        )
        results.append(result)
    bar.close()
    return results
