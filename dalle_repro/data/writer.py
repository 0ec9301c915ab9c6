"""Writing webdataset tar shards in img2dataset's layout, atomically and resumably.

A sample is three tar members: ``KEY.jpg`` or ``KEY.png`` (the image), ``KEY.txt`` (the caption) and
``KEY.json`` (metadata). Shards are named ``00000.tar``, ``00001.tar``, ... as img2dataset names them,
so the loader reads shards made here and shards users made with img2dataset alike.

Every shard is written under a temporary name, synced, then renamed, so a killed run never leaves a
half shard under a final name. After each shard the writer records its progress (atomically); a
rerun with the same input and options continues after the last finished shard, and a rerun of a
finished job returns at once. Sample order is fixed (sorted keys), so the shards a resumed run
writes are the ones an uninterrupted run would have written.

Bad input is skipped and counted by reason in ``summary.json``, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dalle_repro.core import faults
from dalle_repro.core.config import atomic_write_text
from dalle_repro.data.loader import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    SampleError,
    clean_caption,
    crop_resize,
    decode_caption,
    decode_image,
)

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"^\d{5,}\.tar$")
TMP_NAME = re.compile(r"^\d{5,}\.tar\.tmp")
STATE_TMP = re.compile(r"^\.(\.progress|summary)\.json\..+\.tmp$")  # atomic_write_text's temporaries
PROGRESS = ".progress.json"
SUMMARY = "summary.json"


@dataclass
class Record:
    """One input sample before processing: where its image comes from and its caption."""

    key: str
    source: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """A processed sample, ready for the tar."""

    key: str
    image: bytes
    ext: str
    caption: str
    meta: dict[str, Any]


# A process function maps a Record to a Sample, or to a (reason, detail) pair when it is skipped.
Processed = Sample | tuple[str, str]


def sanitize_key(text: str) -> str:
    """A webdataset-safe key: no dots (they start the extension) and no path separators."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return key or "_"


