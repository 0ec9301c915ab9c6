"""Shard a folder of captioned images, or a CSV/TSV/parquet table, into webdataset tars.

A thin entry point: the command is ``dalle_repro.cli.make_shards`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
