"""Write a folder of captioned pattern images (KEY.png + KEY.txt), shaped as your own data would be.

For trying the README's "Your own data" steps without data at hand: stripes, checkerboards, rings,
dots and gradients in eight colours, captioned ("thin vertical stripes of red and white"), plus four
broken files on purpose (a truncated PNG, a text file named .png, an image without a caption, a
caption without an image) that tools/make_shards.py skips and names in its skipped.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys

from dalle_repro.data.patterns import write_pattern_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the images and captions into")
    p.add_argument("--count", type=int, default=3000, help="images (default 3000)")
    p.add_argument("--image-size", type=int, default=64, help="square side in pixels, >= 8 (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patterns and colours (default 0)")
    p.add_argument("--no-broken", action="store_true", help="leave out the four broken files")
    a = p.parse_args(argv)
    try:
        summary = write_pattern_folder(a.output, a.count, size=a.image_size, seed=a.seed, broken=not a.no_broken)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
