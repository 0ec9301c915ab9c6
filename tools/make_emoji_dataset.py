"""Render every emoji of Debian's Noto Color Emoji font into captioned shards (the demo data set).

A thin entry point: the command is ``dalle_repro.cli.make_emoji_dataset`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.make_emoji_dataset import main

if __name__ == "__main__":
    sys.exit(main())
