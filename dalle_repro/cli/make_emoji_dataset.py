"""Render every emoji of Debian's Noto Color Emoji font into captioned shards (the demo data set).

Captions are the emoji's English names ("red apple", "woman astronaut: medium skin tone") from
Debian's unicode-data. Needs the Debian packages fonts-noto-color-emoji and unicode-data; no network.
Writes OUTPUT/train/*.tar, OUTPUT/val/*.tar and OUTPUT/summary.json. Rerunning a finished job is a
no-op; rerunning a killed one continues it.
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.data.emoji import EmojiArgs, build_emoji_from


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "") + "\n--overwrite: replace shards of a different earlier run.\n"
    a, flags = parse_cli(EmojiArgs, argv, doc, flags=("--overwrite",), aliases=flag_aliases(EmojiArgs))
    if a is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = build_emoji_from(a, overwrite=flags["overwrite"])
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("written", "skipped", "splits")}))
    print(f"wrote emoji shards in {a.output}/train and {a.output}/val, and summary.json in {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
