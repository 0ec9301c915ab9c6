"""Train the dVAE (stage 1).

A thin entry point: the command is ``dalle_repro.cli.train_dvae`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.train_dvae import main

if __name__ == "__main__":
    sys.exit(main())
