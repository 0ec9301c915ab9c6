"""Compiled CPU kernels: built on first use with the system's C++ compiler, cached, loaded with ctypes.

- ``csrc/local_attention.cpp``: attention over per-query key lists, the CPU ``local`` backend
  (``attention._ListAttention``);
- ``csrc/gumbel_softmax.cpp``: the dVAE's Gumbel-softmax sample and KL, fused (``models/dvae.py``).

Plain C++ with a C ABI, one shared library: it builds in a few seconds with ``g++`` and needs
neither PyTorch's headers nor ninja.

- Cache: ``$DALLE_REPRO_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/dalle_repro/kernels``, else
  ``~/.cache/dalle_repro/kernels``. The file name holds a hash of the source, the compiler, its flags
  and, for the ``-march=native`` build that training loads, this CPU's model and flags: nodes with
  different CPUs that share a home directory each build their own. The build writes a temporary
  file, syncs it and renames it into place, so ranks that start together never load a half-written
  library. The folder is made 0700; a folder or library that another user owns, or that group or
  others may write, is not trusted: such a library (or one that fails to load, such as a 0-byte
  file) is built anew, and such a folder turns the kernels off with a warning that names it.
- Numbers: the kernels are compiled without ``-ffast-math``, with ``-ffp-contract=off``, their exp,
  log and sums written out in ``csrc/fmath.h``, so a build for any x86-64 level (``x86-64``,
  ``x86-64-v3`` (AVX2), native AVX-512) gives bit-identical float32 results: a run's numbers do not
  depend on the CPU it lands on. :func:`load_build` builds and loads one for a named ``-march``
  (the tests compare them).
- Compiler: ``$CXX``, else ``g++``.
- ``DALLE_REPRO_CPU_KERNELS=off`` turns the kernels off. Where the build fails (no compiler), a
  warning says why, once, and the callers fall back to their pure-PyTorch paths, which give the same
  numbers more slowly (the dVAE's fallback draws its noise from PyTorch's generator instead).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch  # noqa: F401  (loaded first, so that the kernel binds to PyTorch's OpenMP runtime)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(CSRC / name for name in ("local_attention.cpp", "gumbel_softmax.cpp"))
HEADERS = (CSRC / "parallel.h", CSRC / "fmath.h")  # included by the sources: part of the cache key
# No -ffast-math: it let the vector width (reduction order), libmvec's per-ISA exp and log, and FMA
# contraction change the numbers from one CPU to the next (see csrc/fmath.h). -ffp-contract=off for
# the same reason: x86-64-v3 and up would fuse a * b + c into one rounding, the baseline cannot.
# -fno-trapping-math changes no result (no FP trap is enabled): it lets the vectoriser compute both
# sides of a select, which exp_f's underflow branch needs. Nothing here may be *linked* with
# -ffast-math: crtfastmath.o would switch the whole process to flush-to-zero on load.
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-std=c++17", "-fPIC")
# What training loads: native, unless DALLE_REPRO_KERNEL_MARCH names another -march (bench/run.py
# --isa avx2 uses x86-64-v3). The numbers are the same either way; only the speed differs.
MARCH = os.environ.get("DALLE_REPRO_KERNEL_MARCH") or "native"
LINK_FLAGS = ("-shared", "-fopenmp")
SWITCH = "DALLE_REPRO_CPU_KERNELS"
CACHE = "DALLE_REPRO_KERNEL_CACHE"
ABI_VERSION = 2
NAME = "dalle_repro_cpu"

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get(SWITCH, "on").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    if os.environ.get(CACHE):
        return Path(os.environ[CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dalle_repro" / "kernels"


def compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep)) or platform.machine()


def _march_flags(march: str) -> tuple[str, ...]:
    return (f"-march={march}",)


def library_path(march: str = MARCH) -> Path:
    key = hashlib.sha256()
    flags = " ".join((*FLAGS, *_march_flags(march), *LINK_FLAGS)).encode()
    code = (src.read_bytes() for src in (*SOURCES, *HEADERS))
    cpu = _cpu_signature() if march == "native" else ""  # only a native build depends on this CPU
    for part in (*code, compiler().encode(), flags, cpu.encode()):
        key.update(part)
        key.update(b"\0")
    suffix = "" if march == MARCH else "-" + march
    return cache_dir() / f"{NAME}{suffix}-{key.hexdigest()[:16]}.so"


def build(path: Path, march: str = MARCH) -> None:
    """Compile ``SOURCES`` for ``-march=march`` into ``path`` atomically; RuntimeError with the
    compiler's message on failure."""
    cxx = shutil.which(compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler: {compiler()!r} is not on PATH (set CXX)")
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    objects = [f"{tmp}.{i}.o" for i in range(len(SOURCES))]

    def run(cmd: list[str], what: str) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {what}:\n{res.stderr.strip()[-2000:]}")

    try:
        for src, obj in zip(SOURCES, objects, strict=True):
            run([cxx, *FLAGS, *_march_flags(march), "-c", str(src), "-o", obj], src.name)
        run([cxx, *LINK_FLAGS, *objects, "-o", tmp], "linking " + path.name)
        os.chmod(tmp, 0o755)  # whatever the umask: a group-writable library would be refused on load
        with open(tmp, "rb") as f:  # on disk before its name is: a crash leaves no torn library
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for leftover in (tmp, *objects):
            if os.path.exists(leftover):
                os.unlink(leftover)


def load_build(march: str) -> ctypes.CDLL:
    """The kernels built for ``-march=march`` (built into the cache on first use), loaded beside
    any other build: for comparing the numbers of builds for different CPUs. Raises RuntimeError
    or OSError where it cannot be built or loaded (a CPU that lacks the target's instructions
    loads it, but would fault in it: check the CPU first)."""
    path = library_path(march)
    private_dir(path.parent)
    built = not path.exists()
    if built:
        build(path, march)
    try:
        check_private(path, "library")
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError):
        if built:
            raise
        build(path, march)  # a 0-byte or torn file, or one planted by someone else: build it anew
        check_private(path, "library")
        lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.dr_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.dr_abi_version()}, expected {ABI_VERSION}")
    return lib


