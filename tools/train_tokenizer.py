"""Train a byte-level BPE tokenizer (Hugging Face tokenizers) on the captions of tar shards.

A thin entry point: the command is ``dalle_repro.cli.train_tokenizer`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
