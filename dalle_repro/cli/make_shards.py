"""Shard a folder of captioned images, or a CSV/TSV/parquet table, into webdataset tars.

The layout is img2dataset's (``KEY.jpg``/``KEY.png``, ``KEY.txt``, ``KEY.json`` in ``00000.tar``, ...),
so these shards and shards made with img2dataset are read by the same loader. Bad input is skipped
and counted in ``OUTPUT/summary.json``; a killed run continues where it stopped when rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dalle_repro.core.config import plain_text
from dalle_repro.data.make_shards import MAX_FILE_BYTES, caption_like_files, make_shards
from dalle_repro.data.samples import DEFAULT_MAX_PIXELS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=plain_text(__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--input",
        required=True,
        help="a folder of images with STEM.txt captions beside them, "
        "or a .csv/.tsv/.parquet table with an image-path column and a caption column",
    )
    p.add_argument("--output", required=True, help="folder for the shards and summary.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize + center-crop to this square size; without it images are kept as they are",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="fraction of samples (by key) for OUTPUT/val; 0 (default) writes all shards to OUTPUT",
    )
    p.add_argument("--workers", type=int, default=1, help="image-processing processes (default 1)")
    p.add_argument("--image-col", default="image", help="table column with image paths (default 'image')")
    p.add_argument("--caption-col", default="caption", help="table column with captions (default 'caption')")
    p.add_argument("--key-col", default=None, help="table column with sample keys (default: the image file's stem)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"reject images with more pixels, before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--format",
        choices=["jpg", "png"],
        default="jpg",
        help="encoding for re-encoded images (default jpg, quality 95, as img2dataset)",
    )
    p.add_argument("--max-caption-chars", type=int, default=4096, help="captions are cut to this length")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier run in OUTPUT")
    p.add_argument(
        "--max-file-bytes",
        type=int,
        default=MAX_FILE_BYTES,
        help=f"skip (file_too_large) image files larger than this (default {MAX_FILE_BYTES}, 128 MiB)",
    )
    p.add_argument(
        "--paths-inside",
        action="store_true",
        help="the default: skip (outside_table_folder) table rows whose image path, symlinks resolved, leaves "
        "the table's folder (a folder input is always confined to itself)",
    )
    p.add_argument(
        "--paths-anywhere",
        action="store_true",
        help="read a table's image paths wherever they point (a table that names files elsewhere on purpose)",
    )
    p.add_argument(
        "--caption-ext",
        default="txt",
        help="extension of a folder's caption files, beside each image (default txt: cat.jpg + cat.txt)",
    )
    p.add_argument(
        "--keep-metadata",
        action="store_true",
        help="keep EXIF, XMP, comments and PNG text in stored files (default: dropped, image bytes unchanged)",
    )
    a = p.parse_args(argv)
    for name in ("shard_size", "workers", "max_pixels", "max_caption_chars", "max_file_bytes"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.image_size is not None and a.image_size <= 0:
        p.error(f"--image-size must be > 0, got {a.image_size}")
    if not 0 <= a.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = make_shards(
            a.input,
            a.output,
            shard_size=a.shard_size,
            image_size=a.image_size,
            val_fraction=a.val_fraction,
            workers=a.workers,
            image_col=a.image_col,
            caption_col=a.caption_col,
            key_col=a.key_col,
            max_pixels=a.max_pixels,
            image_format=a.format,
            max_caption_chars=a.max_caption_chars,
            overwrite=a.overwrite,
            max_file_bytes=a.max_file_bytes,
            paths_inside=not a.paths_anywhere,
            keep_metadata=a.keep_metadata,
            caption_ext=a.caption_ext,
        )
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
