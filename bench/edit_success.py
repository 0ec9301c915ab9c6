"""Region edits on the demo's scenes: recolour one object, keep the rest; how often it works.

For each of ``scenes`` two-object scenes of the shapes set (seen colour-shape pairs only, so that the
edit, not zero-shot composition, is measured), one object is given a new colour whose pair with its
shape is also seen. The scene is rendered, a box drawn around that object (its bounding box plus
``margin`` pixels), and launch/sample.py's region edit (``sample.generate`` with a box) redraws the
box for the new caption: ``candidates`` drawn, ``keep`` kept (fit first, then CLIP with the input
image's similarity, as the sampling tool does). Every kept image is read back with the shapes reader:

- ``edit_right``: every attribute of the new caption right (both objects' shape, colour and size,
  their relation): the edited object reads back with the new colour and the other one unchanged;
- ``recoloured``: the edited object alone right with its new colour (shape and size kept);
- ``rest_kept``: the other object alone right as it was.

Beside them, the ceilings: the reader on the edited scene rendered (``reader``), and on the dVAE's
reconstruction of that render (``dvae``). Each share with its 95% (Wilson) interval; the mean
absolute pixel change outside the box against the dVAE's reconstruction of the input. Writes
OUT/edits.json and OUT/edits.png (the first scenes: input with box, then the kept results).

Usage: python bench/edit_success.py --model outputs/demo/prior/export --clip outputs/demo/clip --out OUT
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_repro.cli.sample import edit_sheet  # noqa: E402
from dalle_repro.core.cli import flag_aliases, parse_cli  # noqa: E402
from dalle_repro.core.config import arg  # noqa: E402
from dalle_repro.core.images import grid, save_png, to_pil  # noqa: E402
from dalle_repro.data import shapes  # noqa: E402
from dalle_repro.evaluation.tasks import share  # noqa: E402
from dalle_repro.sample.export import load_prior  # noqa: E402
from dalle_repro.sample.generate import Box, SampleSettings, generate  # noqa: E402
from dalle_repro.sample.rerank import Reranker  # noqa: E402


@dataclass
class EditArgs:
    """The edit benchmark's settings."""

    model: str = arg(doc="The demo's prior export (outputs/demo/prior/export).")
    out: str = arg(doc="Folder for edits.json and edits.png.")
    clip: str | None = arg(None, "CLIP run or model folder to rerank with (outputs/demo/clip); null: fit only.")
    scenes: int = arg(96, "Edited scenes.", gt=0)
    candidates: int = arg(8, "Candidates per edit.", gt=0)
    keep: int = arg(2, "Kept results per edit (each is read back).", gt=0)
    temperature: float = arg(0.7, "Sampling temperature (the demo's evaluation's).", ge=0)
    guidance: float = arg(2.0, "Classifier-free guidance (the demo's evaluation's).", ge=0)
    margin: int = arg(1, "Pixels added around the object's bounding box.", ge=0)
    seed: int = arg(0, "Seed of the scenes, the new colours and the samples.", ge=0)
    pictures: int = arg(8, "Scenes shown in edits.png.", ge=0)


def edits(n: int, seed: int) -> list[tuple[shapes.Scene, shapes.Scene, int, int]]:
    """(scene, edited scene, index of the edited object, render seed) for ``n`` two-object scenes."""
    rng = np.random.default_rng([seed, 7])
    held = set(shapes.HELD_OUT)
    out = []
    while len(out) < n:
        scene = shapes.random_scene(rng, held_out=False, two=1.0)
        k = int(rng.integers(2))
        obj = scene.objects[k]
        colours = [c for c in shapes.COLOURS if c != obj.colour and (c, obj.shape) not in held]
        colours = [c for c in colours if c != scene.objects[1 - k].colour]  # the two stay distinguishable
        new = dataclasses.replace(obj, colour=colours[int(rng.integers(len(colours)))])
        objects = tuple(new if i == k else o for i, o in enumerate(scene.objects))
        out.append((scene, dataclasses.replace(scene, objects=objects), k, int(rng.integers(2**31))))
    return out


