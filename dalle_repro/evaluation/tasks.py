"""What a set of samples got right, by task, with the uncertainty of the count.

GenEval (Ghosh et al. 2023) scores text-to-image models by task: one object, two objects, counting,
colours, position and colour attribution, each image right only when every constraint of its prompt
holds. The shapes grammar has the same tasks, read off pixels by :func:`dalle_repro.data.shapes.read_scene`
(and so has the strokes grammar, data/strokes.py, whose attributes carry the same names; ``world``
picks the reader, data/worlds.py):

- ``one_object`` / ``two_objects``: captions of one / two objects, every attribute right (count, shape,
  colour, size, place): GenEval's all-constraints scoring;
- ``counting``: the number of objects right (one or two: a narrower task than GenEval's 2-4);
- ``colour``: every object's colour right;
- ``position``: a lone object's position, or the relation of a pair, right;
- ``colour_shape_binding``: every object has both its colour and its shape, matched to the same
  caption slot: the zero-shot claim, and the attribute CLIP-style rerankers are known not to bind
  across objects (Lewis et al. 2024);
- ``overall``: the mean of the task scores, as GenEval reports it.

And one failure, not a task (lower is better, left out of ``overall``): ``shapes_swapped``, of the
captions of two objects of two shapes and two colours, the share drawn with each colour on the other
object's shape: what a prior that reads a caption as a bag of words draws when each
colour goes with the other shape in training.

Every share comes with its Wilson 95% interval: with 96 captions a share near 50% is known to about
+-10 points, with 24 to about +-19, so a difference between two runs means little unless the
intervals say so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from dalle_repro.core.images import to_uint8
from dalle_repro.data.shapes import ATTRIBUTES, Scene
from dalle_repro.data.worlds import world_of

TASKS = ("one_object", "two_objects", "counting", "colour", "position", "colour_shape_binding")
FAILURES = ("shapes_swapped",)
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share ``k / n`` (better than the normal one near 0 and 1 and for
    small n; (0, 1) when n = 0)."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends where rounding misses them


def task_hits(scene: Scene, right: dict[str, bool]) -> dict[str, bool | None]:
    """Each task's verdict for one image of ``scene``, given :func:`shapes.score`'s attribute verdicts;
    None where the task does not apply (``two_objects`` for a lone object)."""
    one = len(scene.objects) == 1
    return {
        "one_object": right["all"] if one else None,
        "two_objects": None if one else right["all"],
        "counting": right["count"],
        "colour": right["colour"],
        "position": right["place"],
        "colour_shape_binding": right["colour"] and right["shape"],
        "shapes_swapped": None if scene.shapes_swapped() is None else bool(right.get("swapped")),
    }


def read_back(
    images: torch.Tensor, captions: Sequence[str], world: str | ModuleType = "shapes"
) -> list[dict[str, bool | None]]:
    """Per image (N, 3, S, S) of its caption: every attribute's verdict, ``all``, and the tasks'; the
    captions of ``world``'s grammar (a name in data/worlds.py), read by its reader."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    w = world_of(world)
    out = []
    for im, caption in zip(images, captions, strict=True):
        a = to_uint8(im)
        scene = w.parse_caption(caption)
        right = w.score(scene, w.read_scene(a.permute(1, 2, 0).numpy()), a.shape[-1])
        out.append(dict(right) | task_hits(scene, right))
    return out


def share(verdicts: Sequence[bool | None]) -> dict[str, Any]:
    """``rate``, ``k`` of ``n`` (verdicts that apply) and the Wilson interval ``ci``."""
    kept = [v for v in verdicts if v is not None]
    n, k = len(kept), sum(bool(v) for v in kept)
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci": [lo, hi]}


def summarize(hits: Sequence[dict[str, bool | None]]) -> dict[str, Any]:
    """Attributes and tasks over a list of :func:`read_back` verdicts: each a :func:`share`; and
    ``overall``, the mean of the task rates that apply (GenEval's overall score)."""
    out: dict[str, Any] = {key: share([h[key] for h in hits]) for key in (*ATTRIBUTES, "all", *TASKS, *FAILURES)}
    rates = [out[t]["rate"] for t in TASKS if out[t]["n"]]
    out["overall"] = sum(rates) / len(rates) if rates else float("nan")
    return out


def rates(summary: dict[str, Any]) -> dict[str, float]:
    """The attribute shares of a :func:`summarize` as plain numbers, ``n`` the image count (the shape
    :func:`dalle_repro.evaluation.evaluate.attribute_accuracy` returns)."""
    return {k: summary[k]["rate"] for k in (*ATTRIBUTES, "all")} | {"n": summary["all"]["n"]}


def gain(picked: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Per task and ``all``: what a pick adds over another in points of share (reranked - random)."""
    return {k: picked[k]["rate"] - baseline[k]["rate"] for k in ("all", *TASKS) if picked[k]["n"]}


def fmt(s: dict[str, Any]) -> str:
    """``62.5% [52.5, 71.5]``: a share with its 95% interval, for reports."""
    if not s["n"]:
        return "n/a"
    lo, hi = s["ci"]
    return f"{s['rate']:.1%} [{lo * 100:.1f}, {hi * 100:.1f}]"
