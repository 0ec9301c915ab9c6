"""Render the compositional data set (the demo's default): scenes of one or two coloured shapes with
captions such as "a small red circle on the left" or "a big blue triangle left of a small yellow
square". Some colour-shape pairs (dalle_repro.data.shapes.HELD_OUT) never appear in training; scenes
that use them go to OUTPUT/heldout, for zero-shot evaluation.

Writes OUTPUT/train/*.tar, OUTPUT/val/*.tar, OUTPUT/heldout/*.tar, each split's summary.json, and
the scene of every sample in its KEY.json. With --unlabelled N, also OUTPUT/unlabelled/*.tar: N
scenes over every pair, held-out ones included, without captions, for a dVAE to train on (an image
tokenizer reads no text; the prior and CLIP train on OUTPUT/train alone). Made on the spot (no
download, no font); rerunning a finished job is a no-op, rerunning a killed one continues it.
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.data.shapes import HELD_OUT, ShapesArgs, build_shapes_from


def main(argv: list[str] | None = None) -> int:
    held = ", ".join(f"{c} {s}" for c, s in HELD_OUT)
    doc = (__doc__ or "") + f"\nHeld out: {held}.\n\n--overwrite: replace shards of a different earlier run.\n"
    a, flags = parse_cli(ShapesArgs, argv, doc, flags=("--overwrite",), aliases=flag_aliases(ShapesArgs))
    if a is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = build_shapes_from(a, overwrite=flags["overwrite"])
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("written", "splits", "heldout", "unlabelled") if k in summary}))
    folders = "train,val,heldout,unlabelled" if a.unlabelled else "train,val,heldout"
    print(f"wrote shapes shards in {a.output}/{{{folders}}}, with summary.json in {a.output} and {a.output}/heldout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
