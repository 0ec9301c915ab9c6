"""A second compositional data set, never used for tuning: thin and thick coloured strokes on paper.

The demo's settings were tuned on the shapes set (data/shapes.py) alone. This set differs from it
where a tuned pipeline can fail unseen: strokes one pixel wide beside three-pixel ones (a dVAE that
blurs thin strokes turns them grey), eight hues instead of five, and a textured background (faint
diagonal stripes, a coarse paper grain and pixel noise) instead of a flat one. Its grammar mirrors
the shapes', attribute for attribute, so the evaluation's tasks apply unchanged: a stroke's *form*
(line, ring, cross, corner) is its ``shape``, its *weight* (thin, thick) its ``size``. Captions:
"a thin orange ring on the left", "a thick blue cross above a thin green line". One colour-form
pair per form (:data:`HELD_OUT`) never appears in training; ``heldout/`` holds scenes that use them.

:func:`read_scene` reads the strokes back from pixels, written against the renderer: the background
is the image's median colour, pixels far from it are a stroke's core, and core pixels within two
pixels of each other form one stroke (a thin anti-aliased stroke has faint gaps; two strokes are laid
out at least three pixels apart), split by colour where two colours' pixels lie in two blocks (two
strokes touching). A stroke's colour is its pixels' vote, each pixel taking the hue whose blend with
the background passes nearest it, weighted by how far it is from the background; a stroke whose
pixels lie far from every hue's blend is ``grey`` (a colour no caption asks for). Its form and weight
are the template (form and weight drawn in its bounding box) nearest its coverage map, faint edge
pixels included.
Scenes, objects, the found strokes and the scoring are the shapes set's own
(:class:`~dalle_repro.data.shapes.Scene`, :func:`~dalle_repro.data.shapes.score`).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dalle_repro.data.loader import stable_seed
from dalle_repro.data.shapes import (
    ATTRIBUTES,
    POSITIONS,
    RELATIONS,
    Found,
    Obj,
    Scene,
    scene_from,
    score,
    similarity,
    write_scene_splits,
)
from dalle_repro.data.shapes import scene_records as shapes_scene_records
from dalle_repro.data.writer import Record, Sample, encode_image

__all__ = [
    "ATTRIBUTES",
    "BACKGROUND",
    "COLOURS",
    "FORMS",
    "HELD_OUT",
    "MAX_SIDE",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Found",
    "Obj",
    "Scene",
    "any_scene",
    "build_strokes_dataset",
    "parse_caption",
    "random_scene",
    "read_scene",
    "render",
    "score",
    "similarity",
]

FORMS = ("line", "ring", "cross", "corner")  # a "/" diagonal, a circle's outline, a plus sign, an L
SHAPES = FORMS  # the attribute's name in the shared grammar
# Eight hues around the colour wheel, each at least 20 degrees (seen from the background) from the
# next and from grey, so that a stroke one pixel wide, blended with the paper, keeps its hue.
COLOURS = {
    "red": (215, 35, 35),
    "orange": (240, 125, 0),
    "yellow": (228, 205, 0),
    "green": (40, 195, 45),
    "cyan": (0, 180, 210),
    "blue": (35, 75, 225),
    "purple": (130, 50, 195),
    "magenta": (220, 40, 170),
}
SIZES = ("thin", "thick")  # the stroke's weight: the attribute "size"
HELD_OUT = (("orange", "line"), ("cyan", "ring"), ("magenta", "cross"), ("green", "corner"))  # one per form
BACKGROUND = (238, 236, 230)  # the paper's mean colour; its texture adds the same levels to every channel
GREY = "grey"  # the colour of a stroke that is none of COLOURS
MAX_SIDE = 512  # read_scene refuses larger images: its component search is per pixel, in Python

# At a 32-pixel canvas (scaled with the canvas): stroke weights in pixels, and the side of the square
# box a stroke fills. Two strokes of 13 pixels side by side still leave two pixels between them.
_WEIGHT = {"thin": 1, "thick": 3}
_SIDE = (9, 13)

_OBJ = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(FORMS)})"
_ONE = re.compile(rf"^{_OBJ} ({'|'.join(POSITIONS)})$")
_TWO = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$")


def parse_caption(caption: str) -> Scene:
    """The scene a caption of this grammar describes; ValueError for anything else (a shapes caption
    included: their size and shape words differ)."""
    text = " ".join(caption.lower().split())
    if m := _ONE.match(text):
        return Scene((Obj(m[3], m[2], m[1]),), m[4])
    if m := _TWO.match(text):
        return Scene((Obj(m[3], m[2], m[1]), Obj(m[7], m[6], m[5])), m[4])
    raise ValueError(
        f"caption {caption!r} is not of the strokes grammar: 'a WEIGHT COLOUR FORM POSITION' or "
        "'a WEIGHT COLOUR FORM RELATION a WEIGHT COLOUR FORM'"
    )


def all_objects(held_out: bool | None = None) -> list[Obj]:
    """Every stroke; ``held_out`` True: only those of a held-out pair, False: only the others."""
    out = []
    for form, colour, weight in itertools.product(FORMS, COLOURS, SIZES):
        if held_out is None or ((colour, form) in HELD_OUT) == held_out:
            out.append(Obj(form, colour, weight))
    return out


def random_scene(rng: np.random.Generator, held_out: bool, two: float = 0.5) -> Scene:
    """A random scene: one of seen pairs only (``held_out`` False), or one with at least one held-out pair."""
    return scene_from(rng, held_out, all_objects(False), all_objects(True), two)


def any_scene(rng: np.random.Generator, held_out: object = None, two: float = 0.5) -> Scene:
    """A random scene over every stroke, held-out pairs included (``held_out`` is ignored): the
    unlabelled scenes a dVAE may train on (``unlabelled/``)."""
    return scene_from(rng, False, all_objects(), [], two)


# ----------------------------------------------------------------------------------------------
# Rendering


def weight_px(size: str, canvas: int) -> int:
    """The stroke weight of ``size`` in pixels at ``canvas``: 1 and 3 at 32, scaled."""
    return max(1, int(_WEIGHT[size] * canvas / 32 + 0.5))


def _draw_form(draw: ImageDraw.ImageDraw, form: str, x0: int, y0: int, w: int, h: int, wt: int, ss: int) -> None:
    """``form`` of weight ``wt`` filling the box (x0, y0, w, h) of the final canvas, drawn (255 on 0)
    at ``ss`` times the resolution. Bars sit on whole pixels, so a thin cross or corner is crisp; a
    line runs from the box's bottom-left corner to its top-right one."""

    def rect(x: float, y: float, rw: float, rh: float) -> None:
        draw.rectangle([x * ss, y * ss, (x + rw) * ss - 1, (y + rh) * ss - 1], fill=255)

    if form == "cross":
        rect(x0, y0 + (h - wt) // 2, w, wt)
        rect(x0 + (w - wt) // 2, y0, wt, h)
    elif form == "corner":
        rect(x0, y0, wt, h)
        rect(x0, y0 + h - wt, w, wt)
    elif form == "ring":
        draw.ellipse([x0 * ss, y0 * ss, (x0 + w) * ss - 1, (y0 + h) * ss - 1], fill=255)
        if w > 2 * wt and h > 2 * wt:
            inner = [(x0 + wt) * ss, (y0 + wt) * ss, (x0 + w - wt) * ss - 1, (y0 + h - wt) * ss - 1]
            draw.ellipse(inner, fill=0)
    elif form == "line":  # the band |u + v - 1| <= d of the box's unit square, a hexagon
        d = wt / np.sqrt(2)
        pts = [(0, h - d), (w - d, 0), (w, 0), (w, d), (d, h), (0, h)]
        # PIL fills a polygon's edge pixels: map the box onto its first to last subpixel, as rect does
        sx, sy = (w * ss - 1) / w, (h * ss - 1) / h
        draw.polygon([(x0 * ss + u * sx, y0 * ss + v * sy) for u, v in pts], fill=255)
    else:
        raise ValueError(f"unknown form {form!r}; the forms are {FORMS}")


@functools.lru_cache(maxsize=4096)
def _coverage(form: str, wt: int, h: int, w: int, pad: int, ss: int = 4) -> np.ndarray:
    """The coverage (0-1) of ``form`` of weight ``wt`` filling an h x w box, in a window ``pad``
    pixels wider each side (cached: the layout and the reader meet the same boxes again)."""
    big = Image.new("L", ((w + 2 * pad) * ss, (h + 2 * pad) * ss), 0)
    _draw_form(ImageDraw.Draw(big), form, pad, pad, w, h, wt, ss)
    out = np.asarray(big.resize((w + 2 * pad, h + 2 * pad), Image.Resampling.BOX), dtype=np.float32) / 255
    out.flags.writeable = False
    return out


def _centre(form: str, wt: int, side: int) -> tuple[float, float]:
    """The ink's centroid (x, y) inside its box: an L's lies low and left of the box's centre."""
    c = _coverage(form, wt, side, side, 0)
    ys, xs = np.mgrid[: c.shape[0], : c.shape[1]] + 0.5
    return float((c * xs).sum() / c.sum()), float((c * ys).sum() / c.sum())


def layout(scene: Scene, canvas: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """(x0, y0, side, weight) of each stroke: a lone one in the named half, its box at least two pixels
    from the middle line and its ink's centroid near the other axis' middle; a pair in opposite halves,
    at least three pixels apart, so the relation reads off their centroids."""
    s, half, cross = canvas, canvas // 2, max(1, round(canvas / 16))
    lo_side, hi_side = (max(5, round(v * s / 32)) for v in _SIDE)
    boxes = []
    n = len(scene.objects)
    horizontal = scene.place in ("on the left", "on the right", "left of", "right of")
    first_before = scene.place in ("on the left", "at the top", "left of", "above")
    for i, o in enumerate(scene.objects):
        side, wt = int(rng.integers(lo_side, hi_side + 1)), weight_px(o.size, s)
        before = (i == 0) == first_before
        gap = 2 if n == 1 else 1  # from the middle line: a pair's boxes end up (at least) 3 apart
        along = int(rng.integers(1, max(1, half - gap - side) + 1))
        a = along if before else s - side - along
        cx, cy = _centre(o.shape, wt, side)
        mid = cy if horizontal else cx  # the centroid's offset across the axis
        c = int(np.clip(round(half + int(rng.integers(-cross, cross + 1)) - mid), 1, s - side - 1))
        boxes.append((a, c, side, wt) if horizontal else (c, a, side, wt))
    return boxes


def paper(canvas: int, rng: np.random.Generator) -> np.ndarray:
    """The background (canvas, canvas, 3) float: faint diagonal stripes of a few levels (random period,
    phase and direction) and a coarse grain, both grey, on :data:`BACKGROUND`."""
    ys, xs = np.mgrid[:canvas, :canvas].astype(np.float32)
    period = rng.uniform(4, 8) * canvas / 32
    direction = 1 if rng.random() < 0.5 else -1
    stripes = np.round(rng.uniform(2, 5) * np.sin(2 * np.pi * (xs + direction * ys) / period + rng.uniform(0, 6.3)))
    cell = max(1, canvas // 8)
    coarse = np.round(rng.normal(0, 1.5, (canvas // cell + 1,) * 2))
    grain = np.kron(coarse, np.ones((cell, cell)))[:canvas, :canvas]
    return np.array(BACKGROUND, dtype=np.float32) + (stripes + grain)[..., None]


def render(scene: Scene, canvas: int = 32, seed: int = 0, supersample: int = 4, noise: float = 3.0) -> Image.Image:
    """The scene on textured paper, ``canvas`` pixels square, RGB: each stroke's coverage (drawn at
    ``supersample`` x and averaged down) blends its colour, jittered by up to 10 levels, over the
    paper; ``noise`` is the standard deviation of Gaussian pixel noise, in levels."""
    rng = np.random.default_rng(seed)
    a = paper(canvas, rng)
    for o, (x, y, side, wt) in zip(scene.objects, layout(scene, canvas, rng), strict=True):
        big = Image.new("L", (canvas * supersample,) * 2, 0)
        _draw_form(ImageDraw.Draw(big), o.shape, x, y, side, side, wt, supersample)
        alpha = np.asarray(big.resize((canvas, canvas), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
        colour = np.clip(np.array(COLOURS[o.colour]) + rng.integers(-10, 11, 3), 0, 255)
        a = a * (1 - alpha) + colour.astype(np.float32) * alpha
    if noise > 0:
        a = a + rng.normal(0, noise, a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Reading


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_TOWARDS = _PALETTE - np.array(BACKGROUND, dtype=np.float32)  # each colour as seen from the paper
# A stroke's core: pixels further from the paper than 0.35 of the palest colour's distance (72 levels),
# which the paper's stripes, grain and noise stay far below, and a generated image's noise too (a
# speck between two strokes would join them). A thin stroke's fainter edge pixels count only for its
# form and weight (its coverage map around the core), never for what joins what.
_FG_DISTANCE = 0.35 * float(np.linalg.norm(_TOWARDS, axis=1).min())
# A stroke is grey when its pixels lie, on average, further from their hue's blend than this share of
# their distance from the paper (sin 17 degrees: every hue is at least 20 degrees from grey).
_GREY_RATIO = 0.3
_REACH = 2  # ink pixels this close (Chebyshev) belong to one stroke: bridges a thin stroke's faint gaps
_PAD = 2


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image as (H, W, 3) float32, refusing what the reader cannot or should not read."""
    if isinstance(image, Image.Image):
        if max(image.size) > MAX_SIDE:
            raise ValueError(
                f"read_scene reads images up to {MAX_SIDE}x{MAX_SIDE}, got {image.size[0]}x{image.size[1]}"
            )
        image = image.convert("RGB")
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"read_scene needs an (H, W, 3) RGB image, got shape {a.shape}")
    if max(a.shape[:2]) > MAX_SIDE:
        raise ValueError(f"read_scene reads images up to {MAX_SIDE}x{MAX_SIDE}, got {a.shape[1]}x{a.shape[0]}")
    return a


def _colour_fit(offset: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel (offset from the paper, (H, W, 3)): the colour whose blend with the paper passes
    nearest (the distance to the segment from the paper to the colour), how much of each colour
    (H, W, K) and the distance to each segment (H, W, K)."""
    x = offset.reshape(-1, 1, 3)
    t = np.clip((x * _TOWARDS).sum(-1) / (_TOWARDS**2).sum(-1), 0, 1)
    residual = np.linalg.norm(x - t[..., None] * _TOWARDS, axis=-1)
    hw = offset.shape[:2]
    return residual.argmin(1).reshape(hw), t.reshape(*hw, -1), residual.reshape(*hw, -1)


def _components(mask: np.ndarray, reach: int = _REACH) -> list[np.ndarray]:
    """Groups of mask pixels, each pixel within ``reach`` (Chebyshev) of another in its group, as
    arrays of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    steps = [(dr, dc) for dr in range(-reach, reach + 1) for dc in range(-reach, reach + 1) if dr or dc]
    out = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        stack, pts = [(int(r0), int(c0))], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pts.append((r, c))
            for dr, dc in steps:
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pts))
    return out


def _strokes(ink: np.ndarray, labels: np.ndarray, strength: np.ndarray, min_area: float) -> list[np.ndarray]:
    """The ink's groups, a group split by colour where a second colour holds a real share of its
    votes and each colour's pixels lie together (two strokes of two colours touching, as a generated image
    may draw them), not where they are strewn about (one stroke's hue, blurred and noisy, read as its
    neighbour's on scattered pixels)."""
    out = []
    for pts in _components(ink):
        if len(pts) < min_area:
            continue
        lab = labels[pts[:, 0], pts[:, 1]]
        votes = np.bincount(lab, weights=strength[pts[:, 0], pts[:, 1]], minlength=len(COLOURS))
        parts = []
        if votes[(second := np.argsort(votes)[-2])] >= 0.15 * votes.sum():
            for k in (int(votes.argmax()), int(second)):
                part = np.zeros_like(ink)
                part[pts[lab == k, 0], pts[lab == k, 1]] = True
                pieces = _components(part, reach=1)
                if max(len(p) for p in pieces) < max(min_area, 0.8 * part.sum()):
                    parts = []  # strewn: one stroke
                    break
                parts += [p for p in pieces if len(p) >= min_area]
        out += parts or [pts]
    return out


@functools.lru_cache(maxsize=4096)
def _template(form: str, wt: int, h: int, w: int, pad: int) -> np.ndarray:
    """:func:`_coverage` softened as :func:`_form_of` compares it."""
    out = _soften(np.array(_coverage(form, wt, h, w, pad)))
    out.flags.writeable = False
    return out


def _soften(a: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur: templates and images compared at the same softness."""
    p = np.pad(a, 1, mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def _form_of(pts: np.ndarray, coverage: np.ndarray) -> tuple[str, str]:
    """(form, weight): the template, filling the stroke's bounding box, nearest (L1, both softened) its
    coverage map, over every form at both weights."""
    r0, c0 = pts.min(0)
    r1, c1 = pts.max(0)
    h, w, pad = int(r1 - r0 + 1), int(c1 - c0 + 1), _PAD
    window = np.zeros((h + 2 * pad, w + 2 * pad), dtype=np.float32)
    rows, cols = np.arange(r0 - pad, r1 + pad + 1), np.arange(c0 - pad, c1 + pad + 1)
    ok_r, ok_c = (rows >= 0) & (rows < coverage.shape[0]), (cols >= 0) & (cols < coverage.shape[1])
    window[np.ix_(ok_r, ok_c)] = coverage[np.ix_(rows[ok_r], cols[ok_c])]
    seen = _soften(window)
    canvas = coverage.shape[0]
    options = [(f, s) for f in FORMS for s in SIZES]
    return min(
        options, key=lambda fs: float(np.abs(_template(fs[0], weight_px(fs[1], canvas), h, w, pad) - seen).sum())
    )


def _near(pts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The pixels of ``pts`` and their 8 neighbours, as a mask: a stroke's faint edge pixels too."""
    m = np.zeros(shape[:2], dtype=bool)
    for dr, dc in itertools.product((-1, 0, 1), repeat=2):
        r, c = pts[:, 0] + dr, pts[:, 1] + dc
        ok = (r >= 0) & (r < m.shape[0]) & (c >= 0) & (c < m.shape[1])
        m[r[ok], c[ok]] = True
    return m


def read_scene(image: Image.Image | np.ndarray, min_area: float | None = None) -> list[Found]:
    """The strokes in an image (RGB, (H, W, 3) array or PIL, at most :data:`MAX_SIDE` a side), largest
    first. ``min_area`` (pixels; default 6 at 32 x 32, scaled) drops specks, such as a generated
    image's stray pixels."""
    a = _as_rgb(image)
    canvas = a.shape[0]
    min_area = min_area if min_area is not None else 6 * (canvas / 32) ** 2
    offset = a - np.median(a.reshape(-1, 3), axis=0)  # the paper, wherever most pixels are
    strength = np.linalg.norm(offset, axis=-1)
    labels, amount, residual = _colour_fit(offset)
    found = []
    for pts in _strokes(strength > _FG_DISTANCE, labels, strength, min_area):
        rr, cc = pts[:, 0], pts[:, 1]
        w = strength[rr, cc]
        k = int(np.bincount(labels[rr, cc], weights=w, minlength=len(COLOURS)).argmax())
        grey = float((w * residual[rr, cc, k]).sum()) > _GREY_RATIO * float((w * w).sum())
        coverage = np.where(_near(pts, a.shape), amount[..., k], 0.0)
        form, weight = _form_of(pts, coverage)
        t = amount[rr, cc, k] + 1e-6  # the centroid of the ink, not of the pixels past the threshold
        cx, cy = float((t * (cc + 0.5)).sum() / t.sum()), float((t * (rr + 0.5)).sum() / t.sum())
        found.append(Found(form, GREY if grey else list(COLOURS)[k], weight, cx, cy, len(pts)))
    return sorted(found, key=lambda f: -f.area)


# ----------------------------------------------------------------------------------------------
# The data set


def render_record(rec: Record, image_size: int = 32) -> Sample:
    scene = Scene.from_json(json.loads(rec.source))
    im = render(scene, image_size, seed=stable_seed("strokes", rec.key, image_size))
    image, ext = encode_image(im, "png")
    meta = {"key": rec.key, "caption": rec.caption, "scene": scene.to_json(), "width": image_size}
    return Sample(rec.key, image, ext, rec.caption, meta)


def scene_records(
    n: int, held_out: bool, seed: int, prefix: str, draw: Any = random_scene, salt: str = "strokes"
) -> list[Record]:
    return shapes_scene_records(n, held_out, seed, prefix, draw=draw, salt=salt)


def build_strokes_dataset(
    output: str | Path,
    *,
    n_train: int = 8000,
    n_heldout: int = 400,
    n_unlabelled: int = 0,
    image_size: int = 32,
    shard_size: int = 500,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``output/{train,val}`` (scenes of seen pairs only; ``n_train`` of them before the val split),
    ``output/heldout`` (scenes with a held-out pair) and, with ``n_unlabelled``, ``output/unlabelled``
    (scenes of every pair without captions); returns the summary of all (also summary.json in each
    folder)."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for a thin stroke's form to be told apart, got {image_size}")
    if image_size > MAX_SIDE:
        raise ValueError(f"image_size must be <= {MAX_SIDE} (what read_scene reads), got {image_size}")
    options = {"image_size": image_size, "shard_size": shard_size, "seed": seed, "held_out": HELD_OUT}
    return write_scene_splits(
        Path(output),
        scene_records(n_train, False, seed, "s"),
        scene_records(n_heldout, True, seed, "h"),
        partial(render_record, image_size=image_size),
        unlabelled=scene_records(n_unlabelled, False, seed, "u", draw=any_scene, salt="strokes-unlabelled"),
        held_out=HELD_OUT,
        options=options,
        shard_size=shard_size,
        val_fraction=val_fraction,
        workers=workers,
        overwrite=overwrite,
        desc="strokes",
    )