def check_private(path: Path, what: str) -> None:
    """RuntimeError unless ``path`` belongs to this user and nobody else may write it: a library
    loaded from the cache runs as this process, so one planted by another user must not be."""
    st = os.stat(path)
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if st.st_uid != uid:
        raise RuntimeError(f"kernel cache {what} {path} belongs to uid {st.st_uid}, not to this user (uid {uid})")
    if st.st_mode & 0o022:
        raise RuntimeError(f"kernel cache {what} {path} is writable by others (mode {stat.filemode(st.st_mode)})")


def private_dir(path: Path) -> None:
    """Create the cache folder readable by this user only (0700), or check an existing one with
    :func:`check_private` (RuntimeError: the kernels stay off, with a warning that names it)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(path, "folder")


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"dr_local_forward_{suffix}")
        fwd.argtypes = [i64] * 5 + [ptr] * 7 + [f64, i64]
        fwd.restype = None
        bwd = getattr(lib, f"dr_local_backward_{suffix}")
        bwd.argtypes = [i64] * 5 + [ptr] * 11 + [f64, i64]
        bwd.restype = None
    lib.dr_abi_version.restype = ctypes.c_int
    u64 = ctypes.c_uint64
    lib.dr_gumbel_noise.argtypes = [i64, u64, ptr]
    lib.dr_gumbel_noise.restype = None
    lib.dr_gumbel_of_bits.argtypes = [i64, ptr, ptr]
    lib.dr_gumbel_of_bits.restype = None
    lib.dr_gumbel_softmax_kl_forward.argtypes = [i64, i64, ptr, f64, u64, ptr, ptr, i64]
    lib.dr_gumbel_softmax_kl_forward.restype = None
    lib.dr_gumbel_softmax_kl_backward.argtypes = [i64, i64, ptr, ptr, ptr, f64, ptr, ptr, i64]
    lib.dr_gumbel_softmax_kl_backward.restype = None


def load() -> ctypes.CDLL | None:
    """The kernels' library, building it on first use; None when turned off or it cannot be built."""
    if not enabled():
        return None
    with _lock:
        if "lib" not in _state:
            lib = None
            try:
                lib = load_build(MARCH)
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
                lib = None
                warnings.warn(
                    f"dalle_repro: the CPU kernels are unavailable ({err}); the local attention backend falls back "
                    "to blocked matrix products (the same numbers, 2-3x slower on the conv mask) and the dVAE "
                    "step to PyTorch ops",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def pointer(x: torch.Tensor) -> ctypes.c_void_p:
    """The data pointer of a contiguous CPU tensor (the caller keeps the tensor alive during the call)."""
    if not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError("kernel operands must be contiguous CPU tensors")
    return ctypes.c_void_p(x.data_ptr())
