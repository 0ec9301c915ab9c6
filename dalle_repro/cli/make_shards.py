"""Shard a folder of captioned images, or a CSV/TSV/parquet table, into webdataset tars.

The layout is img2dataset's (``KEY.jpg``/``KEY.png``, ``KEY.txt``, ``KEY.json`` in ``00000.tar``, ...),
so these shards and shards made with img2dataset are read by the same loader. Bad input is skipped
and counted in ``OUTPUT/summary.json``; a killed run continues where it stopped when rerun.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.data.make_shards import READERS, MakeShardsArgs, caption_like_files, make_shards_from


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
            f"and --caption-col name.{hint} Each skipped file and its reason: {a.output}/skipped.jsonl.",
            file=sys.stderr,
        )
        return 1
    print(shards_report(summary, a))
    return 0


def shards_report(summary: dict[str, Any], a: MakeShardsArgs) -> str:
    """How many shards were written and how many loader readers (ranks x data.num_workers) they feed;
    the loader hands out whole shards, so a reader beyond the shard count idles."""
    shards = {name: s["shards"] for name, s in summary["splits"].items()}
    size = summary["options"].get("shard_size")
    split_text = ", ".join(f"{name} {n}" for name, n in shards.items())
    lines = [
        f"{sum(shards.values())} shards of up to {size} samples ({split_text}): the training shards feed up to "
        f"{shards.get('train', 0)} loader readers (ranks x data.num_workers)"
    ]
    if shards.get("train", 0) < READERS:
        if a.shard_size is not None and summary["splits"]["train"]["written"] >= READERS:
            lines.append(
                f"note: fewer than {READERS} training shards (2 ranks x 4 workers): leave out --shard-size, or pass "
                f"--shard-size {max(1, summary['splits']['train']['written'] // READERS)}"
            )
        else:
            lines.append(f"note: set data.num_workers so that ranks x workers <= {shards.get('train', 0)}")
    skipped = f"; the skipped files, with their reasons, in {a.output}/skipped.jsonl" if summary["skipped"] else ""
    lines.append(f"wrote {sum(shards.values())} shards and summary.json in {a.output}{skipped}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
