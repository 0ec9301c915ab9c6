"""One sample's members as tensors: captions decoded and cleaned, images decoded, cropped and resized,
token grids read, each failure a :class:`SampleError` naming the counter it goes to.

A shard is a tar of samples; the members of one sample share a key (``KEY.jpg``/``KEY.png``,
``KEY.txt``, ``KEY.json``, or ``KEY.tokens`` for pre-encoded image tokens). The key of a member is its
path up to the first dot of its file name, as in webdataset (:func:`split_key`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import unicodedata
import warnings
from collections import Counter
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# The formats PIL may decode, whatever a file's name says: the ones IMAGE_EXTS name. PIL otherwise
# tries every plugin it has, and some hand the bytes to other programs (EPS to Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000


# ----------------------------------------------------------------------------------------------
# Samples: images and captions


class SampleError(Exception):
    """A sample that must be skipped. ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xf4][\x80-\xbf]+")
# Bytes that no 8-bit text encoding uses for text: C0 controls other than tab, newlines and form
# feed, DEL, and the five bytes cp1252 leaves undefined.
_NOT_TEXT_BYTES = bytes([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0x81, 0x8D, 0x8F, 0x90, 0x9D])


def _not_text(raw: bytes) -> bool:
    """Whether bytes that are not UTF-8 are no text at all: over 5% (and at least two) of them are
    bytes no 8-bit encoding uses for text, and under 60% are printable ASCII or white space. Random
    bytes hold some 13% of the first kind and 39% of the second; a caption in a legacy encoding (Latin-1,
    cp1251, ...) holds none of the first, and a Latin-1 one with stray controls is mostly ASCII."""
    bad = len(raw) - len(raw.translate(None, _NOT_TEXT_BYTES))
    ascii_printable = len(raw) - len(raw.translate(None, b"\t\n\x0c\r" + bytes(range(0x20, 0x7F))))
    return bad >= 2 and bad * 20 > len(raw) and ascii_printable * 10 < len(raw) * 6


def decode_caption(raw: bytes) -> tuple[str, str]:
    """Caption bytes as text, and the encoding read: ``utf-8``; ``utf-8-sig`` and ``utf-16`` by their
    byte-order mark (Windows editors write them); ``latin-1`` (read as cp1252, its superset for
    printable text) when the bytes are not UTF-8 and hold no more valid UTF-8 multi-byte sequences
    than broken bytes (a cp1252 "«été»" holds one by chance); ``utf-8-damaged`` when the valid ones
    outnumber the broken bytes (those become U+FFFD).
    Without the marks, a UTF-16 caption read as UTF-8 came out as letters between NULs, and a
    Latin-1 "café" as "caf\ufffd". Bytes that are not UTF-8 and no text in any 8-bit encoding
    (:func:`_not_text`: an image or random bytes stored as the caption) are ``binary``: every byte
    reads as some cp1252 character, so without this check garbage became a caption."""
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
    return raw.decode("cp1252", errors="replace"), "binary" if _not_text(raw) else "latin-1"


MAX_CAPTION_CHARS = 4096  # the loader's cut (DataArgs.max_caption_chars); tools that read captions use it too


def cut_caption(raw: bytes | str, errors: Counter, max_chars: int = MAX_CAPTION_CHARS) -> str:
    """:func:`clean_caption` cut at ``max_chars``, counting a cut one (``caption_truncated``).

    What the loader would feed the model anyway; tools that read captions outside the loader
    (tokenizer training, pre-encoding) cut alike, since BPE training is quadratic in the length of
    a space-free caption and a token shard has no use for the rest of a 10 MB one."""
    text = clean_caption(raw, max_chars + 1, binary_error=True)
    if len(text) > max_chars:
        errors["caption_truncated"] += 1
        text = text[:max_chars]
    return text


def clean_caption(raw: bytes | str, max_chars: int | None = None, binary_error: bool = False) -> str:
    """Decode (:func:`decode_caption`), turn control characters into spaces, squeeze spaces.

    Returns "" for an empty or whitespace-only caption, and for bytes that are no text
    (``binary``), unless ``binary_error``: then those raise SampleError ``binary_caption``, for the
    readers that count what they skip. Callers decide whether an empty caption is an error.
    """
    if isinstance(raw, bytes):
        text, encoding = decode_caption(raw)
        if encoding == "binary":
            if binary_error:
                raise SampleError("binary_caption", f"{len(raw)} bytes that are no text")
            return ""
    else:
        text = raw
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


def split_key(name: str) -> tuple[str, str]:
    """Webdataset's rule: key = path up to the first dot of the file name; ext = the rest."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()
