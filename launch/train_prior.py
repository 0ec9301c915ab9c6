"""Train the prior (stage 2) under DeepSpeed.

A thin entry point: the command is ``dalle_repro.cli.train_prior`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.train_prior import main

if __name__ == "__main__":
    sys.exit(main())
