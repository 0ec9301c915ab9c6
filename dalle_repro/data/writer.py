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

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dalle_repro.core import faults
from dalle_repro.core.files import atomic_write_text

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"^\d{5,}\.tar$")
TMP_NAME = re.compile(r"^\d{5,}\.tar\.tmp")
STATE_TMP = re.compile(r"^\.(\.progress|summary)\.json\..+\.tmp$")  # atomic_write_text's temporaries
PROGRESS = ".progress.json"
SUMMARY = "summary.json"
SKIPPED = "skipped.jsonl"  # one {"path", "reason"} line per input skipped, beside summary.json


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


def encode_image(im: Any, fmt: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=95)
    else:
        im.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), fmt


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
    skipped_files: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Process records (in ``workers`` processes) and write them as shards; returns the summary.

    With ``val_fraction`` > 0 samples go to ``out_dir/train`` and ``out_dir/val`` by key; otherwise
    to ``out_dir``. ``skipped`` holds counts of records already rejected while listing them, and
    ``skipped_files`` their (path, reason); those and the records skipped while processing go to
    ``out_dir/skipped.jsonl``, so that a user can find the files behind the summary's counts.
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
        atomic_write_text(out / SKIPPED, "".join(_skip_line(p, r) for p, r in skipped_files))
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
    _dedupe_skipped(out / SKIPPED)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    (out / PROGRESS).unlink(missing_ok=True)
    return summary


def _skip_line(path: str, reason: str) -> str:
    return json.dumps({"path": path, "reason": reason}, ensure_ascii=False) + "\n"


def _dedupe_skipped(path: Path) -> None:
    """One line per skipped input: a resumed run processes again what followed its last shard."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        atomic_write_text(path, "".join(dict.fromkeys(lines)))


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
                    _note_skip(out, recs[i].source, "write_failed")
            else:
                reason, detail = res
                skipped[reason] += 1
                log.debug("skipped %s: %s", reason, detail)
                _note_skip(out, recs[i].source, reason)
        writer.finish_shard()
    except BaseException:
        writer.abort()
        raise
    if state["next_record"] != len(recs):  # the split ended with skipped records after its last shard
        state.update(next_record=len(recs), skipped=dict(skipped))
        atomic_write_text(out / PROGRESS, json.dumps(progress))


def _note_skip(out: Path, source: str, reason: str) -> None:
    with open(out / SKIPPED, "a", encoding="utf-8") as f:
        f.write(_skip_line(source, reason))


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
