"""Random access to the samples of one tar shard: an index of members by key, built by walking the
tar's headers once, then each sample read by offset.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from dalle_repro.data.samples import MAX_CAPTION_CHARS, SampleError, clean_caption, decode_tokens, split_key
from dalle_repro.data.sources import is_remote, spool

log = logging.getLogger(__name__)


def first_token_grid(paths: Sequence[str]) -> tuple[str, tuple[int, ...]] | None:
    """``(where, shape)`` of the first ``KEY.tokens`` grid in the first readable shard (its .npy
    header only), to check token shards against a model before training; None when there is none."""
    for path in paths:
        try:
            shard = Shard(path)
        except (OSError, tarfile.TarError):
            continue
        with shard:
            for i in range(min(len(shard), 8)):
                try:
                    key, members = shard.read(i)
                except SampleError:
                    continue
                if "tokens" in members:
                    try:
                        return f"{path}:{key}", tuple(decode_tokens(members["tokens"]).shape)
                    except SampleError:
                        continue
    return None


MAX_SHARD_SAMPLES = 1_000_000  # a shard with more is refused (unreadable_shard): split it


def open_regular(path: str) -> Any:
    """``path`` opened for binary reading, refused with OSError unless it is a regular file.

    A shard path may name a FIFO (whose open blocks until a writer comes) or, through a symlink in
    a data set, a device (``/dev/zero`` never ends, and tarfile's ``ignore_zeros`` walks it
    forever). The open does not block (O_NONBLOCK) and the check is on the opened file (fstat), so
    a link swapped in between cannot get past it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


class _Bounded:
    """A binary file seen only up to ``end`` bytes: the tar walk ends at the size the file had when
    it was opened, even if it grows meanwhile."""

    def __init__(self, f: Any, end: int):
        self._f, self._end = f, end

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._end - self._f.tell())
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()


class _NotPlain(Exception):
    """A tar header that :func:`_scan_plain_tar` leaves to tarfile."""


def _pax_records(buf: bytes) -> dict[str, str]:
    """The ``key=value`` records of a PAX extended header (``"LEN key=value\n"`` each, LEN counting
    the whole record), decoded as tarfile decodes them; :class:`_NotPlain` when malformed."""
    out, pos = {}, 0
    while pos < len(buf) and buf[pos:].strip(b"\0"):
        sp = buf.find(b" ", pos)
        try:
            n = int(buf[pos:sp]) if sp > pos else 0
        except ValueError:
            n = 0
        record = buf[sp + 1 : pos + n]
        if n <= 0 or pos + n > len(buf) or not record.endswith(b"\n") or b"=" not in record:
            raise _NotPlain("a PAX record")
        key, value = record[:-1].split(b"=", 1)
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += n
    return out


