"""Shard specs to shard lists, and shards from elsewhere.

A spec is a glob, a brace pattern, a comma-separated list, or a ``.txt`` file with one shard per
line. Besides local paths, a shard may be ``pipe:COMMAND`` (the command's output is the tar, as in
webdataset: ``pipe:curl -s https://host/{000..099}.tar``, ``pipe:aws s3 cp s3://b/x.tar -``) or an
fsspec URL (``file://``, ``s3://``, ``gs://``, ``http(s)://``: their fsspec package, s3fs, gcsfs or
aiohttp, installed by you). Such a shard is copied once, when a reader opens it, into an unnamed
temporary file (in ``$TMPDIR``; gone when the reader closes it or dies) and read from there like a
local one, so shuffling and exact resume are the same. A pipe that exits non-zero or a URL that
cannot be read makes the shard unreadable: counted and skipped.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import braceexpand

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Shards


def _top_commas(spec: str) -> list[str]:
    """``spec`` split at the commas outside braces (``a.tar,{b,c}.tar`` is two parts)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return [*parts, spec[start:]]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Resolve a shard spec to paths, ``pipe:`` commands and URLs: a glob, a brace pattern, a
    comma-separated list (commas inside braces belong to the pattern), a list file (.txt/.list, one
    path or URL per line), a ``pipe:`` command (the rest of the spec, brace-expanded, commas and
    all), a URL (brace-expanded; a glob in it expanded by fsspec), or a list of these."""
    if isinstance(spec, str):
        parts = [spec.strip()] if spec.strip().startswith("pipe:") else [s.strip() for s in _top_commas(spec)]
        parts = [p for p in parts if p]
    else:
        parts = list(spec)
    if not parts:
        raise ValueError("empty shard spec")
    out: list[str] = []
    for part in parts:
        if part.endswith((".txt", ".list")) and os.path.isfile(part):
            base = os.path.dirname(part)
            with open(part, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            for n, ln in enumerate(lines, 1):
                if ln.startswith("pipe:"):  # a list file may come with a data set; it must not run commands
                    raise ValueError(
                        f"{part}: line {n} is a pipe: command; a shard list may hold paths and URLs only "
                        "(give pipe: shards in the config or on the command line)"
                    )
                if _URL.match(ln):
                    out.extend(_expand_url(ln))
                else:
                    out.append(os.path.join(base, ln) if not os.path.isabs(ln) else ln)
            continue
        if part.startswith("pipe:"):
            out.extend(braceexpand.braceexpand(part))
            continue
        if _URL.match(part):
            out.extend(u for p in braceexpand.braceexpand(part) for u in _expand_url(p))
            continue
        for p in braceexpand.braceexpand(part):
            if os.path.isdir(p):
                tars = len(glob.glob(os.path.join(glob.escape(p), "*.tar")))
                raise ValueError(
                    f"shard spec {p!r} is a folder; give its shards, e.g. {os.path.join(p, '*.tar')} "
                    f"({tars} .tar files there)"
                )
            if glob.has_magic(p):
                matched = sorted(glob.glob(p))
                if not matched:
                    raise ValueError(f"shard pattern {p!r} matches no file")
                out.extend(matched)
            else:
                out.append(p)
    missing = [p for p in out if not is_remote(p) and not os.path.isfile(p)]
    if missing and len(missing) == len(out):
        raise ValueError(f"none of the {len(out)} shards of {spec!r} exists (first: {out[0]})")
    if missing:
        log.warning("%d of %d shards are missing and will be skipped, e.g. %s", len(missing), len(out), missing[0])
    return out


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(spec: str) -> bool:
    """Whether a shard is a ``pipe:`` command or a URL rather than a local path."""
    return spec.startswith("pipe:") or bool(_URL.match(spec))


def _check_protocol(url: str) -> None:
    """A URL whose fsspec backend is not installed fails here, naming what to install, instead of
    every shard being counted unreadable once the run has started."""
    import fsspec

    proto = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as e:
        raise ValueError(f"shard URL {url!r}: fsspec cannot read {proto}:// here ({e})") from None


def _expand_url(url: str) -> list[str]:
    """A URL, with a glob in it expanded by its fsspec filesystem (``file:///data/*.tar``)."""
    _check_protocol(url)
    if not glob.has_magic(url.split("://", 1)[1]):
        return [url]
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(url)
    if not paths:
        raise ValueError(f"shard pattern {url!r} matches no file")
    return sorted(fs.unstrip_protocol(p) for p in paths)


def _no_stop_signals_in_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the loader's workers ignore them; a pipe's command must not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


MAX_SPOOL_BYTES = 16 * 2**30  # a shard copied from elsewhere may be this large (1M samples of 16 KB)


def _copy_capped(src: Any, out: Any, what: str) -> None:
    """Copy ``src`` into ``out``, raising OSError past :data:`MAX_SPOOL_BYTES`: ``file:///dev/zero``
    or ``pipe:cat /dev/zero`` would otherwise fill ``$TMPDIR``."""
    n = 0
    while chunk := src.read(1 << 20):
        n += len(chunk)
        if n > MAX_SPOOL_BYTES:
            raise OSError(f"{what}: more than {MAX_SPOOL_BYTES} bytes, not a shard; copying stopped")
        out.write(chunk)


def spool(spec: str) -> Any:
    """A ``pipe:`` command's output or a URL's bytes in an unnamed temporary file, at its start.

    Raises OSError (naming the command and its last error output, or the URL) when the command
    exits non-zero, the URL cannot be read (whatever fsspec raises: a ``zip://`` that is no zip
    raised BadZipFile, which ended the loader), or either gives more than :data:`MAX_SPOOL_BYTES`."""
    out = tempfile.TemporaryFile(prefix="dalle_repro_shard_")  # noqa: SIM115 (the caller closes it)
    try:
        if spec.startswith("pipe:"):
            cmd = spec[len("pipe:") :]
            with tempfile.TemporaryFile() as err:
                with subprocess.Popen(
                    cmd, shell=True, stdout=subprocess.PIPE, stderr=err, preexec_fn=_no_stop_signals_in_child
                ) as proc:
                    assert proc.stdout is not None
                    try:
                        _copy_capped(proc.stdout, out, f"pipe command {cmd!r}")
                    except BaseException:
                        proc.kill()
                        raise
                    code = proc.wait()
                if code != 0:
                    err.seek(0)
                    tail = err.read()[-500:].decode("utf-8", "replace").strip()
                    raise OSError(f"pipe command {cmd!r} exited with status {code}" + (f": {tail}" if tail else ""))
        else:
            import fsspec

            try:
                with fsspec.open(spec, "rb") as src:
                    _copy_capped(src, out, spec)
            except OSError:
                raise
            except Exception as e:  # any backend's own error is an unreadable shard, not the loader's end
                raise OSError(f"{spec}: {type(e).__name__}: {e}") from e
        out.flush()
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise
