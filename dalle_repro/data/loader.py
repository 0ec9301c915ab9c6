"""Reading webdataset tar shards (img2dataset's layout) into batches, resumably.

A shard is a tar of samples; the members of one sample share a key (``KEY.jpg``/``KEY.png``,
``KEY.txt``, ``KEY.json``, or ``KEY.tokens`` for pre-encoded image tokens). The key of a member is its
path up to the first dot of its file name, as in webdataset.

Splitting: in each epoch the shard list is shuffled with ``(seed, epoch)`` (the same order on every
rank), and shard ``i`` of that order goes to global reader ``i mod (world_size * num_workers)``.
So within an epoch no sample is read twice and none is skipped. Each reader's stream runs on
forever, epoch after epoch, which keeps ranks in lock-step for training.

Resuming: every batch carries its reader's position (epoch, shard position, sample position) and
error counters. :class:`Loader` keeps the position of the last batch it handed out per reader, and
``Loader.state_dict()`` restarts each reader exactly there. Random choices (shuffles, crops, BPE
dropout) are seeded from the sample's position, never from a global generator, so a resumed run
sees exactly the samples, crops and token splits that an uninterrupted run would have seen.

Bad data is skipped and counted by reason (see :class:`SampleError`); an unreadable shard is logged
with its path, counted, and skipped.

Shards from elsewhere: besides local paths, a shard may be ``pipe:COMMAND`` (the command's output
is the tar, as in webdataset: ``pipe:curl -s https://host/{000..099}.tar``, ``pipe:aws s3 cp
s3://b/x.tar -``) or an fsspec URL (``file://``, ``s3://``, ``gs://``, ``http(s)://``: their fsspec
package, s3fs, gcsfs or aiohttp, installed by you). Such a shard is copied once, when a reader
opens it, into an unnamed temporary file (in ``$TMPDIR``; gone when the reader closes it or dies)
and read from there like a local one, so shuffling and exact resume are the same. A pipe that
exits non-zero or a URL that cannot be read makes the shard unreadable: counted and skipped.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import braceexpand
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_repro.core.config import ConfigError, arg

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# The formats PIL may decode, whatever a file's name says: the ones IMAGE_EXTS name. PIL otherwise
# tries every plugin it has, and some hand the bytes to other programs (EPS to Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000


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
        "random place, resized bicubic (this project's own; it was called 'random' and 'the paper's' before).",
    )
    random_crop_min: float = arg(0.75, "random_square's smallest crop, as a fraction of the shorter side.", gt=0, le=1)
    batch_size: int = arg(8, "Samples per batch on each rank (the micro-batch).", gt=0)
    num_workers: int = arg(2, "Loader worker processes per rank (0 reads in the main process).", ge=0)
    shuffle: bool = arg(True, "Shuffle shard order and sample order within a shard, per epoch.")
    seed: int = arg(0, "Seed of every random choice the loader makes.", ge=0)
    max_pixels: int = arg(DEFAULT_MAX_PIXELS, "Images with more pixels than this are rejected before decoding.", gt=0)
    max_caption_chars: int = arg(4096, "Captions are cut to this many characters before tokenizing.", gt=0)


# ----------------------------------------------------------------------------------------------
# Samples: images and captions


class SampleError(Exception):
    """A sample that must be skipped. ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xf4][\x80-\xbf]+")