def _scan_plain_tar(f: Any, size: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file of a tar made only of plain ustar/v7 headers
    and PAX extended headers (their ``path`` and ``size``) with valid checksums, ended by zero
    blocks; raises :class:`_NotPlain` at the first header that is anything else (a PAX global
    header, GNU extensions, a bad checksum, a cut file), for tarfile to handle.

    tarfile builds a TarInfo per member and keeps them all: about 20 us and 650 bytes a member
    (100,000 members: 2 s and 64 MB per shard, in every loader worker that opens it). This reads a
    member's 512-byte header and skips its data, keeping three values."""
    pos, pax = 0, {}  # pax: the extended header's records, for the member that follows it
    while pos + 512 <= size:
        f.seek(pos)
        block = f.read(512)
        if block == b"\0" * 512:
            if f.read(512) != b"\0" * 512:
                raise _NotPlain("one zero block")
            while chunk := f.read(1 << 20):  # members after the end marker (tars joined by cat, damage)
                if chunk.strip(b"\0"):
                    raise _NotPlain("data after the end-of-archive marker")
            return
        kind = block[156:157]
        try:
            stored = int(block[148:156].rstrip(b"\0 ") or b"0", 8)
            length = int(block[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise _NotPlain("not octal") from None
        if stored != sum(block) - sum(block[148:156]) + 256 or kind not in (b"0", b"\0", b"5", b"1", b"2", b"x"):
            raise _NotPlain(f"header kind {kind!r} or checksum")
        data = pos + 512
        if kind != b"x" and "size" in pax:
            try:
                length = int(pax["size"])
            except ValueError:
                raise _NotPlain("a PAX size") from None
        if data + length > size or length < 0:
            raise _NotPlain("cut")
        if kind == b"x":
            if pax:
                raise _NotPlain("two PAX headers in a row")
            f.seek(data)
            pax = _pax_records(f.read(length))
        elif kind in (b"0", b"\0"):
            name = block[0:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            yield pax.get("path", name.decode("utf-8", "surrogateescape")), data, length
            pax = {}
        else:
            pax = {}
        pos = data + -(-length // 512) * 512
    raise _NotPlain("no end-of-archive marker")


class Shard:
    """An open tar shard with an index of its samples, for random access by sample number.

    ``truncated`` is set when the tar is damaged: cut short, or with unreadable bytes where a member
    header should be; ``lost`` is then how many samples whose headers are there were dropped (their
    data cut off, or the sample at the cut, which may have lost members), for the readers to count.
    Reading goes on past a damaged header to the next readable one (tarfile's
    ``ignore_zeros``), so one flipped byte costs one member, not the rest of the shard; the samples
    that lose a member are then skipped by the reader and counted (``missing_image``...).

    The index keeps each member's data offset and size only. A shard of plain headers (what
    make_shards and encode_tokens write for keys under 100 bytes, and img2dataset's) is indexed by
    :func:`_scan_plain_tar`; any other goes through tarfile. More than :data:`MAX_SHARD_SAMPLES`
    samples is refused, which bounds the index at some 300 bytes a sample.
    """

    def __init__(self, path: str):
        self.path = path
        self.truncated = False
        self.lost = 0
        self._file = spool(path) if is_remote(path) else open_regular(path)
        try:
            size = os.fstat(self._file.fileno()).st_size
            try:
                groups = self._group(_scan_plain_tar(_Bounded(self._file, size), size))
            except _NotPlain:
                groups = self._index_with_tarfile(path, size)
        except BaseException:
            self._file.close()
            raise
        if len(groups) > MAX_SHARD_SAMPLES:
            self._file.close()
            raise tarfile.ReadError(f"{len(groups)} samples, more than {MAX_SHARD_SAMPLES}: split the shard")
        self.samples = list(groups.items())

    @staticmethod
    def _group(members: Iterable[tuple[str, int, int]]) -> dict[str, dict[str, tuple[int, int]]]:
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, length in members:
            key, ext = split_key(name)
            if ext:
                groups.setdefault(key, {})[ext] = (offset, length)
        return groups

    def _index_with_tarfile(self, path: str, end: int) -> dict[str, dict[str, tuple[int, int]]]:
        members: list[tuple[str, int, int]] = []
        expected, damage = 0, None  # where the next header should start; what was wrong
        self._file.seek(0)
        with tarfile.open(
            fileobj=_Bounded(self._file, end), mode="r:", ignore_zeros=True
        ) as tar:  # OSError / tarfile.ReadError
            try:
                while True:
                    info = tar.next()
                    if info is None:
                        break
                    tar.members.clear()  # our index keeps three values; tarfile would keep every TarInfo
                    if info.offset != expected and damage is None:
                        damage = f"unreadable bytes {expected}-{info.offset}"
                    expected = info.offset_data + -(-info.size // 512) * 512
                    if info.isfile():
                        members.append((info.name, info.offset_data, info.size))
                # A whole tar ends in at least two zero blocks after its last member; a cut one does not.
                tar.fileobj.seek(expected)
                tail = tar.fileobj.read()
                cut = len(tail) < 1024 or bool(tail.strip(b"\0"))
                if cut:
                    damage = damage or "no end-of-archive marker"
            except (tarfile.TarError, OSError, EOFError) as e:
                damage, cut = damage or str(e), True
        groups = self._group(members)
        if damage is not None:
            if not groups:
                raise tarfile.ReadError(f"no readable member ({damage})")
            self.truncated = True
            log.warning("shard %s is damaged (%s); using its %d readable samples", path, damage, len(groups))
        for parts in groups.values():
            if any(off + n > end for off, n in parts.values()):
                self.truncated = cut = True
        found = len(groups)
        if self.truncated and cut and groups:
            groups.popitem()  # the sample at the cut may have lost members: drop it whole
        kept = {k: m for k, m in groups.items() if all(off + n <= end for off, n in m.values())}
        self.lost = found - len(kept)
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> tuple[str, dict[str, bytes]]:
        key, members = self.samples[i]
        out: dict[str, bytes] = {}
        for ext, (offset, length) in members.items():
            self._file.seek(offset)
            data = self._file.read(length)
            if len(data) != length:
                raise SampleError("truncated_member", f"{key}.{ext} in {self.path}")
            out[ext] = data
        return key, out

    def read_member(self, i: int, ext: str) -> bytes | None:
        """Sample ``i``'s member ``ext`` alone (a caption without its image), or None where it has none."""
        key, members = self.samples[i]
        if ext not in members:
            return None
        offset, length = members[ext]
        self._file.seek(offset)
        data = self._file.read(length)
        if len(data) != length:
            raise SampleError("truncated_member", f"{key}.{ext} in {self.path}")
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_shard_samples(paths: Sequence[str], errors: Counter | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every raw sample of the given shards in order (for tools such as tokenizer training)."""
    errors = errors if errors is not None else Counter()
    for path in paths:
        try:
            shard = Shard(path)
        except (OSError, tarfile.TarError) as e:
            log.warning("cannot open shard %s: %s; skipped", path, e)
            errors["unreadable_shard"] += 1
            continue
        with shard:
            if shard.truncated:
                errors["truncated_shard"] += 1
                errors["truncated_sample"] += shard.lost
            for i in range(len(shard)):
                try:
                    yield shard.read(i)
                except SampleError as e:
                    errors[e.reason] += 1


def shard_captions(paths: Sequence[str], limit: int) -> list[str]:
    """The captions of the first ``limit`` samples of ``paths`` (their ``txt`` members only, cleaned
    as the loader cleans them); unreadable shards and samples are skipped, as the loader skips them."""
    out: list[str] = []
    for path in paths:
        try:
            shard = Shard(path)
        except (OSError, tarfile.TarError) as e:
            log.warning("cannot open shard %s (%s); its captions are left out", path, e)
            continue
        with shard:
            for i in range(len(shard)):
                if len(out) >= limit:
                    return out
                try:
                    raw = shard.read_member(i, "txt")
                except SampleError:
                    continue  # cut short: the loader skips it too
                if raw is not None:
                    out.append(clean_caption(raw, MAX_CAPTION_CHARS))
    return out
