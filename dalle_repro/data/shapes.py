"""The compositional demo data set: scenes of one or two coloured shapes, made on the spot.

A scene is one object at a position ("a small red circle on the left"), or two objects and the
relation between them ("a big blue triangle left of a small yellow square"). Attributes: shape
(circle, square, triangle), colour (five), size (small, big), the position of a lone object (left,
right, top, bottom) and the relation of a pair (left of, right of, above, below).

Zero-shot test: some colour-shape pairs (:data:`HELD_OUT`) never appear in training, in either slot
of any scene; ``heldout/`` holds scenes that use them. A model that composes "red" and "triangle",
each seen with other partners, draws a red triangle it never saw; one that memorises cannot.

:func:`read_scene` reads the attributes back from pixels, written against the renderer: pixels far
from the background are foreground, each takes the palette colour whose blend with the background
passes nearest it, 4-connected pixels of one colour form an object (so two touching objects of two
colours stay two, and a fringe of another colour around an object is dropped), its size is the
longer side of its bounding box, its shape the template (a circle, square or triangle filling that
box) nearest its coverage map, and positions come from centroids.
:func:`score` compares a reading with a scene attribute by attribute.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dalle_repro.core.config import arg
from dalle_repro.data.loader import stable_seed
from dalle_repro.data.writer import Record, Sample, encode_image, fingerprint, write_dataset

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 85, 220),
    "yellow": (240, 200, 30),
    "purple": (145, 55, 185),
}
SIZES = ("small", "big")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
RELATIONS = ("left of", "right of", "above", "below")
UNLABELLED = "unlabelled"  # the folder of scenes over every pair, without captions (ShapesArgs.unlabelled)
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"))  # one per shape: each still seen in 4 colours
BACKGROUND = (250, 250, 250)
ATTRIBUTES = ("count", "shape", "colour", "size", "place")  # place: a lone object's position or a pair's relation

# Sides in pixels at a 32-pixel canvas (scaled with the canvas): small 7-9, big 12-14. Two big ones side by
# side still leave two pixels between them.
_SIDE = {"small": (7, 9), "big": (12, 14)}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One object and a position, or two objects and the relation of the first to the second."""

    objects: tuple[Obj, ...]
    place: str

    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"{self.objects[0].words()} {self.place}"
        return f"{self.objects[0].words()} {self.place} {self.objects[1].words()}"

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}

    def shapes_swapped(self) -> Scene | None:
        """The scene with its two objects' shapes exchanged ("a red triangle left of a blue circle":
        a red circle left of a blue triangle), where it has two objects of two shapes and two colours;
        else None (nothing a drawing could swap)."""
        if len(self.objects) != 2:
            return None
        a, b = self.objects
        if a.shape == b.shape or a.colour == b.colour:
            return None
        return Scene((replace(a, shape=b.shape), replace(b, shape=a.shape)), self.place)

    def to_json(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects], "place": self.place}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Scene:
        return Scene(tuple(Obj(**o) for o in d["objects"]), d["place"])


_OBJ = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_ONE = re.compile(rf"^{_OBJ} ({'|'.join(POSITIONS)})$")
_TWO = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$")


def parse_caption(caption: str) -> Scene:
    """The scene a caption of this grammar describes; ValueError for anything else."""
    text = " ".join(caption.lower().split())
    if m := _ONE.match(text):
        return Scene((Obj(m[3], m[2], m[1]),), m[4])
    if m := _TWO.match(text):
        return Scene((Obj(m[3], m[2], m[1]), Obj(m[7], m[6], m[5])), m[4])
    raise ValueError(
        f"caption {caption!r} is not of the shapes grammar: 'a SIZE COLOUR SHAPE POSITION' or "
        "'a SIZE COLOUR SHAPE RELATION a SIZE COLOUR SHAPE'"
    )


def all_objects(held_out: bool | None = None) -> list[Obj]:
    """Every object; ``held_out`` True: only those of a held-out pair, False: only the others."""
    out = []
    for shape, colour, size in itertools.product(SHAPES, COLOURS, SIZES):
        o = Obj(shape, colour, size)
        if held_out is None or ((colour, shape) in HELD_OUT) == held_out:
            out.append(o)
    return out


