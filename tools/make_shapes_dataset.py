"""Render the compositional data set (the demo's default): scenes of coloured shapes with captions.

A thin entry point: the command is ``dalle_repro.cli.make_shapes_dataset`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.make_shapes_dataset import main

if __name__ == "__main__":
    sys.exit(main())
