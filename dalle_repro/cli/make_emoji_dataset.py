"""Render every emoji of Debian's Noto Color Emoji font into captioned shards (the demo data set).

Captions are the emoji's English names ("red apple", "woman astronaut: medium skin tone") from
Debian's unicode-data. Needs the Debian packages fonts-noto-color-emoji and unicode-data; no network.
Writes OUTPUT/train/*.tar, OUTPUT/val/*.tar and OUTPUT/summary.json. Rerunning a finished job is a
no-op; rerunning a killed one continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dalle_repro.data.emoji import EMOJI_TEST_PATH, FONT_PATH, build_emoji_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for train/, val/ and summary.json")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction held out by key (default 0.05)")
    p.add_argument("--limit", type=int, default=None, help="render only N emoji spread over all groups (tests)")
    p.add_argument(
        "--no-skin-tones",
        action="store_true",
        help="leave out the skin-tone variants (1785 of the 3655 emoji: the same picture recoloured)",
    )
    p.add_argument(
        "--groups",
        default=None,
        help="comma-separated Unicode emoji groups to keep, e.g. 'Smileys & Emotion,Food & Drink' (default: all)",
    )
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument("--font", default=FONT_PATH, help=f"the emoji font (default {FONT_PATH})")
    p.add_argument("--names", default=EMOJI_TEST_PATH, help=f"Unicode's emoji-test.txt (default {EMOJI_TEST_PATH})")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier run")
    a = p.parse_args(argv)
    if a.image_size < 8 or a.shard_size <= 0 or a.workers <= 0 or (a.limit is not None and a.limit <= 0):
        p.error("--image-size must be >= 8; --shard-size, --workers and --limit must be > 0")
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {a.val_fraction}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = build_emoji_dataset(
            a.output,
            image_size=a.image_size,
            shard_size=a.shard_size,
            val_fraction=a.val_fraction,
            limit=a.limit,
            skin_tones=not a.no_skin_tones,
            groups=[g.strip() for g in a.groups.split(",") if g.strip()] if a.groups else None,
            workers=a.workers,
            font_path=a.font,
            names_path=a.names,
            overwrite=a.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("written", "skipped", "splits")}))
    print(f"emoji shards in {a.output}/train and {a.output}/val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
