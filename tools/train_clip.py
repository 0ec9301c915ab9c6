"""Train a small CLIP on image shards, for reranking without downloads (the demo's reranker).

A thin entry point: the command is ``dalle_repro.cli.train_clip`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.train_clip import main

if __name__ == "__main__":
    sys.exit(main())
