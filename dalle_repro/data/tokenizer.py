"""BPE text tokenizer: training with Hugging Face ``tokenizers``, and fixed-length encoding for the prior.

Captions are NFKC-normalised and lowercased (the paper lowercases) and split byte-level, so every
string encodes, with no unknown token.

The pad convention (SPEC §2): a caption shorter than ``text_len`` is followed by pad tokens, and pad
position ``i`` uses its own id ``bpe_vocab_size + i``, so the model learns one pad embedding per text
position. Pads are not masked out. The prior's text vocabulary is therefore
``bpe_vocab_size + text_len`` (:attr:`TextTokenizer.vocab_size`). No start-of-text token is added
here; sequence layout is the transformer's business.

BPE dropout (Provilkov et al. 2020, used by the paper at 0.1) is applied by our own merge loop,
because ``tokenizers`` draws its dropout from an unseeded generator and a resumed run must see the
same token splits as an uninterrupted one. At dropout 0 our loop and ``tokenizers`` agree exactly
(tested); at dropout 0 the fast Rust path is used.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_repro.core.config import arg
from dalle_repro.core.files import atomic_write_text
from dalle_repro.data.samples import SampleError, cut_caption
from dalle_repro.data.tar import iter_shard_samples


@dataclass
class TokenizerArgs:
    """How captions become text tokens."""

    path: str = arg("data/emoji/tokenizer.json", "The tokenizer.json written by tools/train_tokenizer.py.")
    text_len: int = arg(256, "Text tokens per sample; longer captions are truncated, shorter ones padded.", gt=0)
    dropout: float = arg(0.1, "BPE dropout probability for training captions (0 turns it off).", ge=0, lt=1)


@dataclass
class BPEArgs:
    """Training the BPE tokenizer."""

    vocab_size: int = arg(
        16384, "Target BPE vocabulary (the paper's); a small corpus runs out of merges sooner.", ge=257
    )
    min_frequency: int = arg(2, "A merge needs this many occurrences.", ge=1)


@dataclass
class TrainTokenizerArgs:
    """tools/train_tokenizer.py: the captions to learn from and where the tokenizer goes."""

    shards: str = arg(doc="Shards: a glob, brace pattern, comma list or list file.")
    output: str = arg(doc="Where to write tokenizer.json.")
    bpe: BPEArgs = arg(factory=BPEArgs, doc="The BPE training.")


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE with the paper's normalisation (lowercase)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(captions: Iterable[str], vocab_size: int = 16384, min_frequency: int = 2) -> Tokenizer:
    """Train a BPE of at most ``vocab_size`` tokens (fewer when the corpus runs out of merges)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 byte tokens + merges), got {vocab_size}")
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer)
    return tok


def train_from_shards(
    paths: Sequence[str], vocab_size: int = 16384, min_frequency: int = 2, progress: bool = True
) -> tuple[Tokenizer, dict[str, object]]:
    """Train on the ``.txt`` captions of tar shards; returns the tokenizer and counts of what was read."""
    from tqdm import tqdm

    errors: Counter = Counter()
    captions = []
    for _, members in tqdm(
        iter_shard_samples(paths, errors), desc="captions", unit="cap", disable=not progress or None
    ):
        try:
            caption = cut_caption(members.get("txt", b""), errors)
        except SampleError as e:  # bytes that are no text
            errors[e.reason] += 1
            continue
        if caption:
            captions.append(caption)
        else:
            errors["empty_caption"] += 1
    if not captions:
        raise ValueError(f"no caption found in the {len(paths)} shards (first: {paths[0] if paths else '-'})")
    tok = train_bpe(captions, vocab_size, min_frequency)
    stats = {"captions_read": len(captions), "vocab_size": tok.get_vocab_size(), "skipped": dict(errors)}
    return tok, stats | {"caption_tokens": caption_lengths(tok, captions)}


def covering(lengths: Sequence[int], share: float) -> int:
    """The smallest length that at least ``share`` of ``lengths`` fit in."""
    ordered = sorted(lengths)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def caption_lengths(tok: Tokenizer, captions: Sequence[str]) -> dict[str, float | int]:
    """The captions' length distribution in BPE tokens, and the ``text.text_len`` that fits 99% of
    them whole: a longer text_len pads every sample for the sake of a few, a shorter one cuts many."""
    if not captions:
        raise ValueError("no caption to measure")
    lengths = [len(e.ids) for e in tok.encode_batch(list(captions))]
    return {
        "median": float(np.median(lengths)),
        "p90": covering(lengths, 0.90),
        "p99": covering(lengths, 0.99),
        "max": max(lengths),
        "suggested_text_len": covering(lengths, 0.99),
    }


def length_stats_path(tokenizer_path: str | Path) -> Path:
    """Where the caption length statistics go: ``NAME.lengths.json`` beside ``NAME.json``."""
    p = Path(tokenizer_path)
    return p.with_name(p.stem + ".lengths.json")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    atomic_write_text(path, tok.to_str(pretty=False))


