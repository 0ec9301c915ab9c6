"""Hard negative captions for the small CLIP: other training captions one edit away from an image's own.

A CLIP trained on in-batch negatives alone learns which words a caption holds, not which attribute
goes with which object: a batch rarely holds "a red circle left of a blue square" beside "a blue
circle left of a red square", so nothing asks it to tell them apart, and it reranks as a bag of
words (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words",
whose NegCLIP adds such captions as negatives). Here the negatives of a caption are the *other
training captions* that differ from it by one word replaced ("red" -> "blue", "left" -> "right") or
by two of its words exchanged (the two colours of a scene swapped). Being training captions, they
hold only what the data holds: no word pairing the data lacks (a held-out colour-shape pair of the
demo) reaches the CLIP even as a negative. Nothing here knows a grammar, so it works on anyone's
captions; captions with no such neighbour (most of a photo set's) simply get none.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from dalle_repro.data.loader import stable_seed
from dalle_repro.data.tar import shard_captions

log = logging.getLogger(__name__)
MAX_WORDS = 32  # longer captions are matched on their first 32 words only (the pairs to swap grow as the square)


def caption_neighbours(captions: Iterable[str]) -> dict[str, list[str]]:
    """Each distinct caption's neighbours among the others: the same number of words, and either one
    word differs or two of its words are exchanged. Sorted, so the result does not depend on the
    order of ``captions``."""
    words = {c: tuple(c.split()[:MAX_WORDS]) for c in sorted(set(captions)) if c.strip()}
    by_words: dict[tuple[str, ...], list[str]] = defaultdict(list)
    blanked: dict[tuple[int, tuple[str, ...]], list[str]] = defaultdict(list)  # (word index, the others) -> captions
    for c, w in words.items():
        by_words[w].append(c)
        for i in range(len(w)):
            blanked[(i, w[:i] + w[i + 1 :])].append(c)
    out: dict[str, list[str]] = {}
    for c, w in words.items():
        near: set[str] = set()
        for i in range(len(w)):
            near.update(blanked[(i, w[:i] + w[i + 1 :])])
            for j in range(i + 1, len(w)):
                if w[i] != w[j]:
                    near.update(by_words.get(w[:i] + (w[j],) + w[i + 1 : j] + (w[i],) + w[j + 1 :], ()))
        near.difference_update(by_words[w])  # itself, and captions that only differ past MAX_WORDS
        out[c] = sorted(near)
    return out


class HardNegatives:
    """Draws up to ``k`` neighbours per caption (:func:`caption_neighbours` of the training captions)
    with a generator seeded by (seed, step), so a resumed run draws what the uninterrupted one did."""

    def __init__(self, neighbours: dict[str, list[str]], k: int, seed: int):
        self.neighbours, self.k, self.seed = neighbours, k, seed
        have = sum(1 for v in neighbours.values() if v)
        log.info(
            "hard negatives: %d of %d distinct training captions have one or more (mean %.1f); %d drawn per image",
            have,
            len(neighbours),
            sum(len(v) for v in neighbours.values()) / max(1, len(neighbours)),
            k,
        )

    @classmethod
    def from_shards(cls, paths: Sequence[str], k: int, seed: int, limit: int) -> HardNegatives:
        t = time.perf_counter()
        captions = shard_captions(paths, limit)
        near = caption_neighbours(captions)
        log.info("hard negatives: read %d captions in %.1f s", len(captions), time.perf_counter() - t)
        return cls(near, k, seed)

    def draw(self, captions: Sequence[str], step: int) -> tuple[list[str], np.ndarray]:
        """``k`` negatives per caption, flat (caption-major), and a (len(captions), k) bool mask of the
        real ones: a caption with fewer than ``k`` neighbours is padded with its own text, masked out."""
        rng = np.random.default_rng(stable_seed(self.seed, "hard-negatives", step))
        flat: list[str] = []
        mask = np.zeros((len(captions), self.k), dtype=bool)
        for i, c in enumerate(captions):
            near = self.neighbours.get(c, [])
            pick = [near[j] for j in rng.choice(len(near), min(self.k, len(near)), replace=False)] if near else []
            mask[i, : len(pick)] = True
            flat.extend(pick + [c] * (self.k - len(pick)))
        return flat, mask
