"""Shard a folder of captioned images, or a CSV/TSV/parquet table, into webdataset tars.

The layout is img2dataset's (``KEY.jpg``/``KEY.png``, ``KEY.txt``, ``KEY.json`` in ``00000.tar``, ...),
so these shards and shards made with img2dataset are read by the same loader. Bad input is skipped
and counted in ``OUTPUT/summary.json``; a killed run continues where it stopped when rerun.
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.core.config import flag_aliases, parse_cli
from dalle_repro.data.make_shards import MakeShardsArgs, caption_like_files, make_shards_from


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(MakeShardsArgs, argv, __doc__ or "", aliases=flag_aliases(MakeShardsArgs))
    if a is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = make_shards_from(a)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("written", "skipped", "splits")}))
    if summary["written"] == 0:  # a silent success here would be found hours later, by the trainer
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "no image found"
        ext = a.caption_ext.lstrip(".")
        others = caption_like_files(a.input, ext)
        hint = f" The folder has {others[1]} .{others[0]} files: --caption-ext {others[0]}?" if others else ""
        print(
            f"error: nothing was written from {a.input} ({skipped}). A folder needs each image with its caption "
            f"in a file beside it named STEM.{ext} (cat.jpg + cat.{ext}); a table needs the columns --image-col "
            f"and --caption-col name.{hint}",
            file=sys.stderr,
        )
        return 1
    print(f"shards and summary.json in {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