def decode_caption(raw: bytes) -> tuple[str, str]:
    """Caption bytes as text, and the encoding read: ``utf-8``; ``utf-8-sig`` and ``utf-16`` by their
    byte-order mark (Windows editors write them); ``latin-1`` (read as cp1252, its superset for
    printable text) when the bytes are not UTF-8 and hold no more valid UTF-8 multi-byte sequences
    than broken bytes (a cp1252 "«été»" holds one by chance); ``utf-8-damaged`` when the valid ones
    outnumber the broken bytes (those become U+FFFD).
    Without the marks, a UTF-16 caption read as UTF-8 came out as letters between NULs, and a
    Latin-1 "café" as "caf\ufffd"."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", errors="replace"), "utf-16"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    damaged = raw.decode("utf-8", errors="replace")
    if len(_UTF8_MULTIBYTE.findall(raw)) > damaged.count("\ufffd"):  # mostly UTF-8: keep it, mark the rest
        return damaged, "utf-8-damaged"
    return raw.decode("cp1252", errors="replace"), "latin-1"


def clean_caption(raw: bytes | str, max_chars: int | None = None) -> str:
    """Decode (:func:`decode_caption`), turn control characters into spaces, squeeze spaces.

    Returns "" for an empty or whitespace-only caption; callers decide whether that is an error.
    """
    text = decode_caption(raw)[0] if isinstance(raw, bytes) else raw
    if max_chars is not None:
        text = text[: max_chars * 2]  # bound the work below; the final cut comes after squeezing
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", text))
    text = " ".join(text.split())
    return text[:max_chars] if max_chars is not None else text


def _wide_to_8bit(a: np.ndarray, mode: str, rows: int = 256) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image (its own dtype, never widened whole) -> uint8.

    Integers scale from [0, 255] when every value fits there, else from [0, 65535]; floats from
    [0, 1]. Worked ``rows`` rows at a time in float32, so an 8000 x 8000 16-bit PNG (121 KB on disk)
    costs its decoded 128 MB and the 64 MB result, not the 1.6 GB of float64 copies it took before."""
    if mode == "F":
        lo, hi = np.nanmin(a), np.nanmax(a)  # NaN when a value is NaN
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise SampleError("unsupported_mode", f"non-finite pixel values ({mode})")
        if lo < 0 or hi > 1:
            raise SampleError("unsupported_mode", f"float image with values outside [0, 1] ({mode})")
        top = 1.0
    else:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise SampleError("unsupported_mode", f"pixel values outside 16 bits ({mode})")
        top = 255.0 if hi <= 255 else 65535.0
    out = np.empty(a.shape, dtype=np.uint8)
    for r in range(0, a.shape[0], rows):
        out[r : r + rows] = np.rint(a[r : r + rows].astype(np.float32) * np.float32(255 / top))
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB where a faithful conversion exists; raise SampleError otherwise."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "La"):
        im = im.convert("RGBA")
    elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = Image.fromarray(_wide_to_8bit(np.asarray(im), im.mode), "L")
    if im.mode in ("RGBA", "LA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise SampleError("unsupported_mode", f"cannot convert mode {im.mode} to RGB: {e}") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, dict[str, Any]]:
    """Decode image bytes to an RGB PIL image, checking the pixel count before decoding.

    Returns the image and facts about the original (format, mode, size). Raises SampleError with
    reason ``empty_file``, ``not_an_image`` (also: a format outside :data:`IMAGE_FORMATS`, which PIL
    is never asked to try), ``image_bomb``, ``corrupt_image`` or ``unsupported_mode``.
    """
    if not data:
        raise SampleError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("image_bomb", str(e)) from None
    except Image.UnidentifiedImageError:
        raise SampleError("not_an_image", f"not one of the accepted formats ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:  # PIL raises many types on garbage headers
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise SampleError("image_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    facts = {"format": im.format, "mode": im.mode, "width": w, "height": h}
    try:
        im.seek(0)
        im.load()
        facts["orientation"] = int(im.getexif().get(0x0112, 1) or 1)  # EXIF's; exif_transpose applies it
        im = ImageOps.exif_transpose(im) or im
    except Exception as e:
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    return _to_rgb(im), facts


# The paper's listings (SPEC §6): the range of t, the resize factor before the final crop, and the flip.
PAPER_CROPS = {"paper_dvae": (9 / 8, 12 / 8, True), "paper_prior": (1.0, 9 / 8, False)}
CROPS = ("center", "random_square", *PAPER_CROPS)


def crop_resize(
    im: Image.Image,
    size: int,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    random_crop_min: float = 0.75,
) -> Image.Image:
    """Square crop resized to ``size`` x ``size``: ``crop`` is one of :data:`CROPS` (DataArgs.crop says
    what each does); every mode but center draws from ``rng``."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    w, h = im.size
    short = min(w, h)
    if crop == "center":
        side, left, top = short, (w - short) // 2, (h - short) // 2
    elif rng is None:
        raise ValueError(f"crop={crop!r} needs an rng")
    elif crop == "random_square":
        side = max(1, int(round(short * rng.uniform(random_crop_min, 1.0))))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    else:
        return paper_crop(im, size, rng, *PAPER_CROPS[crop])
    box = (left, top, left + side, top + side)
    return im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def paper_crop(im: Image.Image, size: int, rng: np.random.Generator, lo: float, hi: float, flip: bool) -> Image.Image:
    """The paper's listing: a random full-side square, resized by area to t x t with t an integer
    drawn uniformly from [min(s, round(lo size)), min(s, round(hi size))] (s the shorter side), a
    random ``size`` crop of it, and a horizontal flip with probability 1/2 where ``flip``.

    [departure] An image whose shorter side is under ``size`` is scaled up to t = ``size`` (the
    listing's crop would fail on it; the paper's data had no such images)."""
    w, h = im.size
    s = min(w, h)
    left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    t_min, t_max = min(s, round(lo * size)), min(s, round(hi * size))
    t = max(size, int(rng.integers(t_min, t_max + 1)))
    # BOX averages each output pixel's footprint: the area resize of the listing
    im = im.resize((t, t), Image.Resampling.BOX, box=(left, top, left + s, top + s))
    x, y = int(rng.integers(0, t - size + 1)), int(rng.integers(0, t - size + 1))
    im = im.crop((x, y, x + size, y + size))
    if flip and rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


MAX_TOKEN_GRID = 256  # the largest token grid side read without a model to compare with (the paper's: 32)


def decode_tokens(data: bytes, grid: int | None = None) -> torch.Tensor:
    """A ``KEY.tokens`` member (a .npy array of shape (h, w), integer dtype) -> LongTensor (h, w).

    The .npy header (shape, dtype) is read and checked first, against ``grid`` when given (then a
    wrong shape is ``wrong_token_grid``) or else against :data:`MAX_TOKEN_GRID`: nothing is loaded
    or widened to int64 for a member whose header describes something else."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy version {version}")
    except Exception as e:
        raise SampleError("corrupt_tokens", f"{type(e).__name__}: {e}") from None
    if len(shape) != 2 or dtype.kind not in "iu" or dtype.itemsize > 8:
        raise SampleError("corrupt_tokens", f"expected an integer (h, w) grid, got {dtype} {shape}")
    if grid is not None and tuple(shape) != (grid, grid):
        raise SampleError("wrong_token_grid", f"{tuple(shape)}, the model takes ({grid}, {grid})")
    if max(shape) > MAX_TOKEN_GRID:
        raise SampleError("corrupt_tokens", f"a {shape} grid is larger than {MAX_TOKEN_GRID} x {MAX_TOKEN_GRID}")
    if len(data) - f.tell() != shape[0] * shape[1] * dtype.itemsize:
        raise SampleError("corrupt_tokens", f"{len(data) - f.tell()} data bytes for a {dtype} {shape} grid")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise SampleError("corrupt_tokens", f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(a.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Shards


def _top_commas(spec: str) -> list[str]:
    """``spec`` split at the commas outside braces (``a.tar,{b,c}.tar`` is two parts)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return [*parts, spec[start:]]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Resolve a shard spec to paths, ``pipe:`` commands and URLs: a glob, a brace pattern, a
    comma-separated list (commas inside braces belong to the pattern), a list file (.txt/.list, one
    path or URL per line), a ``pipe:`` command (the rest of the spec, brace-expanded, commas and
    all), a URL (brace-expanded; a glob in it expanded by fsspec), or a list of these."""
    if isinstance(spec, str):
        parts = [spec.strip()] if spec.strip().startswith("pipe:") else [s.strip() for s in _top_commas(spec)]
        parts = [p for p in parts if p]
    else:
        parts = list(spec)
    if not parts:
        raise ValueError("empty shard spec")
    out: list[str] = []
    for part in parts:
        if part.endswith((".txt", ".list")) and os.path.isfile(part):
            base = os.path.dirname(part)
            with open(part, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            for n, ln in enumerate(lines, 1):
                if ln.startswith("pipe:"):  # a list file may come with a data set; it must not run commands
                    raise ValueError(
                        f"{part}: line {n} is a pipe: command; a shard list may hold paths and URLs only "
                        "(give pipe: shards in the config or on the command line)"
                    )
                if _URL.match(ln):
                    out.extend(_expand_url(ln))
                else:
                    out.append(os.path.join(base, ln) if not os.path.isabs(ln) else ln)
            continue
        if part.startswith("pipe:"):
            out.extend(braceexpand.braceexpand(part))
            continue
        if _URL.match(part):
            out.extend(u for p in braceexpand.braceexpand(part) for u in _expand_url(p))
            continue
        for p in braceexpand.braceexpand(part):
            if os.path.isdir(p):
                tars = len(glob.glob(os.path.join(glob.escape(p), "*.tar")))
                raise ValueError(
                    f"shard spec {p!r} is a folder; give its shards, e.g. {os.path.join(p, '*.tar')} "
                    f"({tars} .tar files there)"
                )
            if glob.has_magic(p):
                matched = sorted(glob.glob(p))
                if not matched:
                    raise ValueError(f"shard pattern {p!r} matches no file")
                out.extend(matched)
            else:
                out.append(p)
    missing = [p for p in out if not is_remote(p) and not os.path.isfile(p)]
    if missing and len(missing) == len(out):
        raise ValueError(f"none of the {len(out)} shards of {spec!r} exists (first: {out[0]})")
    if missing:
        log.warning("%d of %d shards are missing and will be skipped, e.g. %s", len(missing), len(out), missing[0])
    return out


def first_token_grid(paths: Sequence[str]) -> tuple[str, tuple[int, ...]] | None:
    """``(where, shape)`` of the first ``KEY.tokens`` grid in the first readable shard (its .npy
    header only), to check token shards against a model before training; None when there is none."""
    for path in paths:
        try:
            shard = Shard(path)
        except (OSError, tarfile.TarError):
            continue
        with shard:
            for i in range(min(len(shard), 8)):
                try:
                    key, members = shard.read(i)
                except SampleError:
                    continue
                if "tokens" in members:
                    try:
                        return f"{path}:{key}", tuple(decode_tokens(members["tokens"]).shape)
                    except SampleError:
                        continue
    return None


def split_key(name: str) -> tuple[str, str]:
    """Webdataset's rule: key = path up to the first dot of the file name; ext = the rest."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(spec: str) -> bool:
    """Whether a shard is a ``pipe:`` command or a URL rather than a local path."""
    return spec.startswith("pipe:") or bool(_URL.match(spec))


def _check_protocol(url: str) -> None:
    """A URL whose fsspec backend is not installed fails here, naming what to install, instead of
    every shard being counted unreadable once the run has started."""
    import fsspec

    proto = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as e:
        raise ValueError(f"shard URL {url!r}: fsspec cannot read {proto}:// here ({e})") from None


def _expand_url(url: str) -> list[str]:
    """A URL, with a glob in it expanded by its fsspec filesystem (``file:///data/*.tar``)."""
    _check_protocol(url)
    if not glob.has_magic(url.split("://", 1)[1]):
        return [url]
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(url)
    if not paths:
        raise ValueError(f"shard pattern {url!r} matches no file")
    return sorted(fs.unstrip_protocol(p) for p in paths)


def _no_stop_signals_in_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the loader's workers ignore them; a pipe's command must not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spool(spec: str) -> Any:
    """A ``pipe:`` command's output or a URL's bytes in an unnamed temporary file, at its start.

    Raises OSError (naming the command and its last error output, or the URL) when the command
    exits non-zero or the URL cannot be read."""
    out = tempfile.TemporaryFile(prefix="dalle_repro_shard_")  # noqa: SIM115 (the caller closes it)
    try:
        if spec.startswith("pipe:"):
            cmd = spec[len("pipe:") :]
            with tempfile.TemporaryFile() as err:
                with subprocess.Popen(
                    cmd, shell=True, stdout=subprocess.PIPE, stderr=err, preexec_fn=_no_stop_signals_in_child
                ) as proc:
                    assert proc.stdout is not None
                    shutil.copyfileobj(proc.stdout, out, 1 << 20)
                    code = proc.wait()
                if code != 0:
                    err.seek(0)
                    tail = err.read()[-500:].decode("utf-8", "replace").strip()
                    raise OSError(f"pipe command {cmd!r} exited with status {code}" + (f": {tail}" if tail else ""))
        else:
            import fsspec

            try:
                with fsspec.open(spec, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (ImportError, ValueError) as e:
                raise OSError(f"{spec}: {e}") from e
        out.flush()
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise


MAX_SHARD_SAMPLES = 1_000_000  # a shard with more is refused (unreadable_shard): split it


class _NotPlain(Exception):
    """A tar header that :func:`_scan_plain_tar` leaves to tarfile."""


def _scan_plain_tar(f: Any, size: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file of a tar made only of plain ustar/v7 headers
    with valid checksums, ended by zero blocks; raises :class:`_NotPlain` at the first header that
    is anything else (PAX or GNU extensions, a bad checksum, a cut file), for tarfile to handle.

    tarfile builds a TarInfo per member and keeps them all: about 20 us and 650 bytes a member
    (100,000 members: 2 s and 64 MB per shard, in every loader worker that opens it). This reads a
    member's 512-byte header and skips its data, keeping three values."""
    pos = 0
    while pos + 512 <= size:
        f.seek(pos)
        block = f.read(512)
        if block == b"\0" * 512:
            if f.read(512) != b"\0" * 512:
                raise _NotPlain("one zero block")
            while chunk := f.read(1 << 20):  # members after the end marker (tars joined by cat, damage)
                if chunk.strip(b"\0"):
                    raise _NotPlain("data after the end-of-archive marker")
            return
        kind = block[156:157]
        try:
            stored = int(block[148:156].rstrip(b"\0 ") or b"0", 8)
            length = int(block[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise _NotPlain("not octal") from None
        if stored != sum(block) - sum(block[148:156]) + 256 or kind not in (b"0", b"\0", b"5", b"1", b"2"):
            raise _NotPlain(f"header kind {kind!r} or checksum")
        data = pos + 512
        if data + length > size:
            raise _NotPlain("cut")
        if kind in (b"0", b"\0"):
            name = block[0:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            yield name.decode("utf-8", "surrogateescape"), data, length
        pos = data + -(-length // 512) * 512
    raise _NotPlain("no end-of-archive marker")


class Shard:
    """An open tar shard with an index of its samples, for random access by sample number.

    ``truncated`` is set when the tar is damaged: cut short, or with unreadable bytes where a member
    header should be. Reading goes on past a damaged header to the next readable one (tarfile's
    ``ignore_zeros``), so one flipped byte costs one member, not the rest of the shard; the samples
    that lose a member are then skipped by the reader and counted (``missing_image``...).

    The index keeps each member's data offset and size only. A shard of plain headers (what
    make_shards and encode_tokens write for keys under 100 bytes, and img2dataset's) is indexed by
    :func:`_scan_plain_tar`; any other goes through tarfile. More than :data:`MAX_SHARD_SAMPLES`
    samples is refused, which bounds the index at some 300 bytes a sample.
    """

    def __init__(self, path: str):
        self.path = path
        self.truncated = False
        self._file = spool(path) if is_remote(path) else open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            size = os.fstat(self._file.fileno()).st_size
            try:
                groups = self._group(_scan_plain_tar(self._file, size))
            except _NotPlain:
                groups = self._index_with_tarfile(path, size)
        except BaseException:
            self._file.close()
            raise
        if len(groups) > MAX_SHARD_SAMPLES:
            self._file.close()
            raise tarfile.ReadError(f"{len(groups)} samples, more than {MAX_SHARD_SAMPLES}: split the shard")
        self.samples = list(groups.items())

    @staticmethod
    def _group(members: Iterable[tuple[str, int, int]]) -> dict[str, dict[str, tuple[int, int]]]:
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, length in members:
            key, ext = split_key(name)
            if ext:
                groups.setdefault(key, {})[ext] = (offset, length)
        return groups

    def _index_with_tarfile(self, path: str, end: int) -> dict[str, dict[str, tuple[int, int]]]:
        members: list[tuple[str, int, int]] = []
        expected, damage = 0, None  # where the next header should start; what was wrong
        self._file.seek(0)
        with tarfile.open(fileobj=self._file, mode="r:", ignore_zeros=True) as tar:  # OSError / tarfile.ReadError
            try:
                while True:
                    info = tar.next()
                    if info is None:
                        break
                    tar.members.clear()  # our index keeps three values; tarfile would keep every TarInfo
                    if info.offset != expected and damage is None:
                        damage = f"unreadable bytes {expected}-{info.offset}"
                    expected = info.offset_data + -(-info.size // 512) * 512
                    if info.isfile():
                        members.append((info.name, info.offset_data, info.size))
                # A whole tar ends in at least two zero blocks after its last member; a cut one does not.
                tar.fileobj.seek(expected)
                tail = tar.fileobj.read()
                cut = len(tail) < 1024 or bool(tail.strip(b"\0"))
                if cut:
                    damage = damage or "no end-of-archive marker"
            except (tarfile.TarError, OSError, EOFError) as e:
                damage, cut = damage or str(e), True
        groups = self._group(members)
        if damage is not None:
            if not groups:
                raise tarfile.ReadError(f"no readable member ({damage})")
            self.truncated = True
            log.warning("shard %s is damaged (%s); using its %d readable samples", path, damage, len(groups))
        for parts in groups.values():
            if any(off + n > end for off, n in parts.values()):
                self.truncated = cut = True
        if self.truncated and cut and groups:
            groups.popitem()  # the sample at the cut may have lost members: drop it whole
        return {k: m for k, m in groups.items() if all(off + n <= end for off, n in m.values())}

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> tuple[str, dict[str, bytes]]:
        key, members = self.samples[i]
        out: dict[str, bytes] = {}
        for ext, (offset, length) in members.items():
            self._file.seek(offset)
            data = self._file.read(length)
            if len(data) != length:
                raise SampleError("truncated_member", f"{key}.{ext} in {self.path}")
            out[ext] = data
        return key, out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_shard_samples(paths: Sequence[str], errors: Counter | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every raw sample of the given shards in order (for tools such as tokenizer training)."""
    errors = errors if errors is not None else Counter()
    for path in paths:
        try:
            shard = Shard(path)
        except (OSError, tarfile.TarError) as e:
            log.warning("cannot open shard %s: %s; skipped", path, e)
            errors["unreadable_shard"] += 1
            continue
        with shard:
            if shard.truncated:
                errors["truncated_shard"] += 1
            for i in range(len(shard)):
                try:
                    yield shard.read(i)
                except SampleError as e:
                    errors[e.reason] += 1


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
        caption = clean_caption(members.get("txt", b""), a.max_caption_chars)
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
