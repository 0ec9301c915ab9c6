"""Files written whole or not at all: a temporary name in the same folder, fsync, rename; and the
mode an ordinary create would give them (the umask), which temporary files do not get by themselves.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike[str]) -> None:
    """Give a file or folder made under a temporary name (mkstemp: 0600, mkdtemp: 0700) the mode an
    ordinary create would have (0666 or 0777 less the umask), before it is renamed into place:
    otherwise weights, configs and pictures came out readable by their owner only."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that readers see either the old or the whole new content."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file (UTF-8) so that readers see either the old or the whole new content."""
    atomic_write_bytes(path, text.encode("utf-8"))