def safe_key(key: str) -> str:
    """``key`` itself when it is a plain relative path (webdataset keys may name folders, as in
    ``part1/000017``); else :func:`sanitize_key`'s form. A key that is absolute, has an empty, '.'
    or '..' part, a backslash or an unprintable character would make a tool that extracts the shard
    write outside its folder (``../../x``, ``/abs/x``)."""
    parts = key.split("/")
    plain = key.isprintable() and "\\" not in key and all(p not in ("", ".", "..") for p in parts)
    return key if plain else sanitize_key(key)


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic train/val split by key."""
    if val_fraction <= 0:
        return "train"
    u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
    return "val" if u < val_fraction else "train"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SampleWriteError(ValueError):
    """A sample that cannot be written (a key or caption that does not encode, metadata that is not
    JSON); raised before any of its members reaches the tar, so the shard stays whole."""


def _members(tar: tarfile.TarFile, sample: Sample) -> list[tuple[tarfile.TarInfo, bytes]]:
    """A sample's three members, each header already encoded once: every way a sample can fail to
    write fails here, before the first byte is written."""
    if safe_key(sample.key) != sample.key:  # the writers' callers make keys safe; nothing else may pass
        raise ValueError(f"unsafe sample key {sample.key!r}: it would name a path outside the shard's folder")
    try:
        parts = [
            (f"{sample.key}.{sample.ext}", sample.image),
            (f"{sample.key}.txt", sample.caption.encode("utf-8")),
            (f"{sample.key}.json", json.dumps(sample.meta, ensure_ascii=False).encode("utf-8")),
        ]
        out = []
        for name, data in parts:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # byte-identical shards for identical input
            info.tobuf(tar.format, tar.encoding, tar.errors)  # raises where addfile would, mid-sample
            out.append((info, data))
    except (ValueError, TypeError, UnicodeError, OverflowError) as e:
        raise SampleWriteError(f"{sample.key!r}: {type(e).__name__}: {e}") from None
    return out


def write_tar(path: str | Path, samples: Iterable[Sample], errors: Counter | None = None) -> int:
    """Write a whole tar of samples atomically (temporary name, sync, rename); returns the count.
    A sample that cannot be written is left out and counted in ``errors`` as ``write_failed``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for sample in samples:
                    try:
                        _add_sample(tar, sample)
                    except SampleWriteError as e:
                        if errors is None:
                            raise
                        errors["write_failed"] += 1
                        log.warning("skipped a sample that cannot be written: %s", e)
                        continue
                    n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _add_sample(tar: tarfile.TarFile, sample: Sample) -> None:
    for info, data in _members(tar, sample):
        tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into ``NNNNN.tar`` shards of ``shard_size`` samples, each atomically.

    ``on_shard`` is called with (path, count) after each shard has been renamed into place.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard_size: int,
        start_index: int = 0,
        on_shard: Callable[[Path, int], None] | None = None,
    ):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be > 0, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.index = start_index
        self.on_shard = on_shard
        self._tar: tarfile.TarFile | None = None
        self._file: Any = None
        self._count = 0

    def _path(self) -> Path:
        return self.out_dir / f"{self.index:05d}.tar"

    def add(self, sample: Sample) -> None:
        if self._tar is None:
            tmp = self._path().with_name(self._path().name + f".tmp{os.getpid()}")
            self._file = open(tmp, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
            self._tmp = tmp
        _add_sample(self._tar, sample)
        self._count += 1
        if self._count == self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        """Close the open shard (if any) and move it to its final name (one with no sample is dropped)."""
        if self._tar is None:
            return
        if self._count == 0:  # opened for a sample that could not be written, and nothing since
            self.abort()
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._path()
        os.replace(self._tmp, final)
        fsync_dir(self.out_dir)
        count = self._count
        self._tar, self._file, self._count = None, None, 0
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(final, count)

    def abort(self) -> None:
        """Drop the open shard without renaming it."""
        if self._tar is not None:
            self._file.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._tar = None


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


def list_folder(root: str | Path, caption_ext: str = "txt") -> tuple[list[Record], Counter]:
    """Images under ``root`` (recursively) with a sidecar caption ``STEM.{caption_ext}`` beside each."""
    root = Path(root)
    skipped: Counter = Counter()
    records: dict[str, Record] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            continue
        rel = path.relative_to(root).with_suffix("")
        key = sanitize_key(str(rel))
        cap_path = path.with_suffix(f".{caption_ext}")
        if not cap_path.is_file():
            skipped["missing_caption"] += 1
            continue
        caption, noted = _caption(cap_path.read_bytes())
        if not caption:
            skipped["empty_caption"] += 1
            continue
        if key in records:
            skipped["duplicate_key"] += 1
            log.warning("duplicate key %s (%s); keeping %s", key, path, records[key].source)
            continue
        records[key] = Record(key, str(path), caption, {"source": str(rel) + path.suffix} | noted)
    return sorted(records.values(), key=lambda r: r.key), skipped


def _text_encoding(path: Path, sniff: int = 1 << 16) -> str:
    """The Python codec to read a text table with: from its byte-order mark, or from its first 64 KB
    as :func:`~dalle_repro.data.loader.decode_caption` reads a caption (a Latin-1 CSV came out with U+FFFD
    for every accented letter)."""
    with open(path, "rb") as f:
        head = f.read(sniff)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3 and len(head) == sniff:  # a character cut by the sniff's end
            head = head[: e.start]
    encoding = decode_caption(head)[1]
    return {"utf-8-damaged": "utf-8", "latin-1": "cp1252", "utf-16": "utf-16"}.get(encoding, encoding)


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


def list_table(
    path: str | Path, image_col: str = "image", caption_col: str = "caption", key_col: str | None = None
) -> tuple[list[Record], Counter]:
    """Rows of a CSV/TSV/parquet file; image paths may be relative to the table's folder."""
    path = Path(path)
    columns, rows = _read_table(path)
    for name, col in (("--image-col", image_col), ("--caption-col", caption_col), ("--key-col", key_col)):
        if col is not None and col not in columns:
            raise ValueError(f"{path}: no column {col!r} for {name}; the columns are {columns}")
    skipped: Counter = Counter()
    records: dict[str, Record] = {}
    for i, row in enumerate(rows):
        img = str(row.get(image_col) or "").strip()
        if not img:
            skipped["missing_image"] += 1
            continue
        img_path = Path(img) if os.path.isabs(img) else path.parent / img
        caption = clean_caption(str(row.get(caption_col) or ""))
        if not caption:
            skipped["empty_caption"] += 1
            continue
        key = sanitize_key(str(row[key_col]) if key_col else Path(img).with_suffix("").as_posix())
        if key in records:
            skipped["duplicate_key"] += 1
            continue
        records[key] = Record(key, str(img_path), caption, {"source": img, "row": i})
    return sorted(records.values(), key=lambda r: r.key), skipped


def encode_image(im: Any, fmt: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=95)
    else:
        im.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), fmt


MAX_FILE_BYTES = 128 * 2**20  # the default --max-file-bytes

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


def read_source(source: str, max_bytes: int = MAX_FILE_BYTES, inside: Path | None = None) -> bytes | tuple[str, str]:
    """A source file's bytes, or (reason, detail) when it is not taken: ``not_a_regular_file``
    (a device, FIFO or folder: ``/dev/zero`` in a table grew until memory ran out),
    ``file_too_large`` (over ``max_bytes``, read no further), ``outside_table_folder`` (with
    ``inside``: the path, symlinks resolved, leaves that folder) or ``unreadable_file``."""
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as e:
        return ("unreadable_file", f"{source}: {e}")
    if inside is not None:  # checked on the file that was opened, so a link swapped in meanwhile cannot escape
        real = Path(_opened_path(fd, source))
        if not real.is_relative_to(os.path.realpath(inside)):
            os.close(fd)
            return ("outside_table_folder", f"{source} resolves to {real}, outside {inside}")
    st = os.fstat(fd)  # the file that was opened, not the name
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return ("not_a_regular_file", f"{source} is not a regular file")
    if st.st_size > max_bytes:
        os.close(fd)
        return ("file_too_large", f"{source}: {st.st_size} bytes > --max-file-bytes {max_bytes}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            return ("unreadable_file", f"{source}: {e}")
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
) -> Processed:
    """Read, check and (optionally) resize one image file into a Sample.

    Without ``image_size`` an RGB JPEG or PNG keeps its image bytes, with its metadata (EXIF with
    GPS positions, XMP, comments, text chunks) dropped unless ``keep_metadata``; an image that EXIF
    rotates is re-encoded upright instead, since its rotation lived in the EXIF."""
    data = read_source(rec.source, max_file_bytes, inside)
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


# ----------------------------------------------------------------------------------------------
# The job


