"""Render the strokes data set (the second world, never tuned on): coloured strokes on paper, with captions.

A thin entry point: the command is ``dalle_repro.cli.make_strokes_dataset`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.make_strokes_dataset import main

if __name__ == "__main__":
    sys.exit(main())
