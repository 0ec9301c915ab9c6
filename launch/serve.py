"""Serve a trained prior: a playground page and an HTTP JSON API that batches concurrent requests.

A thin entry point: the command is ``dalle_repro.cli.serve`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
