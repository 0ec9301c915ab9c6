"""Expected GPU memory per rank for prior configs: parameters, gradients + optimizer, activations.

A thin entry point: the command is ``dalle_repro.cli.memory_table`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.memory_table import main

if __name__ == "__main__":
    sys.exit(main())