def right(found: list[shapes.Found], scene: shapes.Scene, size: int) -> bool:
    return shapes.score(scene, found, size)["all"]


def one_object_right(found: list[shapes.Found], scene: shapes.Scene, k: int, size: int) -> bool:
    """Object ``k`` of ``scene`` is among the found ones with its shape, colour and size."""
    o = scene.objects[k]
    return any(f.shape == o.shape and f.colour == o.colour and f.size == o.size for f in found)


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(EditArgs, argv, __doc__ or "", aliases=flag_aliases(EditArgs))
    if a is None:
        return 0
    torch.manual_seed(a.seed)
    prior = load_prior(a.model)
    if prior.dvae is None:
        print(f"error: {a.model} has no dVAE", file=sys.stderr)
        return 2
    pick = prior.use_trained_precision()
    reranker = Reranker(a.clip) if a.clip else None
    size = prior.dvae.args.image_size
    settings = SampleSettings(
        candidates=a.candidates, keep=a.keep, temperature=a.temperature, guidance=a.guidance, seed=a.seed
    )
    hits: dict[str, list[bool]] = {"edit_right": [], "recoloured": [], "rest_kept": [], "reader": [], "dvae": []}
    outside_change, sheets = [], []
    t0 = time.perf_counter()
    for i, (scene, target, k, rseed) in enumerate(edits(a.scenes, a.seed)):
        x, y, side = shapes.layout(scene, size, np.random.default_rng(rseed))[k]
        box = Box(
            max(0, x - a.margin), max(0, y - a.margin), min(size, x + side + a.margin), min(size, y + side + a.margin)
        )
        image = torch.from_numpy(np.asarray(shapes.render(scene, size, seed=rseed))).permute(2, 0, 1).float() / 255
        want = np.asarray(shapes.render(target, size, seed=rseed))
        hits["reader"].append(right(shapes.read_scene(want), target, size))
        with torch.no_grad():
            recon_target = prior.dvae.decode(prior.dvae.encode(torch.from_numpy(want).permute(2, 0, 1)[None] / 255))
            recon_input = prior.dvae.decode(prior.dvae.encode(image[None]))[0]
        hits["dvae"].append(right(shapes.read_scene(to_pil(recon_target[0])), target, size))
        result = generate(
            prior.model, prior.dvae, [target.caption()], prior.tokenizer, settings, reranker, image, False, box
        )[0]
        outside = torch.ones(size, size, dtype=torch.bool)
        outside[box.y0 : box.y1, box.x0 : box.x1] = False
        for im in result.images:
            found = shapes.read_scene(to_pil(im))
            hits["edit_right"].append(right(found, target, size))
            hits["recoloured"].append(one_object_right(found, target, k, size))
            hits["rest_kept"].append(one_object_right(found, target, 1 - k, size))
            outside_change.append(float((im - recon_input).abs().mean(0)[outside].mean()) * 255)
        if i < a.pictures:
            sheets.append((image, box, result))
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": a.model,
        "clip": a.clip,
        "precision": pick.reason,
        "settings": dataclasses.asdict(settings),
        "scenes": a.scenes,
        "kept_images": len(hits["edit_right"]),
        "seconds": round(seconds, 1),
        "outside_box_mean_abs_change_levels": round(float(np.mean(outside_change)), 2),
    } | {k: share(v) for k, v in hits.items()}
    (out / "edits.json").write_text(json.dumps(report, indent=1) + "\n")
    if sheets:  # the sampling tool's own edit sheet per scene (input with its box, then the kept results)
        g = prior.model.args.grid
        save_png(grid([edit_sheet(im, r, box, 0, g) for im, box, r in sheets], ncol=1), out / "edits.png")
    for key in hits:
        s = report[key]
        print(f"{key:11s} {100 * s['rate']:5.1f}% [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]  (n={s['n']})")
    print(f"outside the box: mean |change| {report['outside_box_mean_abs_change_levels']} levels; {seconds:.0f} s")
    print(f"wrote {out / 'edits.json'} and {out / 'edits.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
