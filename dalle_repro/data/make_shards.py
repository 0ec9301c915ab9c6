"""make_shards: a folder of images with captions, or a table (CSV, TSV, Parquet, JSON lines) of paths
or URLs with captions, into webdataset shards in img2dataset's layout.
"""

from __future__ import annotations

import csv
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from dalle_repro.core.config import arg
from dalle_repro.data.samples import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    SampleError,
    clean_caption,
    crop_resize,
    decode_caption,
    decode_image,
)
from dalle_repro.data.writer import (
    Processed,
    Record,
    Sample,
    encode_image,
    fingerprint,
    sanitize_key,
    split_of,
    write_dataset,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Inputs


def caption_like_files(root: str | Path, caption_ext: str) -> tuple[str, int] | None:
    """The most common extension, other than ``caption_ext`` and images', of files that share a
    stem with an image under ``root`` (``("caption", 60)``): what a folder's captions are probably
    called when none were found. None for a table or when there is none."""
    root = Path(root)
    if not root.is_dir():
        return None
    files = [p for p in root.rglob("*") if p.is_file()]
    images = {p.with_suffix("") for p in files if p.suffix.lower().lstrip(".") in IMAGE_EXTS}
    counts = Counter(
        p.suffix.lstrip(".")
        for p in files
        if p.with_suffix("") in images and p.suffix and p.suffix.lower().lstrip(".") not in (*IMAGE_EXTS, caption_ext)
    )
    return counts.most_common(1)[0] if counts else None


def _caption(raw: bytes) -> tuple[str, dict[str, str]]:
    """A cleaned caption and, when it was not plain UTF-8, the meta noting the encoding read."""
    text, encoding = decode_caption(raw)
    return clean_caption(text), ({"caption_encoding": encoding} if encoding != "utf-8" else {})


MAX_CAPTION_BYTES = 1 << 20  # a caption file is read up to this; the sample's caption is cut far shorter


def _skip(skipped: Counter, files: list[tuple[str, str]] | None, path: str, reason: str) -> None:
    skipped[reason] += 1
    if files is not None:
        files.append((path, reason))


def list_folder(
    root: str | Path, caption_ext: str = "txt", files: list[tuple[str, str]] | None = None
) -> tuple[list[Record], Counter]:
    """Images under ``root`` (recursively) with a sidecar caption ``STEM.{caption_ext}`` beside each.
    A caption file with no image beside it is counted (``caption_without_image``): a user whose
    images failed to copy sees it in the summary instead of a silently smaller set. ``files``
    collects (path, reason) of every file skipped.

    A caption file is read as :func:`read_source` reads an image, confined to ``root`` (a caption
    linked to a credentials file must not end up in a shard) and cut at :data:`MAX_CAPTION_BYTES`
    (a 10 GB one is not read whole); one that cannot be taken is counted by its reason."""
    root = Path(root)
    skipped: Counter = Counter()
    records: dict[str, Record] = {}
    all_files = sorted(p for p in root.rglob("*") if p.is_file())
    image_stems = {p.with_suffix("") for p in all_files if p.suffix.lower().lstrip(".") in IMAGE_EXTS}
    for path in all_files:
        ext = path.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            if path.suffix == f".{caption_ext}" and path.with_suffix("") not in image_stems:
                _skip(skipped, files, str(path), "caption_without_image")
            continue
        rel = path.relative_to(root).with_suffix("")
        key = sanitize_key(str(rel))
        cap_path = path.with_suffix(f".{caption_ext}")
        if not cap_path.is_file():
            _skip(skipped, files, str(path), "missing_caption")
            continue
        raw = read_source(str(cap_path), MAX_CAPTION_BYTES, root, cut=True, outside="outside_input_folder")
        if isinstance(raw, tuple):
            _skip(skipped, files, str(cap_path), raw[0])
            log.warning("caption skipped: %s", raw[1])
            continue
        caption, noted = _caption(raw)
        if noted.get("caption_encoding") == "binary":  # an image or random bytes, not a caption
            _skip(skipped, files, str(cap_path), "binary_caption")
            continue
        if not caption:
            _skip(skipped, files, str(path), "empty_caption")
            continue
        if key in records:
            _skip(skipped, files, str(path), "duplicate_key")
            log.warning("duplicate key %s (%s); keeping %s", key, path, records[key].source)
            continue
        records[key] = Record(key, str(path), caption, {"source": str(rel) + path.suffix} | noted)
    return sorted(records.values(), key=lambda r: r.key), skipped


def _text_encoding(path: Path, sniff: int = 1 << 16) -> str:
    """The Python codec to read a text table with: from its byte-order mark, or from its first 64 KB
    as :func:`~dalle_repro.data.samples.decode_caption` reads a caption (a Latin-1 CSV came out with U+FFFD
    for every accented letter)."""
    with open(path, "rb") as f:
        head = f.read(sniff)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3 and len(head) == sniff:  # a character cut by the sniff's end
            head = head[: e.start]
    encoding = decode_caption(head)[1]
    return {"utf-8-damaged": "utf-8", "latin-1": "cp1252", "binary": "cp1252", "utf-16": "utf-16"}.get(
        encoding, encoding
    )


def _read_table(path: Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.column_names, iter(table.to_pylist())
    if suffix not in (".csv", ".tsv"):
        raise ValueError(f"{path}: a table input must end in .csv, .tsv or .parquet")
    f = open(path, newline="", encoding=_text_encoding(path), errors="replace")  # noqa: SIM115 (the reader reads it)
    reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    return list(reader.fieldnames or []), reader


def _csv_rows(rows: Iterator[dict[str, Any]], skipped: Counter) -> Iterator[dict[str, Any] | None]:
    """The table's rows, None in place of a row the csv module cannot read (a cell over its 128 KiB
    field limit ended the run with a traceback): counted ``unreadable_row``, and the next row read."""
    while True:
        try:
            yield next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            skipped["unreadable_row"] += 1
            log.warning("table row skipped: %s", e)
            yield None


def list_table(
    path: str | Path,
    image_col: str = "image",
    caption_col: str = "caption",
    key_col: str | None = None,
    files: list[tuple[str, str]] | None = None,
) -> tuple[list[Record], Counter]:
    """Rows of a CSV/TSV/parquet file; image paths may be relative to the table's folder. ``files``
    collects (TABLE:row N or the image path, reason) of every row skipped."""
    path = Path(path)
    columns, rows = _read_table(path)
    for name, col in (("--image-col", image_col), ("--caption-col", caption_col), ("--key-col", key_col)):
        if col is not None and col not in columns:
            raise ValueError(f"{path}: no column {col!r} for {name}; the columns are {columns}")
    skipped: Counter = Counter()
    records: dict[str, Record] = {}
    for i, row in enumerate(_csv_rows(rows, skipped)):
        if row is None:
            continue
        img = str(row.get(image_col) or "").strip()
        if not img:
            _skip(skipped, files, f"{path}:row {i}", "missing_image")
            continue
        img_path = Path(img) if os.path.isabs(img) else path.parent / img
        caption = clean_caption(str(row.get(caption_col) or ""))
        if not caption:
            _skip(skipped, files, str(img_path), "empty_caption")
            continue
        key = sanitize_key(str(row[key_col]) if key_col else Path(img).with_suffix("").as_posix())
        if key in records:
            _skip(skipped, files, str(img_path), "duplicate_key")
            continue
        records[key] = Record(key, str(img_path), caption, {"source": img, "row": i})
    return sorted(records.values(), key=lambda r: r.key), skipped


MAX_FILE_BYTES = 128 * 2**20  # the default --max-file-bytes
MAX_SHARD_SIZE = 1000  # img2dataset's default: tars of some tens of MB
READERS = 8  # loader readers a small set should still feed: 2 ranks x 4 workers (data.num_workers)


def auto_shard_size(train_samples: int) -> int:
    """The shard size for a set with ``train_samples`` training samples: :data:`MAX_SHARD_SIZE`, or
    fewer so that there are at least :data:`READERS` training shards (the loader hands out whole
    shards, so a reader without one idles), but never fewer than one sample per shard."""
    return max(1, min(MAX_SHARD_SIZE, train_samples // READERS))


# Metadata dropped from kept files: JPEG's APP1 (EXIF, XMP), APP12-13 (Photoshop, Ducky) and COM
# segments; PNG's text, EXIF and time chunks. Kept: what decoding needs (JFIF's APP0, the ICC
# profile in APP2, Adobe's APP14 that says how to read CMYK/YCC).
JPEG_DROP = {0xE1, 0xEC, 0xED, 0xFE}
PNG_DROP = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}


def strip_metadata(data: bytes, fmt: str) -> bytes | None:
    """``data`` without its metadata segments, every image byte as it was (the pixels decode the
    same); ``None`` when the file cannot be walked (then the caller re-encodes)."""
    try:
        if fmt == "JPEG":
            return _strip_jpeg(data)
        if fmt == "PNG":
            return _strip_png(data)
    except (IndexError, ValueError):
        return None
    return None


def _strip_jpeg(data: bytes) -> bytes:
    """Every segment walked, between scans too: a progressive JPEG puts tables (and can put APPn or
    COM segments) between its scans, and a file may carry data after its end marker (a second
    image of an MPF file, or anything appended). Entropy-coded data is copied up to the next marker
    (0xFF followed by neither 0x00 nor a restart marker); the file ends at EOI."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("no SOI")
    out, pos = [data[:2]], 2
    while True:
        if data[pos] != 0xFF:
            raise ValueError("not a marker")
        while data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: the image ends here; anything after it is dropped
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:
            raise ValueError("marker without a length outside a scan")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise ValueError("segment runs past the end")
        if marker not in JPEG_DROP:
            out.append(data[pos:end])
        pos = end
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next real marker
            scan = pos
            while True:
                pos = data.index(b"\xff", pos)
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:  # a stuffed 0xFF or a restart marker
                    pos += 2
                    continue
                if following == 0xFF:  # fill bytes before a marker
                    pos += 1
                    continue
                break
            out.append(data[scan:pos])


def _strip_png(data: bytes) -> bytes:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("no signature")
    out, pos = [data[:8]], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, end = data[pos + 4 : pos + 8], pos + 12 + length
        if end > len(data):
            raise ValueError("chunk runs past the end")
        if kind not in PNG_DROP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)
    raise ValueError("no IEND")


def _opened_path(fd: int, source: str) -> str:
    """The real path of the file open as ``fd``: Linux names it in /proc; elsewhere the name is
    resolved and must still be the opened file (same device and inode), else the link moved."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(source)
        try:
            same = os.path.samestat(os.stat(real), os.fstat(fd))
        except OSError:
            same = False
        return real if same else f"(a file that moved while it was opened: {source})"


def read_source(
    source: str,
    max_bytes: int = MAX_FILE_BYTES,
    inside: Path | None = None,
    cut: bool = False,
    outside: str = "outside_table_folder",
) -> bytes | tuple[str, str]:
    """A source file's bytes, or (reason, detail) when it is not taken: ``not_a_regular_file``
    (a device, FIFO or folder: ``/dev/zero`` in a table grew until memory ran out),
    ``file_too_large`` (over ``max_bytes``, read no further; with ``cut`` its first ``max_bytes``
    are returned instead), ``outside`` (with ``inside``: the path, symlinks resolved, leaves that
    folder) or ``unreadable_file``."""
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as e:
        return ("unreadable_file", f"{source}: {e}")
    if inside is not None:  # checked on the file that was opened, so a link swapped in meanwhile cannot escape
        real = Path(_opened_path(fd, source))
        if not real.is_relative_to(os.path.realpath(inside)):
            os.close(fd)
            return (outside, f"{source} resolves to {real}, outside {inside}")
    st = os.fstat(fd)  # the file that was opened, not the name
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return ("not_a_regular_file", f"{source} is not a regular file")
    if st.st_size > max_bytes and not cut:
        os.close(fd)
        return ("file_too_large", f"{source}: {st.st_size} bytes > --max-file-bytes {max_bytes}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            return ("unreadable_file", f"{source}: {e}")
    if len(data) > max_bytes and cut:
        return data[:max_bytes]
    if len(data) > max_bytes:  # it grew after the stat
        return ("file_too_large", f"{source}: more than --max-file-bytes {max_bytes}")
    return data


def process_file(
    rec: Record,
    image_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fmt: str = "jpg",
    max_caption_chars: int = 4096,
    max_file_bytes: int = MAX_FILE_BYTES,
    inside: Path | None = None,
    keep_metadata: bool = False,
    outside: str = "outside_table_folder",
) -> Processed:
    """Read, check and (optionally) resize one image file into a Sample.

    Without ``image_size`` an RGB JPEG or PNG keeps its image bytes, with its metadata (EXIF with
    GPS positions, XMP, comments, text chunks) dropped unless ``keep_metadata``; an image that EXIF
    rotates is re-encoded upright instead, since its rotation lived in the EXIF."""
    data = read_source(rec.source, max_file_bytes, inside, outside=outside)
    if isinstance(data, tuple):
        return data
    try:
        im, facts = decode_image(data, max_pixels)
    except SampleError as e:
        return (e.reason, f"{rec.source}: {e}")
    meta = dict(rec.meta, key=rec.key, original_width=facts["width"], original_height=facts["height"])
    stripped = None
    if not image_size and facts["format"] in ("JPEG", "PNG") and facts["mode"] == "RGB":
        upright = facts.get("orientation", 1) == 1
        stripped = data if keep_metadata else strip_metadata(data, facts["format"]) if upright else None
    if image_size:
        im = crop_resize(im, image_size)
        image, ext = encode_image(im, fmt)
    elif stripped is not None:
        image, ext = stripped, "jpg" if facts["format"] == "JPEG" else "png"  # no re-encoding loss
    else:
        image, ext = encode_image(im, fmt)
    caption = rec.caption
    if len(caption) > max_caption_chars:
        caption, meta["caption_truncated"] = caption[:max_caption_chars], True
    meta.update(caption=caption, width=im.size[0], height=im.size[1])
    return Sample(rec.key, image, ext, caption, meta)


@dataclass
class MakeShardsArgs:
    """tools/make_shards.py: a folder of captioned images, or a table, into webdataset shards."""

    input: str = arg(
        doc="A folder of images with STEM.txt captions beside them, or a .csv/.tsv/.parquet table with an "
        "image-path column and a caption column."
    )
    output: str = arg(doc="Folder for the shards and summary.json.")
    shard_size: int | None = arg(
        None,
        f"Samples per shard; null: {MAX_SHARD_SIZE}, or fewer for a small set, so that its training shards can "
        f"feed {READERS} loader readers (2 ranks x 4 workers each reading whole shards).",
        gt=0,
    )
    image_size: int | None = arg(
        None, "Resize + center-crop to this square size; null: images are kept as they are.", gt=0
    )
    val_fraction: float = arg(
        0.0, "Fraction of samples (by key) for OUTPUT/val; 0 writes all shards to OUTPUT.", ge=0, lt=1
    )
    workers: int = arg(1, "Image-processing processes.", gt=0)
    image_col: str = arg("image", "Table column with image paths.")
    caption_col: str = arg("caption", "Table column with captions.")
    key_col: str | None = arg(None, "Table column with sample keys; null: the image file's stem.")
    max_pixels: int = arg(DEFAULT_MAX_PIXELS, "Reject images with more pixels, before decoding.", gt=0)
    format: Literal["jpg", "png"] = arg("jpg", "Encoding for re-encoded images (jpg at quality 95, as img2dataset).")
    max_caption_chars: int = arg(4096, "Captions are cut to this length.", gt=0)
    max_file_bytes: int = arg(MAX_FILE_BYTES, "Skip (file_too_large) image files larger than this (128 MiB).", gt=0)
    paths_inside: bool = arg(
        True,
        "Skip (outside_table_folder) table rows whose image path, symlinks resolved, leaves the table's folder "
        "(a folder input is always confined to itself). Off (--no-paths-inside) for a table that names files "
        "elsewhere on purpose.",
    )
    caption_ext: str = arg("txt", "Extension of a folder's caption files, beside each image (txt: cat.jpg + cat.txt).")
    keep_metadata: bool = arg(
        False, "Keep EXIF, XMP, comments and PNG text in stored files (dropped by default; image bytes unchanged)."
    )
    overwrite: bool = arg(False, "Replace shards of a different earlier run in OUTPUT.")


def make_shards_from(a: MakeShardsArgs) -> dict[str, Any]:
    """:func:`make_shards` with the settings of ``a``."""
    return make_shards(
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
        paths_inside=a.paths_inside,
        keep_metadata=a.keep_metadata,
        caption_ext=a.caption_ext,
    )


def _list_input(
    src: Path, caption_ext: str, columns: tuple[str, str, str | None], files: list[tuple[str, str]]
) -> tuple[list[Record], Counter]:
    """The records of a folder or a table (image, caption and key columns), skips noted in ``files``."""
    if src.is_dir():
        return list_folder(src, caption_ext, files)
    if src.is_file():
        return list_table(src, *columns, files=files)
    raise FileNotFoundError(f"--input {src} is neither a folder nor a table file")


def make_shards(
    input_path: str | Path,
    output: str | Path,
    *,
    shard_size: int | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.0,
    workers: int = 1,
    image_col: str = "image",
    caption_col: str = "caption",
    key_col: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_format: str = "jpg",
    max_caption_chars: int = 4096,
    overwrite: bool = False,
    max_file_bytes: int = MAX_FILE_BYTES,
    paths_inside: bool = True,
    keep_metadata: bool = False,
    caption_ext: str = "txt",
) -> dict[str, Any]:
    """Shard a folder of images with sidecar captions, or a CSV/TSV/parquet table. See the module doc.

    A folder's captions are ``STEM.{caption_ext}`` files, read as UTF-8, or by their byte-order mark,
    or as Latin-1 (:func:`~dalle_repro.data.samples.decode_caption`); the summary's ``captions_recoded``
    counts the captions read in each encoding other than UTF-8, and their KEY.json names it.

    Only regular files of at most ``max_file_bytes`` are read, and only inside the input: a
    folder's images and captions whose path (symlinks resolved) leaves the folder are skipped
    (``outside_input_folder``), and so are a table's image paths that leave the table's folder
    (absolute, ``..``, links: ``outside_table_folder``) unless ``paths_inside`` is off, for a table
    that points elsewhere on purpose. Image metadata is dropped unless ``keep_metadata``
    (:func:`process_file`)."""
    src = Path(input_path)
    files: list[tuple[str, str]] = []
    records, skipped = _list_input(src, caption_ext.lstrip("."), (image_col, caption_col, key_col), files)
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if shard_size is None:
        shard_size = auto_shard_size(sum(split_of(r.key, val_fraction) == "train" for r in records))
    options = {
        "input": str(src.resolve()),
        "shard_size": shard_size,
        "image_size": image_size,
        "val_fraction": val_fraction,
        "image_col": image_col,
        "caption_col": caption_col,
        "key_col": key_col,
        "max_pixels": max_pixels,
        "image_format": image_format,
        "max_caption_chars": max_caption_chars,
        "max_file_bytes": max_file_bytes,
        "paths_inside": paths_inside,
        "keep_metadata": keep_metadata,
        "caption_ext": caption_ext,
    }
    process = partial(
        process_file,
        image_size=image_size,
        max_pixels=max_pixels,
        fmt=image_format,
        max_caption_chars=max_caption_chars,
        max_file_bytes=max_file_bytes,
        inside=src if src.is_dir() else src.parent if paths_inside else None,
        keep_metadata=keep_metadata,
        outside="outside_input_folder" if src.is_dir() else "outside_table_folder",
    )
    return write_dataset(
        records,
        process,
        output,
        shard_size=shard_size,
        val_fraction=val_fraction,
        workers=workers,
        fp=fingerprint(records, options),
        skipped=skipped,
        skipped_files=files,
        options=options,
        overwrite=overwrite,
        notes={
            "captions_recoded": dict(
                Counter(r.meta["caption_encoding"] for r in records if "caption_encoding" in r.meta)
            )
        },
    )
