"""Pre-encoding image shards into token shards with a trained dVAE, so stage 2 never runs the encoder.

Each input shard ``PARENT/.../NAME.tar`` becomes ``OUTPUT/.../NAME.tar`` (the layout below the
shards' common parent is kept, so ``train/`` and ``val/`` stay apart), holding per sample
``KEY.tokens`` (a NumPy .npy grid, uint16 when the codebook fits), ``KEY.txt`` and ``KEY.json``.
Images are decoded, converted to RGB and center-cropped to the dVAE's input size.

Every output shard is written atomically. A rerun skips output shards that already exist for the
same dVAE and input (recorded in ``OUTPUT/.progress.json``), so a killed run continues; samples that
fail to decode are skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dalle_repro.core import faults
from dalle_repro.core.config import arg
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.pretrained import weights_digest
from dalle_repro.data.samples import (
    IMAGE_EXTS,
    SampleError,
    crop_resize,
    cut_caption,
    decode_image,
    image_to_tensor,
)
from dalle_repro.data.sources import is_remote
from dalle_repro.data.tar import Shard, iter_shard_samples
from dalle_repro.data.writer import Sample, safe_key, write_tar
from dalle_repro.models.dvae import DVAE

log = logging.getLogger(__name__)


@dataclass
class EncodeArgs:
    """tools/encode_tokens.py: image shards in, token shards out."""

    dvae: str = arg(doc="A dVAE folder (config.yaml + model.safetensors).")
    shards: str = arg(doc="Image shards: a glob, brace pattern, comma list or list file.")
    output: str = arg(doc="Folder for the token shards and summary.json.")
    batch_size: int = arg(64, "Images per encoder batch.", gt=0)
    device: str = arg("auto", "auto (cuda when present), cpu or cuda.")
    overwrite: bool = arg(False, "Replace token shards that another dVAE made in the output folder.")


def tokens_bytes(grid: np.ndarray, vocab_size: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, grid.astype(np.uint16 if vocab_size <= 65536 else np.int32), allow_pickle=False)
    return buf.getvalue()


def _dvae_identity(dvae_dir: Path) -> str:
    """Which dVAE weights made a token folder: the weights file, its size and its time."""
    weights = dvae_dir / "model.safetensors"
    wst = os.stat(weights)
    return f"{weights.resolve()}:{wst.st_size}:{wst.st_mtime_ns}"


def _fingerprint(dvae_identity: str, path: str) -> str:
    """One input shard encoded by one dVAE (:func:`_dvae_identity`): the shard's path, size and time."""
    st = os.stat(path)
    return hashlib.sha256(f"{dvae_identity}:{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _samples(path: str, size: int, errors: Counter, max_pixels: int) -> Iterator[tuple[str, str, dict, torch.Tensor]]:
    """(key, caption, metadata, uint8 image tensor) of one shard's decodable samples.

    An unsafe key is renamed (writer.safe_key) to a name no other key of the shard has: ``../x``
    beside a plain ``x`` became a second ``x``, two samples under one key."""
    try:
        with Shard(path) as shard:
            used = {k for k, _ in shard.samples if safe_key(k) == k}
    except (OSError, tarfile.TarError):
        used = set()  # iter_shard_samples counts it
    for key, members in iter_shard_samples([path], errors):
        try:
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                raise SampleError("missing_image", key)
            im, _ = decode_image(members[ext], max_pixels)
            caption = cut_caption(members.get("txt", b""), errors)
        except SampleError as e:
            errors[e.reason] += 1
            continue
        try:
            meta = json.loads(members["json"]) if "json" in members else {}
        except (ValueError, RecursionError):  # bad or deeply nested JSON: the sample keeps no metadata
            meta = {}
        if (safe := safe_key(key)) != key:  # '../../x' or '/abs/x' from the input: not into our tars
            errors["unsafe_key_renamed"] += 1
            key, n = safe, 1
            while key in used:
                n += 1
                key = f"{safe}_{n}"
            used.add(key)
        yield key, caption, meta if isinstance(meta, dict) else {}, image_to_tensor(crop_resize(im, size))


@torch.no_grad()
def encode_shard(model: DVAE, path: str, out: Path, batch_size: int, device: torch.device, max_pixels: int) -> Counter:
    """Encode one image shard into one token shard; returns its counts."""
    errors: Counter = Counter()
    size, vocab = model.args.image_size, model.args.vocab_size
    pending: list[tuple[str, str, dict, torch.Tensor]] = []
    samples: list[Sample] = []

    def flush() -> None:
        x = torch.stack([p[3] for p in pending]).to(device).float().div_(255)
        grids = model.encode(x.contiguous(memory_format=torch.channels_last)).cpu().numpy()
        for (key, caption, meta, _), g in zip(pending, grids, strict=True):
            meta = meta | {"key": key, "grid": list(g.shape), "vocab_size": vocab}
            samples.append(Sample(key, tokens_bytes(g, vocab), "tokens", caption, meta))
        pending.clear()

    for item in _samples(path, size, errors, max_pixels):
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    errors["written"] = write_tar(out, samples, errors)
    return errors


def encode_token_shards(
    dvae_dir: str | Path,
    shards: list[str],
    output: str | Path,
    batch_size: int = 64,
    device: str = "cpu",
    max_pixels: int = 64_000_000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Encode every shard (see the module docstring); returns the summary, also in OUTPUT/summary.json.

    An output folder that holds token shards made with other dVAE weights is refused (before any
    work) unless ``overwrite``, as make_shards refuses to overwrite another run's shards."""
    remote = [p for p in shards if is_remote(p)]
    if remote:
        raise ValueError(
            f"encode_tokens reads local shards only, and got {remote[0]!r}: its output mirrors the input folders "
            "and its resume fingerprints local files. Copy the shards here first (the trainers read pipe: and URLs)."
        )
    dvae_dir, out_root = Path(dvae_dir), Path(output)
    dev = torch.device(device)
    model = DVAE.from_pretrained(dvae_dir).to(dev, memory_format=torch.channels_last).eval()
    parent = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in shards]))
    progress_path = out_root / ".progress.json"
    try:
        progress = json.loads(progress_path.read_text())
    except (OSError, ValueError):
        progress = {}
    ident = _dvae_identity(dvae_dir)
    theirs = progress.get("__dvae__") or (
        "unknown weights" if any(out_root.glob("**/*.tar")) and not progress else ident
    )
    if theirs != ident and not overwrite:
        raise FileExistsError(
            f"{out_root} holds token shards made with another dVAE ({theirs.split(':')[0]}); pass --overwrite "
            "to replace them, or choose another --output"
        )
    if theirs != ident:
        progress = {}
    progress["__dvae__"] = ident
    totals: Counter = Counter()
    written_shards = []
    for path in tqdm(shards, desc="encode", unit="shard", disable=None):
        if not os.path.isfile(path):  # expand_shards warned that it "will be skipped": so it is, counted
            log.warning("shard %s is missing; skipped", path)
            totals["missing_shard"] += 1
            continue
        rel = Path(os.path.abspath(path)).relative_to(parent)
        target = out_root / rel
        fp = _fingerprint(ident, path)
        done = progress.get(str(rel))
        if done and done["fingerprint"] == fp and target.is_file():
            counts = Counter(done["counts"])
        else:
            counts = encode_shard(model, path, target, batch_size, dev, max_pixels)
            faults.point("shard_written", target.name)
            progress[str(rel)] = {"fingerprint": fp, "counts": dict(counts)}
            atomic_write_text(progress_path, json.dumps(progress))
        totals.update(counts)
        written_shards.append({"path": str(rel), "count": counts["written"]})
    written = totals.pop("written", 0)
    summary = {
        "written": written,
        "skipped": dict(sorted(totals.items())),
        "shards": written_shards,
        "dvae": str(dvae_dir),
        "grid": model.args.grid,
        "vocab_size": model.args.vocab_size,
        "dvae_digest": weights_digest(model),  # the prior checks its dvae= against it (train/prior_config.py)
    }
    atomic_write_text(out_root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
