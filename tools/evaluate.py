"""Evaluate a trained prior, a folder of generated images, or a dVAE, by the numbers the field uses.

A thin entry point: the command is ``dalle_repro.cli.evaluate`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