def random_scene(rng: np.random.Generator, held_out: bool, two: float = 0.5) -> Scene:
    """A random scene: one of only seen pairs (``held_out`` False), or one with at least one held-out pair."""
    return scene_from(rng, held_out, all_objects(False), all_objects(True), two)


def any_scene(rng: np.random.Generator, held_out: object = None, two: float = 0.5) -> Scene:
    """A random scene over every object, held-out pairs included (``held_out`` is ignored): the
    unlabelled scenes a dVAE may train on (``unlabelled/``)."""
    return scene_from(rng, False, all_objects(), [], two)


def scene_from(rng: np.random.Generator, held_out: bool, seen: list[Obj], unseen: list[Obj], two: float = 0.5) -> Scene:
    """A random scene over the objects of a world: one or (with probability ``two``) two objects,
    from ``seen`` only, or with at least one from ``unseen`` (``held_out``) in a random slot."""
    if rng.random() >= two:
        pool = unseen if held_out else seen
        return Scene((pool[rng.integers(len(pool))],), POSITIONS[rng.integers(len(POSITIONS))])
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    if not held_out:
        a, b = (seen[i] for i in rng.integers(len(seen), size=2))
    else:  # one held-out object in a random slot, the other from anywhere
        every = seen + unseen
        a, b = unseen[rng.integers(len(unseen))], every[rng.integers(len(every))]
        if rng.random() < 0.5:
            a, b = b, a
    return Scene((a, b), relation)


# ----------------------------------------------------------------------------------------------
# Rendering


def _side(size: str, canvas: int, rng: np.random.Generator) -> int:
    lo, hi = _SIDE[size]
    return max(3, round(int(rng.integers(lo, hi + 1)) * canvas / 32))


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, w: int, h: int, ss: int, fill: Any) -> None:
    """``shape`` filling the box (x0, y0, w, h) of the final canvas, drawn at ``ss`` times the resolution;
    a triangle has its apex up and its base along the bottom of the box."""
    box = [x0 * ss, y0 * ss, (x0 + w) * ss - 1, (y0 + h) * ss - 1]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)


def _along(lo: int, hi: int, rng: np.random.Generator) -> int:
    return int(rng.integers(lo, max(lo, hi) + 1))


