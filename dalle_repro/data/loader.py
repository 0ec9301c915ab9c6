"""The streaming loader: shards split across ranks and workers, shuffled per epoch, resumable.

Splitting: in each epoch the shard list is shuffled with ``(seed, epoch)`` (the same order on every
rank), and shard ``i`` of that order goes to global reader ``i mod (world_size * num_workers)``.
So within an epoch no sample is read twice and none is skipped. Each reader's stream runs on
forever, epoch after epoch, which keeps ranks in lock-step for training.

Resuming: every batch carries its reader's position (epoch, shard position, sample position) and
error counters. :class:`Loader` keeps the position of the last batch it handed out per reader, and
``Loader.state_dict()`` restarts each reader exactly there. Random choices (shuffles, crops, BPE
dropout) are seeded from the sample's position, never from a global generator, so a resumed run
sees exactly the samples, crops and token splits that an uninterrupted run would have seen.

Bad data is skipped and counted by reason (:class:`~dalle_repro.data.samples.SampleError`); an
unreadable shard is logged with its path, counted, and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.data.samples import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    MAX_CAPTION_CHARS,
    SampleError,
    clean_caption,
    crop_resize,
    decode_image,
    decode_tokens,
    image_to_tensor,
)
from dalle_repro.data.sources import expand_shards
from dalle_repro.data.tar import Shard

log = logging.getLogger(__name__)


@dataclass
class DataArgs:
    """Where the training samples come from and how they become tensors."""

    shards: str = arg(
        "data/emoji/train/*.tar",
        "Shards to read: a glob, a brace pattern (data-{00000..00099}.tar), a comma-separated list, "
        "or a .txt file with one path per line.",
    )
    kind: Literal["images", "tokens"] = arg(
        "images", "images: decode KEY.jpg/KEY.png; tokens: read KEY.tokens grids made by encode_tokens."
    )
    image_size: int | None = arg(
        None,
        "Side of the square image given to the model, in pixels; null: the model's (train_dvae: model.image_size, "
        "train_prior: the dVAE's). A value given is checked against it.",
        gt=0,
    )
    crop: Literal["center", "random_square", "paper_dvae", "paper_prior"] = arg(
        "center",
        "center: resize the shorter side and take the central square. paper_dvae / paper_prior: the paper's "
        "listings (SPEC §6): a square of the full shorter side at a random place, resized by area to t x image_size "
        "(t ~ U[9/8, 12/8] for the dVAE, U[1, 9/8] for the prior), a random image_size crop of that, and for the "
        "dVAE a random horizontal flip. random_square: a square of side U(random_crop_min, 1) x shorter side at a "
        "random place, resized bicubic (this project's own, not the paper's).",
    )
    random_crop_min: float = arg(0.75, "random_square's smallest crop, as a fraction of the shorter side.", gt=0, le=1)
    batch_size: int = arg(8, "Samples per batch on each rank (the micro-batch).", gt=0)
    num_workers: int = arg(2, "Loader worker processes per rank (0 reads in the main process).", ge=0)
    shuffle: bool = arg(True, "Shuffle shard order and sample order within a shard, per epoch.")
    seed: int = arg(0, "Seed of every random choice the loader makes.", ge=0)
    max_pixels: int = arg(DEFAULT_MAX_PIXELS, "Images with more pixels than this are rejected before decoding.", gt=0)
    max_caption_chars: int = arg(MAX_CAPTION_CHARS, "Captions are cut to this many characters before tokenizing.", gt=0)


# ----------------------------------------------------------------------------------------------
# The stream


def stable_seed(*parts: object) -> int:
    """A stable 64-bit seed from a tuple (Python's hash() is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def fresh_position() -> dict[str, Any]:
    return {"epoch": 0, "shard_pos": 0, "sample_pos": 0, "errors": {}}


class ShardStream(IterableDataset):
    """Batches from shards for one rank; each item is ``(logical_worker, batch, position)``.

    A finite stream (``epochs`` set) ends with its partial batch, or with ``None`` as the batch.

    ``tokenizer`` is any object with ``encode_batch(captions, dropout, rngs)`` (see data/tokenizer.py);
    without one, the batch carries raw captions only. ``epochs=None`` streams forever.
    ``token_grid``/``token_vocab`` (token shards): grids of another shape, or with ids outside the
    codebook, are skipped and counted (``wrong_token_grid``, ``corrupt_tokens``) instead of failing a batch.
    """

    def __init__(
        self,
        shards: Sequence[str],
        args: DataArgs,
        tokenizer: Any = None,
        *,
        text_dropout: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        start: dict[int, dict[str, Any]] | None = None,
        rotation: int = 0,
        token_grid: int | None = None,
        token_vocab: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = list(shards)
        self.args = args
        self.tokenizer = tokenizer
        self.text_dropout = text_dropout
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.start = start or {}
        self.rotation = rotation
        self.token_grid, self.token_vocab = token_grid, token_vocab

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.shards)))
        if self.args.shuffle:
            np.random.default_rng(stable_seed(self.args.seed, "shards", epoch)).shuffle(idx)
        return idx

    def _decode(self, key: str, members: dict[str, bytes], where: tuple[int, ...]) -> dict[str, Any]:
        a = self.args
        caption = clean_caption(members.get("txt", b""), a.max_caption_chars, binary_error=True)
        out: dict[str, Any] = {"key": key, "caption": caption}
        if a.kind == "tokens":
            if "tokens" not in members:
                raise SampleError("missing_tokens", key)
            g, v = self.token_grid, self.token_vocab
            try:
                grid = decode_tokens(members["tokens"], g)
            except SampleError as e:
                raise SampleError(e.reason, f"{key}: {e.detail}") from None
            if v is not None and grid.numel() and not (0 <= int(grid.min()) and int(grid.max()) < v):
                raise SampleError("corrupt_tokens", f"{key}: ids outside [0, {v})")
            out["image_tokens"] = grid
            return out
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise SampleError("missing_image", key)
        im, _ = decode_image(members[ext], a.max_pixels)
        rng = np.random.default_rng(stable_seed(a.seed, "crop", *where)) if a.crop != "center" else None
        im = crop_resize(im, a.image_size, a.crop, rng, a.random_crop_min)
        out["image"] = image_to_tensor(im)
        return out

    def _collate(self, items: list[dict[str, Any]], wheres: list[tuple[int, ...]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"key": [x["key"] for x in items], "caption": [x["caption"] for x in items]}
        for name in ("image", "image_tokens"):
            if name in items[0]:
                shapes = {tuple(x[name].shape) for x in items}
                if len(shapes) > 1:
                    raise ValueError(f"{name} shapes differ within a batch: {sorted(shapes)}")
                batch[name] = torch.stack([x[name] for x in items])
        if self.tokenizer is not None:
            rngs = None
            if self.text_dropout > 0:  # generators cost ~30 us each: made only when used
                rngs = [np.random.default_rng(stable_seed(self.args.seed, "bpe", *w)) for w in wheres]
            batch["text"] = self.tokenizer.encode_batch(batch["caption"], self.text_dropout, rngs)
        return batch

    def iter_worker(self, logical: int, num_workers: int) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        """The stream of one logical reader (global id rank * num_workers + logical)."""
        g, G = self.rank * num_workers + logical, self.world_size * num_workers
        pos = dict(self.start.get(logical) or fresh_position())
        errors = Counter(pos["errors"])
        items: list[dict[str, Any]] = []
        wheres: list[tuple[int, ...]] = []  # (epoch, shard, sample): what seeds a sample's randomness
        while self.epochs is None or pos["epoch"] < self.epochs:
            epoch = pos["epoch"]
            mine = self._order(epoch)[g::G]
            whole_epoch = pos["shard_pos"] == 0 and pos["sample_pos"] == 0
            good_in_epoch = 0
            for sp in range(pos["shard_pos"], len(mine)):
                shard_idx = mine[sp]
                path = self.shards[shard_idx]
                try:
                    shard = Shard(path)
                except (OSError, tarfile.TarError) as e:
                    log.warning("cannot open shard %s: %s; skipped", path, e)
                    errors["unreadable_shard"] += 1
                    pos.update(shard_pos=sp + 1, sample_pos=0)
                    continue
                with shard:
                    if shard.truncated and pos["sample_pos"] == 0:
                        errors["truncated_shard"] += 1
                        errors["truncated_sample"] += shard.lost  # samples the cut took, not delivered
                    order = np.arange(len(shard))
                    if self.args.shuffle:
                        np.random.default_rng(stable_seed(self.args.seed, "samples", epoch, shard_idx)).shuffle(order)
                    for j in range(pos["sample_pos"], len(shard)):
                        try:
                            items.append(self._decode(*shard.read(int(order[j])), (epoch, shard_idx, j)))
                            wheres.append((epoch, shard_idx, j))
                            good_in_epoch += 1
                        except SampleError as e:
                            errors[e.reason] += 1
                            log.debug("skipped sample %d of %s: %s", j, path, e)
                        pos.update(shard_pos=sp, sample_pos=j + 1)
                        if len(items) == self.args.batch_size:
                            pos["errors"] = dict(errors)
                            yield logical, self._collate(items, wheres), dict(pos)
                            items, wheres = [], []
                pos.update(shard_pos=sp + 1, sample_pos=0)
            pos.update(epoch=epoch + 1, shard_pos=0, sample_pos=0)
            if whole_epoch and good_in_epoch == 0 and self.epochs is None:
                names = [self.shards[i] for i in mine] or ["(none)"]
                why = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "no samples"
                raise RuntimeError(
                    f"reader {g} of {G} got no usable sample in epoch {epoch} from shards {names} "
                    f"(skipped so far: {why}; data.kind is {self.args.kind!r})"
                )
        # The last, partial batch; None when there is none, so the final error counts still arrive.
        pos["errors"] = dict(errors)
        yield logical, (self._collate(items, wheres) if items else None), dict(pos)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        info = get_worker_info()
        num_workers, physical = (info.num_workers, info.id) if info else (1, 0)
        return self.iter_worker((physical + self.rotation) % num_workers, num_workers)


def _ignore_stop_signals(_: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which stops cleanly (launchers signal the
    whole process tree) and shuts them down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Loader:
    """A resumable batch iterator for one rank: ``for batch in loader``, ``loader.state_dict()``.

    The state holds each reader's position and error counters and the number of batches handed
    out; a Loader built with the same shards, args, rank and world size and given that state
    continues with exactly the batches an uninterrupted run would have produced next.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        args: DataArgs,
        tokenizer: Any = None,
        *,
        text_dropout: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        token_grid: int | None = None,
        token_vocab: int | None = None,
    ):
        if args.kind == "images" and args.image_size is None:
            raise ConfigError("data.image_size: not set (the trainers set it from their model; other callers must)")
        self.paths = expand_shards(shards)
        self.token_grid, self.token_vocab = token_grid, token_vocab
        self.args = args
        self.tokenizer, self.text_dropout = tokenizer, text_dropout
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.num_workers = args.num_workers
        readers = world_size * max(1, self.num_workers)
        if epochs is None and len(self.paths) < readers:
            raise ValueError(
                f"{len(self.paths)} shards cannot feed {world_size} ranks x {max(1, self.num_workers)} workers: "
                "make more shards (a smaller --shard-size) or lower data.num_workers"
            )
        self.positions: dict[int, dict[str, Any]] = {}
        self.consumed = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = max(1, self.num_workers)
        stream = ShardStream(
            self.paths,
            self.args,
            self.tokenizer,
            text_dropout=self.text_dropout,
            rank=self.rank,
            world_size=self.world_size,
            epochs=self.epochs,
            start={k: dict(v) for k, v in self.positions.items()},
            rotation=self.consumed % n,
            token_grid=self.token_grid,
            token_vocab=self.token_vocab,
        )
        if self.num_workers == 0:
            it: Any = stream.iter_worker(0, 1)
        else:
            it = iter(
                DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    persistent_workers=False,
                    worker_init_fn=_ignore_stop_signals,
                    # its own generator: making workers must not draw from the global RNG, which
                    # training draws from (caption dropout) and resume restores
                    generator=torch.Generator().manual_seed(self.args.seed),
                )
            )
        try:
            for logical, batch, pos in it:
                self.positions[logical] = pos
                if batch is not None:
                    self.consumed += 1
                    yield batch
        finally:
            # Stop the workers now, on every way out (they ignore SIGTERM, so nothing else would
            # end them while a traceback still holds this frame).
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    @property
    def errors(self) -> dict[str, int]:
        """Skipped samples and shards so far, by reason, summed over this rank's readers."""
        total: Counter = Counter()
        for pos in self.positions.values():
            total.update(pos["errors"])
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "positions": {str(k): v for k, v in self.positions.items()},
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_shards": len(self.paths),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mine in (
            ("num_workers", self.num_workers),
            ("world_size", self.world_size),
            ("rank", self.rank),
            ("num_shards", len(self.paths)),
        ):
            if state.get(name) != mine:
                raise ValueError(
                    f"cannot resume the data position: it was saved with {name}={state.get(name)}, "
                    f"this run has {name}={mine}"
                )
        self.consumed = int(state["consumed"])
        self.positions = {int(k): dict(v) for k, v in state["positions"].items()}


def shard_paths_in(directory: str | Path) -> list[str]:
    """The ``*.tar`` shards directly in a folder, sorted."""
    return sorted(str(p) for p in Path(directory).glob("*.tar"))