class TextTokenizer:
    """Encodes captions to ``text_len`` ids with per-position pads; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer | str | Path, text_len: int = 256):
        if text_len <= 0:
            raise ValueError(f"text_len must be > 0, got {text_len}")
        if not isinstance(tokenizer, Tokenizer):
            path = Path(tokenizer)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file {path} not found (make it with tools/train_tokenizer.py)")
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:
                raise ValueError(f"{path} is not a tokenizers JSON file: {e}") from None
        self.tok = tokenizer
        self.text_len = text_len
        self.bpe_vocab_size = tokenizer.get_vocab_size()
        self._vocab = tokenizer.get_vocab()
        merges = json.loads(tokenizer.to_str())["model"]["merges"]
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        self._ranks = {p: r for r, p in enumerate(pairs)}

    @property
    def vocab_size(self) -> int:
        """Ids the prior must embed: the BPE tokens plus one pad per text position."""
        return self.bpe_vocab_size + self.text_len

    def pad_id(self, position: int) -> int:
        return self.bpe_vocab_size + position

    def _bpe_word(self, word: str, dropout: float, rng: np.random.Generator) -> list[int]:
        """BPE with dropout over one word: each round, the candidate pairs in (rank, position) order
        each survive with probability 1 - dropout, and the first survivor merges; a round where
        none survives ends the word.

        The candidates sit in a heap over a linked list of symbols (keyed by each symbol's start in
        the word, which orders them as their index would), so a word of L symbols costs
        O(L log L): rescanning and sorting every pair each round cost O(L^2 log L), and one
        4,096-character word took 6 s. The draws and merges are the same as the rescan's."""
        n = len(word)
        if n <= 1:
            return [self._vocab[s] for s in word]
        ranks = self._ranks
        sym = {i: c for i, c in enumerate(word)}  # start -> symbol, for the symbols alive
        nxt = {i: i + 1 for i in range(n - 1)}
        prv = {i + 1: i for i in range(n - 1)}
        heap = [(r, i, i + 1) for i in range(n - 1) if (r := ranks.get((word[i], word[i + 1]))) is not None]
        heapq.heapify(heap)

        def valid(r: int, a: int, b: int) -> bool:
            return a in sym and nxt.get(a) == b and ranks.get((sym[a], sym[b])) == r

        while heap:
            dropped, chosen = [], None
            while heap:
                cand = heapq.heappop(heap)
                if not valid(*cand):
                    continue
                if rng.random() >= dropout:
                    chosen = cand
                    break
                dropped.append(cand)
            if chosen is None:  # no merge left, or every candidate dropped this round
                break
            _, a, b = chosen
            sym[a] += sym.pop(b)
            c = nxt.pop(b, None)
            prv.pop(b, None)
            if c is None:
                nxt.pop(a, None)
            else:
                nxt[a], prv[c] = c, a
                if (r := ranks.get((sym[a], sym[c]))) is not None:
                    heapq.heappush(heap, (r, a, c))
            if (p := prv.get(a)) is not None and (r := ranks.get((sym[p], sym[a]))) is not None:
                heapq.heappush(heap, (r, p, a))
            for cand in dropped:  # dropped for this round only
                heapq.heappush(heap, cand)
        return [self._vocab[sym[i]] for i in sorted(sym)]

    def bpe_ids(
        self, caption: str, dropout: float = 0.0, rng: np.random.Generator | None = None, limit: int | None = None
    ) -> list[int]:
        """BPE ids of a caption, unpadded; with dropout, words after the first ``limit`` ids (if
        given) are not encoded, which bounds the work on a long caption that will be truncated."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be str, got {type(caption).__name__}")
        if dropout <= 0:
            return self.tok.encode(caption).ids
        if rng is None:
            raise ValueError("BPE dropout needs an rng (a numpy Generator), for reproducible splits")
        text = self.tok.normalizer.normalize_str(caption)
        ids: list[int] = []
        for word, _ in self.tok.pre_tokenizer.pre_tokenize_str(text):
            if limit is not None and len(ids) >= limit:  # later words cannot change the first `limit` ids
                break
            ids.extend(self._bpe_word(word, dropout, rng))
        return ids

    def encode(self, caption: str, dropout: float = 0.0, rng: np.random.Generator | None = None) -> list[int]:
        """Exactly ``text_len`` ids: the truncated BPE ids, then the per-position pads."""
        ids = self.bpe_ids(caption, dropout, rng, limit=self.text_len)[: self.text_len]
        return ids + [self.pad_id(i) for i in range(len(ids), self.text_len)]

    def encode_batch(
        self,
        captions: Sequence[str],
        dropout: float = 0.0,
        rngs: Sequence[np.random.Generator] | None = None,
    ) -> torch.Tensor:
        """LongTensor (B, text_len). With dropout, ``rngs`` gives one generator per caption."""
        if dropout > 0 and (rngs is None or len(rngs) != len(captions)):
            raise ValueError("BPE dropout needs one rng per caption")
        rows = [self.encode(c, dropout, rngs[i] if rngs else None) for i, c in enumerate(captions)]
        return torch.tensor(rows, dtype=torch.long).reshape(len(captions), self.text_len)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of the BPE ids; pads are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode([i for i in ids if i < self.bpe_vocab_size])
