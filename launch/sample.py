"""Sample images for captions from an exported prior, reranked by CLIP.

A thin entry point: the command is ``dalle_repro.cli.sample`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