def fingerprint(records: Sequence[Record], options: dict[str, Any], extra: Iterable[Any] = ()) -> str:
    """Identifies a job: its records (and their files' sizes and times), options, and anything else."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for r in records:
        try:
            st = os.stat(r.source)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "-"
        h.update(f"{r.key}\0{r.source}\0{stamp}\0{r.caption}\n".encode())
    for x in extra:
        h.update(repr(x).encode())
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _split_dirs(out: Path, val_fraction: float) -> dict[str, Path]:
    return {"train": out} if val_fraction <= 0 else {"train": out / "train", "val": out / "val"}


def _ours(d: Path, pattern: re.Pattern[str]) -> list[Path]:
    return sorted(p for p in d.glob("*") if pattern.match(p.name)) if d.is_dir() else []


def _prepare_output(out: Path, dirs: dict[str, Path], fp: str, overwrite: bool) -> dict[str, Any] | None:
    """Decide between finished / resume / fresh; returns the progress to resume from, if any."""
    progress = _read_json(out / PROGRESS)
    if progress is not None and progress.get("fingerprint") != fp:
        progress = None
    existing = [p for d in dirs.values() for p in _ours(d, SHARD_NAME)]
    if progress is None and (existing or (out / SUMMARY).exists()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards from a different input or options; "
            "pass --overwrite to replace them, or choose another --output"
        )
    for d in dirs.values():
        for p in _ours(d, TMP_NAME):
            p.unlink()
    for p in _ours(out, STATE_TMP):  # a kill while progress or the summary was being written
        p.unlink()
    keep = set()
    if progress is not None:
        for split in progress["splits"].values():
            keep.update(out / s["path"] for s in split["shards"])
    for p in existing:
        if p not in keep:
            p.unlink()
    (out / SUMMARY).unlink(missing_ok=True)
    return progress


def write_dataset(
    records: Sequence[Record],
    process: Callable[[Record], Processed],
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    val_fraction: float = 0.0,
    workers: int = 1,
    fp: str,
    skipped: Counter | None = None,
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
    desc: str = "shards",
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Process records (in ``workers`` processes) and write them as shards; returns the summary.

    With ``val_fraction`` > 0 samples go to ``out_dir/train`` and ``out_dir/val`` by key; otherwise
    to ``out_dir``. ``skipped`` holds counts of records already rejected while listing them;
    ``notes`` are further counts for the summary (e.g. captions read in another encoding).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dirs = _split_dirs(out, val_fraction)
    summary = _read_json(out / SUMMARY)
    if summary is not None and summary.get("fingerprint") == fp and not overwrite:
        if all((out / s["path"]).is_file() for s in summary["shards"]):
            log.info("%s is complete (%d samples); nothing to do", out, summary["written"])
            return summary
        overwrite = True  # the same job, with shards lost since: write it again
    progress = _prepare_output(out, dirs, fp, overwrite)
    if progress is None:
        progress = {
            "fingerprint": fp,
            "listing_skipped": dict(skipped or {}),
            "notes": dict(notes or {}),
            "splits": {s: {"shards": [], "next_record": 0, "written": 0, "skipped": {}} for s in dirs},
        }
        # recorded before the first shard, so that a run killed at any point is recognised as ours
        atomic_write_text(out / PROGRESS, json.dumps(progress))
    by_split: dict[str, list[Record]] = {s: [] for s in dirs}
    for r in records:
        by_split[split_of(r.key, val_fraction)].append(r)
    todo = sum(len(v) - progress["splits"][s]["next_record"] for s, v in by_split.items())
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        with tqdm(total=todo, desc=desc, unit="img", dynamic_ncols=True, disable=None) as bar:
            for split, recs in by_split.items():
                _write_split(recs, process, out, dirs[split], split, progress, shard_size, pool, bar)
    finally:
        if pool is not None:
            pool.terminate()
    summary = _summarize(out, progress, options or {})
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    (out / PROGRESS).unlink(missing_ok=True)
    return summary


def _write_split(
    recs: list[Record],
    process: Callable[[Record], Processed],
    out: Path,
    d: Path,
    split: str,
    progress: dict[str, Any],
    shard_size: int,
    pool: Any,
    bar: tqdm,
) -> None:
    state = progress["splits"][split]
    skipped = Counter(state["skipped"])
    pending = {"next": state["next_record"], "written": 0}

    def on_shard(path: Path, count: int) -> None:
        faults.point("shard_written", path.name)
        state["shards"].append({"path": str(path.relative_to(out)), "count": count})
        state.update(next_record=pending["next"], written=state["written"] + count, skipped=dict(skipped))
        atomic_write_text(out / PROGRESS, json.dumps(progress))

    writer = ShardWriter(d, shard_size, start_index=len(state["shards"]), on_shard=on_shard)
    todo = recs[state["next_record"] :]
    results = pool.imap(process, todo, chunksize=8) if pool is not None else map(process, todo)
    try:
        for i, res in enumerate(results, start=state["next_record"]):
            pending["next"] = i + 1
            bar.update(1)
            if isinstance(res, Sample):
                try:
                    writer.add(res)
                except SampleWriteError as e:  # this sample only: the shard and the job go on
                    skipped["write_failed"] += 1
                    log.warning("skipped a sample that cannot be written: %s", e)
            else:
                reason, detail = res
                skipped[reason] += 1
                log.debug("skipped %s: %s", reason, detail)
        writer.finish_shard()
    except BaseException:
        writer.abort()
        raise
    if state["next_record"] != len(recs):  # the split ended with skipped records after its last shard
        state.update(next_record=len(recs), skipped=dict(skipped))
        atomic_write_text(out / PROGRESS, json.dumps(progress))


def _summarize(out: Path, progress: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    skipped: Counter = Counter(progress["listing_skipped"])
    shards: list[dict[str, Any]] = []
    splits = {}
    for name, s in progress["splits"].items():
        skipped.update(s["skipped"])
        shards.extend(s["shards"])
        splits[name] = {"written": s["written"], "skipped": s["skipped"], "shards": len(s["shards"])}
    return {
        "written": sum(s["written"] for s in progress["splits"].values()),
        "skipped": dict(sorted(skipped.items())),
        "shards": shards,
        "splits": splits,
        "fingerprint": progress["fingerprint"],
        "options": options,
        **progress.get("notes", {}),
    }


def make_shards(
    input_path: str | Path,
    output: str | Path,
    *,
    shard_size: int = 1000,
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
    paths_inside: bool = False,
    keep_metadata: bool = False,
    caption_ext: str = "txt",
) -> dict[str, Any]:
    """Shard a folder of images with sidecar captions, or a CSV/TSV/parquet table. See the module doc.

    A folder's captions are ``STEM.{caption_ext}`` files, read as UTF-8, or by their byte-order mark,
    or as Latin-1 (:func:`~dalle_repro.data.loader.decode_caption`); the summary's ``captions_recoded``
    counts the captions read in each encoding other than UTF-8, and their KEY.json names it.

    Only regular files of at most ``max_file_bytes`` are read; ``paths_inside`` skips table rows
    whose image path (symlinks resolved) leaves the table's folder; image metadata is dropped
    unless ``keep_metadata`` (:func:`process_file`)."""
    src = Path(input_path)
    if src.is_dir():
        records, skipped = list_folder(src, caption_ext.lstrip("."))
    elif src.is_file():
        records, skipped = list_table(src, image_col, caption_col, key_col)
    else:
        raise FileNotFoundError(f"--input {src} is neither a folder nor a table file")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
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
        inside=src.parent if paths_inside and src.is_file() else None,
        keep_metadata=keep_metadata,
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
        options=options,
        overwrite=overwrite,
        notes={
            "captions_recoded": dict(
                Counter(r.meta["caption_encoding"] for r in records if "caption_encoding" in r.meta)
            )
        },
    )
