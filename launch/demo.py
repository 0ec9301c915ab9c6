"""The main job on the embedded demo data: shapes shards, tokenizer, dVAE, token shards, prior, CLIP,
reranked samples, evaluation and report.

A thin entry point: the command is ``dalle_repro.cli.demo`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