def layout(scene: Scene, canvas: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(x0, y0, side) of each object: a lone one in the named half, away from the middle line and near
    the other axis' middle; a pair in opposite halves, so the relation reads off their centroids."""
    s, half, cross = canvas, canvas // 2, max(1, round(0.1 * canvas))
    sides = [_side(o.size, s, rng) for o in scene.objects]
    boxes = []
    if len(scene.objects) == 1:
        side = sides[0]
        first_half = scene.place in ("on the left", "at the top")
        # along the axis: inside the named half, at least 2 pixels from the middle line
        lo, hi = 1, half - 2 - side
        a = _along(lo, hi, rng) if first_half else s - side - _along(lo, hi, rng)
        c = half - side // 2 + int(rng.integers(-cross, cross + 1))
        c = int(np.clip(c, 1, s - side - 1))
        x, y = (a, c) if scene.place in ("on the left", "on the right") else (c, a)
        return [(x, y, side)]
    horizontal = scene.place in ("left of", "right of")
    first_before = scene.place in ("left of", "above")
    for i, side in enumerate(sides):
        before = (i == 0) == first_before
        lo, hi = 1, half - 1 - side
        a = _along(lo, hi, rng) if before else s - side - _along(lo, hi, rng)
        c = int(np.clip(half - side // 2 + int(rng.integers(-cross, cross + 1)), 1, s - side - 1))
        boxes.append((a, c, side) if horizontal else (c, a, side))
    return boxes


def render(scene: Scene, canvas: int = 32, seed: int = 0, supersample: int = 4, noise: float = 4.0) -> Image.Image:
    """The scene on a light background, ``canvas`` pixels square, RGB. Objects sit on whole pixels
    (drawn at ``supersample`` x and averaged down), so a square's edges are sharp. ``noise``: the
    standard deviation of Gaussian pixel noise, in levels. Without it the flat background is so
    predictable that the dVAE's likelihood is won there: a demo dVAE on noiseless scenes used 3 to
    8 of its 512 codes and kept colours but not shapes (shape read right on 45% of reconstructions)."""
    rng = np.random.default_rng(seed)
    big = Image.new("RGB", (canvas * supersample, canvas * supersample), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for o, (x, y, side) in zip(scene.objects, layout(scene, canvas, rng), strict=True):
        _draw(draw, o.shape, x, y, side, side, supersample, _jitter(COLOURS[o.colour], rng))
    im = big.resize((canvas, canvas), Image.Resampling.BOX)
    if noise > 0:
        a = np.asarray(im, dtype=np.float32) + rng.normal(0, noise, (canvas, canvas, 3))
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return im


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class Found:
    """An object read off an image."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    area: int


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_FG_DISTANCE = 0.4 * float(np.linalg.norm(_PALETTE - np.array(BACKGROUND, dtype=np.float32), axis=1).min())


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        stack, pts = [(int(r0), int(c0))], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pts.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pts))
    return out


@functools.lru_cache(maxsize=1024)
def _template(shape: str, h: int, w: int, pad: int, ss: int = 4) -> np.ndarray:
    """The coverage (0-1) of ``shape`` filling an h x w box, in a window ``pad`` pixels wider each
    side, softened as :func:`_shape_of` compares it (cached: a reader meets the same boxes again)."""
    big = Image.new("L", ((w + 2 * pad) * ss, (h + 2 * pad) * ss), 0)
    _draw(ImageDraw.Draw(big), shape, pad, pad, w, h, ss, 255)
    cover = np.asarray(big.resize((w + 2 * pad, h + 2 * pad), Image.Resampling.BOX), dtype=np.float32) / 255
    out = _soften(cover)
    out.flags.writeable = False
    return out


def _soften(a: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur: templates and images compared at the same softness."""
    p = np.pad(a, 1, mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def _shape_of(pts: np.ndarray, coverage: np.ndarray) -> str:
    """The shape whose template, filling the object's bounding box, is nearest (L1, both softened) to
    the object's coverage map: robust to the rounded corners and soft edges of a decoder's output."""
    r0, c0 = pts.min(0)
    r1, c1 = pts.max(0)
    h, w, pad = int(r1 - r0 + 1), int(c1 - c0 + 1), 2
    window = np.zeros((h + 2 * pad, w + 2 * pad), dtype=np.float32)
    rows, cols = np.arange(r0 - pad, r1 + pad + 1), np.arange(c0 - pad, c1 + pad + 1)
    ok_r, ok_c = (rows >= 0) & (rows < coverage.shape[0]), (cols >= 0) & (cols < coverage.shape[1])
    window[np.ix_(ok_r, ok_c)] = coverage[np.ix_(rows[ok_r], cols[ok_c])]
    seen = _soften(window)
    return min(SHAPES, key=lambda s: float(np.abs(_template(s, h, w, pad) - seen).sum()))


MAX_SCENE_SIDE = 256  # read_scene reads larger images downscaled to this side


def _downscaled(image: Image.Image | np.ndarray) -> tuple[Image.Image | np.ndarray, float]:
    """``image`` with its longer side at most :data:`MAX_SCENE_SIDE` (box filter), and the factor its
    coordinates were divided by. The reader's flood fill is Python, linear in the pixels (1000 x
    1000: seconds), and the scenes are drawn far smaller than this."""
    h, w = (image.height, image.width) if isinstance(image, Image.Image) else np.shape(image)[:2]
    if max(h, w) <= MAX_SCENE_SIDE:
        return image, 1.0
    im = (
        image.convert("RGB")
        if isinstance(image, Image.Image)
        else Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    )
    f = max(h, w) / MAX_SCENE_SIDE
    return im.resize((max(1, round(w / f)), max(1, round(h / f))), Image.Resampling.BOX), h / round(h / f)


def read_scene(image: Image.Image | np.ndarray, min_area: float | None = None) -> list[Found]:
    """The objects in an image, largest first. ``min_area`` (pixels; default 12 at 32 x 32, scaled)
    drops specks, such as a generated image's stray pixels. An image over :data:`MAX_SCENE_SIDE` is
    read downscaled; positions and areas are given in the image's own pixels."""
    image, f = _downscaled(image)
    if f != 1.0:
        return [
            replace(o, cx=o.cx * f, cy=o.cy * f, area=round(o.area * f * f))
            for o in read_scene(image, min_area / (f * f) if min_area is not None else None)
        ]
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    canvas = a.shape[0]
    min_area = min_area if min_area is not None else 12 * (canvas / 32) ** 2
    bg = np.array(BACKGROUND, dtype=np.float32)
    foreground = np.linalg.norm(a - bg, axis=-1) > _FG_DISTANCE
    labels, amount = _colour_labels(a - bg)
    threshold = (_SIDE["small"][1] + _SIDE["big"][0]) / 2 * canvas / 32
    parts = [(k, pts) for k in range(len(COLOURS)) for pts in _components(foreground & (labels == k))]
    found, taken = [], np.zeros(foreground.shape, dtype=bool)
    for k, pts in sorted(parts, key=lambda p: -len(p[1])):
        if len(pts) < min_area:
            continue
        # a fringe of another colour around an object (a decoder's colour bleeding): most of its
        # pixels touch a larger object; a real neighbour touches along one edge at most
        near = taken.copy()
        near[1:] |= taken[:-1]
        near[:-1] |= taken[1:]
        near[:, 1:] |= taken[:, :-1]
        near[:, :-1] |= taken[:, 1:]
        if near[pts[:, 0], pts[:, 1]].mean() > 0.5:
            continue
        taken[pts[:, 0], pts[:, 1]] = True
        side = int(max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]))) + 1
        size = "big" if side > threshold else "small"
        cx, cy = float(pts[:, 1].mean() + 0.5), float(pts[:, 0].mean() + 0.5)
        coverage = np.where(labels == k, amount[..., k], 0.0)
        found.append(Found(_shape_of(pts, coverage), list(COLOURS)[k], size, cx, cy, len(pts)))
    return found


_TOWARDS = _PALETTE - np.array(BACKGROUND, dtype=np.float32)  # each colour as seen from the background


def _colour_labels(offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the palette colour whose blend with the background passes nearest: the distance to
    the segment from the background to the colour. A pixel half covered by blue is a blend of blue
    and background, which the nearest palette colour calls purple; the segment calls it blue."""
    x = offset.reshape(-1, 1, 3)
    t = np.clip((x * _TOWARDS).sum(-1) / (_TOWARDS**2).sum(-1), 0, 1)  # (P, colours): how much of each
    residual = np.linalg.norm(x - t[..., None] * _TOWARDS, axis=-1)
    return residual.argmin(1).reshape(offset.shape[:2]), t.reshape(*offset.shape[:2], -1)


def _position(f: Found, canvas: int) -> str:
    dx, dy = f.cx - canvas / 2, f.cy - canvas / 2
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _relation(a: Found, b: Found) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _agree(o: Obj, f: Found) -> dict[str, bool]:
    return {"shape": o.shape == f.shape, "colour": o.colour == f.colour, "size": o.size == f.size}


def score(scene: Scene, found: Sequence[Found], canvas: int) -> dict[str, bool]:
    """Each attribute of :data:`ATTRIBUTES` right or wrong, and ``all``. With two objects the found
    ones are matched to the caption's slots the way that agrees best; ``shape``/``colour``/``size``
    are right when right for every object; an object not found makes its attributes wrong. With two
    objects, ``swapped`` says whether the caption's two colours were drawn each on the other object's
    shape ("a red triangle left of a blue circle" drawn as a red circle and a blue triangle, anywhere):
    the failure to bind a shape to its colour (False where the two share a shape or a colour)."""
    n = len(scene.objects)
    out = {"count": len(found) == n}
    if n == 1:
        if found:
            out |= _agree(scene.objects[0], found[0]) | {"place": _position(found[0], canvas) == scene.place}
        else:
            out |= {"shape": False, "colour": False, "size": False, "place": False}
    elif len(found) < 2:
        out |= {"shape": False, "colour": False, "size": False, "place": False, "swapped": False}
    else:
        pair = found[:2]
        orders = [(pair[0], pair[1]), (pair[1], pair[0])]
        # the order that agrees best; on a tie (two alike objects) the one the relation holds for, since
        # "a red circle left of a red circle" is true of any two red circles side by side
        best = max(
            orders,
            key=lambda fs: (
                sum(sum(_agree(o, f).values()) for o, f in zip(scene.objects, fs, strict=True)),
                _relation(fs[0], fs[1]) == scene.place,
            ),
        )
        agree = [_agree(o, f) for o, f in zip(scene.objects, best, strict=True)]
        out |= {k: all(a[k] for a in agree) for k in ("shape", "colour", "size")}
        out["place"] = _relation(best[0], best[1]) == scene.place
        # the binding failure: each colour drawn, each on the other object's shape
        swap = scene.shapes_swapped()
        out["swapped"] = swap is not None and any(
            all((f.colour, f.shape) == (o.colour, o.shape) for o, f in zip(swap.objects, fs, strict=True))
            for fs in orders
        )
    out["all"] = all(out[k] for k in ATTRIBUTES)
    return out


def similarity(a: Scene, b: Scene) -> int:
    """How many attributes two scenes share: the place, plus shape, colour and size of each object
    slot (slots matched the way that shares most); scenes of different object counts share none."""
    if len(a.objects) != len(b.objects):
        return 0

    def same(x: Obj, y: Obj) -> int:
        return (x.shape == y.shape) + (x.colour == y.colour) + (x.size == y.size)

    orders = [b.objects] if len(b.objects) == 1 else [b.objects, b.objects[::-1]]
    return (a.place == b.place) + max(sum(same(x, y) for x, y in zip(a.objects, o, strict=True)) for o in orders)


# ----------------------------------------------------------------------------------------------
# The data set


def render_record(rec: Record, image_size: int = 32) -> Sample:
    scene = Scene.from_json(json.loads(rec.source))
    im = render(scene, image_size, seed=stable_seed(rec.key, image_size))
    image, ext = encode_image(im, "png")
    meta = {"key": rec.key, "caption": rec.caption, "scene": scene.to_json(), "width": image_size}
    return Sample(rec.key, image, ext, rec.caption, meta)


def scene_records(
    n: int, held_out: bool, seed: int, prefix: str, draw: Any = random_scene, salt: str = "scenes"
) -> list[Record]:
    """``n`` records of scenes ``draw`` makes (a world's ``random_scene``), from a generator seeded by
    ``(salt, seed, held_out)``; each holds its scene as JSON and its caption."""
    rng = np.random.default_rng(stable_seed(salt, seed, held_out))
    out = []
    for i in range(n):
        scene = draw(rng, held_out)
        out.append(Record(f"{prefix}{i:06d}", json.dumps(scene.to_json()), scene.caption(), {}))
    return out


@dataclass
class ShapesArgs:
    """The compositional data set: scenes of one or two coloured shapes, some colour-shape pairs held
    out of training (tools/make_shapes_dataset.py, and the demo's ``shapes`` section)."""

    output: str = arg("data/shapes", "Folder for train/, val/, heldout/ and summary.json.")
    train: int = arg(8000, "Scenes of seen pairs, before the validation split.", gt=0)
    heldout: int = arg(400, "Scenes with a held-out colour-shape pair (heldout/, never trained on).", gt=0)
    unlabelled: int = arg(
        0,
        "Scenes over every colour-shape pair, held-out ones included, written without captions (unlabelled/): "
        "images for an image tokenizer (the dVAE), which reads no text. The prior, CLIP and the BPE tokenizer "
        "never read them. 0: none.",
        ge=0,
    )
    image_size: int = arg(32, "Side of the rendered scenes, in pixels.", ge=16)
    shard_size: int = arg(500, "Samples per shard.", gt=0)
    val_fraction: float = arg(0.05, "Fraction of the seen scenes kept for validation, by key.", gt=0, lt=1)
    seed: int = arg(0, "Seed of the scenes and their jitter.", ge=0)
    workers: int = arg(1, "Rendering processes.", gt=0)


def build_shapes_from(args: ShapesArgs, overwrite: bool = False) -> dict[str, Any]:
    """:func:`build_shapes_dataset` with the settings of ``args``."""
    return build_shapes_dataset(
        args.output,
        n_train=args.train,
        n_heldout=args.heldout,
        n_unlabelled=args.unlabelled,
        image_size=args.image_size,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        overwrite=overwrite,
    )


def build_shapes_dataset(
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
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the shapes to be told apart, got {image_size}")
    options = {"image_size": image_size, "shard_size": shard_size, "seed": seed, "held_out": HELD_OUT}
    return write_scene_splits(
        Path(output),
        scene_records(n_train, False, seed, "s"),
        scene_records(n_heldout, True, seed, "h"),
        partial(render_record, image_size=image_size),
        unlabelled=scene_records(n_unlabelled, False, seed, "u", draw=any_scene, salt="unlabelled"),
        held_out=HELD_OUT,
        options=options,
        shard_size=shard_size,
        val_fraction=val_fraction,
        workers=workers,
        overwrite=overwrite,
        desc="shapes",
    )


def write_scene_splits(
    out: Path,
    seen: list[Record],
    unseen: list[Record],
    render_one: Any,
    *,
    unlabelled: Sequence[Record] = (),
    held_out: Any,
    options: dict[str, Any],
    shard_size: int,
    val_fraction: float,
    workers: int,
    overwrite: bool,
    desc: str,
) -> dict[str, Any]:
    """A compositional set's splits: ``out/{train,val}`` from the ``seen`` records, ``out/heldout``
    from the ``unseen`` ones, each rendered by ``render_one``, and ``out/unlabelled`` from the
    ``unlabelled`` ones where there are any, rendered without their captions; the summary of all."""
    common = dict(workers=workers, skipped=Counter(), overwrite=overwrite, desc=desc)
    seen_options = options | {"split": "seen", "val_fraction": val_fraction}
    summary = write_dataset(
        seen,
        render_one,
        out,
        shard_size=shard_size,
        val_fraction=val_fraction,
        fp=fingerprint(seen, seen_options),  # the records hold every scene, so their count too
        options=seen_options,
        **common,
    )
    held_options = options | {"split": "heldout"}
    held = write_dataset(
        unseen,
        render_one,
        out / "heldout",
        shard_size=shard_size,
        fp=fingerprint(unseen, held_options),
        options=held_options,
        **common,
    )
    summary |= {"heldout": {"written": held["written"], "pairs": [list(p) for p in held_out]}}
    if unlabelled:
        pool_options = options | {"split": "unlabelled"}
        pool = write_dataset(
            unlabelled,
            partial(without_caption, render_one=render_one),
            out / UNLABELLED,
            shard_size=shard_size,
            fp=fingerprint(unlabelled, pool_options),
            options=pool_options,
            **common,
        )
        summary["unlabelled"] = {"written": pool["written"]}
    else:
        drop_stale_pool(out / UNLABELLED)
    return summary


def drop_stale_pool(folder: Path) -> None:
    """Remove ``folder`` where it is an unlabelled pool an earlier run wrote (its summary's options say
    so) and this one asks for none: a later ``DATA/*/*.tar`` would otherwise read images of held-out
    pairs. Anything else there is left alone."""
    summary = folder / "summary.json"
    if (
        summary.is_file()
        and json.loads(summary.read_text(encoding="utf-8")).get("options", {}).get("split") == UNLABELLED
    ):
        shutil.rmtree(folder)


def without_caption(rec: Record, render_one: Any) -> Sample:
    """``rec`` rendered by ``render_one``, its caption and scene left out (an empty .txt, the key and
    width in its .json): an unlabelled image, which no text-reading stage can learn a pair from."""
    s = render_one(rec)
    return Sample(s.key, s.image, s.ext, "", {"key": s.key, "width": s.meta.get("width")})
