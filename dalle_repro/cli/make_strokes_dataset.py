"""Render the strokes data set (the second world, never used for tuning): scenes of one or two thin or
thick coloured strokes on textured paper, with captions such as "a thin orange ring on the left" or
"a thick blue cross above a thin green line". One colour-form pair per form
(dalle_repro.data.strokes.HELD_OUT) never appears in training; scenes that use them go to
OUTPUT/heldout, for zero-shot evaluation.

Writes OUTPUT/train/*.tar, OUTPUT/val/*.tar, OUTPUT/heldout/*.tar, each split's summary.json, and
the scene of every sample in its KEY.json; with --unlabelled N, also OUTPUT/unlabelled/*.tar (N
scenes over every pair without captions, for a dVAE alone). Made on the spot (no download, no
font); rerunning a finished job is a no-op, rerunning a killed one continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dalle_repro.data.strokes import HELD_OUT, build_strokes_dataset


def main(argv: list[str] | None = None) -> int:
    held = ", ".join(f"{c} {f}" for c, f in HELD_OUT)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"Held out: {held}."
    )
    p.add_argument("--output", required=True, help="folder for train/, val/, heldout/, unlabelled/ and summary.json")
    p.add_argument("--train", type=int, default=8000, help="scenes of seen pairs, before the val split (default 8000)")
    p.add_argument("--heldout", type=int, default=400, help="scenes with a held-out pair (default 400)")
    p.add_argument(
        "--unlabelled",
        type=int,
        default=0,
        help="scenes over every pair, held-out ones included, without captions, in OUTPUT/unlabelled: "
        "images for the dVAE alone (default 0: none)",
    )
    p.add_argument("--image-size", type=int, default=32, help="square image side in pixels, 32-512 (default 32)")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of seen scenes for val (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and their jitter (default 0)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier run")
    a = p.parse_args(argv)
    if a.train <= 0 or a.heldout <= 0 or a.shard_size <= 0 or a.workers <= 0:
        p.error("--train, --heldout, --shard-size and --workers must be > 0")
    if a.unlabelled < 0:
        p.error(f"--unlabelled must be >= 0, got {a.unlabelled}")
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {a.val_fraction}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = build_strokes_dataset(
            a.output,
            n_train=a.train,
            n_heldout=a.heldout,
            n_unlabelled=a.unlabelled,
            image_size=a.image_size,
            shard_size=a.shard_size,
            val_fraction=a.val_fraction,
            seed=a.seed,
            workers=a.workers,
            overwrite=a.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("written", "splits", "heldout", "unlabelled") if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
