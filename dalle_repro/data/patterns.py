"""A folder of captioned pattern images, shaped as a user's own data: to try the own-data steps on.

The README's "Your own data" walk-through needs a folder of images with captions that is not the
demo's set and not a webdataset yet: this writes one. Every image is one pattern in one or two of
eight colours (stripes in three directions, a checkerboard, rings, dots, a gradient), with jitter
in period, phase and centre so that no two images are the same, and a caption that names it:
"thin vertical stripes of red and white", "a blue and yellow checkerboard", "green rings on black",
"a gradient from purple to orange". Files are ``KEY.png`` with ``KEY.txt`` beside them, the layout
``tools/make_shards.py --input DIR`` reads. ``broken`` extra files go in on purpose (a truncated
PNG, a text file named .png, an image with no caption, a caption with no image) so that a first run
shows how make_shards skips and names them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_repro.core.files import atomic_write_bytes, atomic_write_text

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
PATTERNS = ("vertical stripes", "horizontal stripes", "diagonal stripes", "checkerboard", "rings", "dots", "gradient")


def _field(pattern: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A 0..1 mix between the two colours over the image, and the caption's width word (or '')."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    thin = bool(rng.random() < 0.5)
    period = size / (rng.uniform(9, 12) if thin else rng.uniform(3.5, 5))
    phase = rng.uniform(0, period)
    word = "thin " if thin else "wide "
    if pattern == "vertical stripes":
        t = ((x + phase) % period) < period / 2
    elif pattern == "horizontal stripes":
        t = ((y + phase) % period) < period / 2
    elif pattern == "diagonal stripes":
        t = ((x + y + phase) % period) < period / 2
    elif pattern == "checkerboard":
        t = (((x + phase) // (period / 2)) + ((y + phase) // (period / 2))) % 2 == 0
        word = "small " if thin else "big "
    elif pattern == "rings":
        cx, cy = rng.uniform(0.3, 0.7, size=2) * size
        t = (np.hypot(x - cx, y - cy) % period) < period / 2
    elif pattern == "dots":
        r = period * rng.uniform(0.22, 0.3)
        t = np.hypot((x + phase) % period - period / 2, (y + phase) % period - period / 2) < r
        word = "small " if thin else "big "
    elif pattern == "gradient":
        angle = rng.uniform(-0.3, 0.3) + (0 if rng.random() < 0.5 else np.pi / 2)
        u = (x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)
        return 1 - np.clip(u / size + 0.5, 0, 1), ""
    else:
        raise ValueError(f"unknown pattern {pattern!r}; one of {PATTERNS}")
    return t.astype(np.float64), word


def caption(pattern: str, a: str, b: str, word: str) -> str:
    """The caption of one image: the pattern with its width word, and its two colours."""
    if pattern == "gradient":
        return f"a gradient from {a} to {b}"
    if pattern == "checkerboard":
        return f"a {word}{a} and {b} checkerboard"
    if pattern in ("rings", "dots"):
        return f"{word}{a} {pattern} on {b}"
    return f"{word}{pattern} of {a} and {b}"


def render(pattern: str, a: str, b: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One image of ``pattern`` in colours ``a`` (first) and ``b``, with pixel noise, and its caption."""
    t, word = _field(pattern, size, rng)
    ca, cb = np.array(COLOURS[a], np.float64), np.array(COLOURS[b], np.float64)
    img = t[..., None] * ca + (1 - t[..., None]) * cb + rng.normal(0, 4, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), caption(pattern, a, b, word)


def write_pattern_folder(output: str | Path, count: int, size: int = 64, seed: int = 0, broken: bool = True) -> dict:
    """Write ``count`` images with captions into ``output`` (KEY.png + KEY.txt), plus broken files.

    Returns counts: images written, broken files written, and images per pattern.
    """
    if count <= 0 or size < 8:
        raise ValueError(f"count must be > 0 and size >= 8, got count={count}, size={size}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    per: dict[str, int] = {}
    for i in range(count):
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        a, b = rng.choice(len(names), size=2, replace=False)
        image, text = render(pattern, names[a], names[b], size, rng)
        key = f"{i:06d}"
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(out / f"{key}.png", buf.getvalue())
        atomic_write_text(out / f"{key}.txt", text + "\n")
        per[pattern] = per.get(pattern, 0) + 1
    n_broken = 0
    if broken:
        good = (out / "000000.png").read_bytes()
        atomic_write_bytes(out / "broken_truncated.png", good[: len(good) // 3])
        atomic_write_text(out / "broken_truncated.txt", "a picture cut short\n")
        atomic_write_bytes(out / "broken_not_an_image.png", b"this is not a png\n")
        atomic_write_text(out / "broken_not_an_image.txt", "text named as an image\n")
        atomic_write_bytes(out / "broken_no_caption.png", good)
        atomic_write_text(out / "broken_no_image.txt", "a caption whose image is missing\n")
        n_broken = 4
    return {"images": count, "broken": n_broken, "patterns": per, "output": str(out)}
